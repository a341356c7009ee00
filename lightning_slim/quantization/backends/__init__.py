"""The runtimes that serve a quantized model, behind one interface: :class:`Backend`.

A backend decides everything that differs between runtimes: what it cannot do (checked before
training), which fake-quantized layer simulates a float one, what the export traces, how the trained
model becomes a deployable int8 one, and how that is saved. :class:`~.onnxruntime.OnnxRuntimeBackend`
(``runtime="onnxruntime"``, the default) ships an ONNX file; :class:`~.torchao.TorchaoBackend`
(``runtime="torchao"``) swaps torchao int8 modules in and ships a ``torch.export`` program. The
config's ``runtime`` picks one (:attr:`~..config.QuantizationConfig.backend`); nothing else asks
which runtime it is.

Neither module imports its runtime's packages before they are needed.

>>> backend("torchao").name, backend("onnxruntime").default_activation_mode
('torchao', 'static')
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_slim.quantization.config import QuantizationConfig
    from lightning_slim.quantization.export_call import ExportCall

# runtime name -> "module:class", imported when first asked for
BACKENDS = {
    "onnxruntime": "lightning_slim.quantization.backends.onnxruntime:OnnxRuntimeBackend",
    "torchao": "lightning_slim.quantization.backends.torchao:TorchaoBackend",
}


class Backend(abc.ABC):
    """One runtime's side of quantization-aware training: simulation, checks, export and serving."""

    name: ClassVar[str]  # the config's ``runtime``
    packages: ClassVar[tuple[str, ...]]  # what exporting and serving import
    extra: ClassVar[str]  # the lightning-slim extra that installs them
    default_activation_mode: ClassVar[str]  # "static" or "dynamic" when the config leaves it None
    # an export that costs minutes on a large model is reused when the same trained model is exported
    # twice at the end of one fit (export_path, then the report)
    reuse_exports: ClassVar[bool] = False

    def check_packages(self) -> None:
        """Raise before training when a package the runtime needs to export or serve is missing (the
        export runs at the end of fit, after every epoch has been paid for)."""
        missing = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if missing:
            raise ModuleNotFoundError(
                f"QuantizationAwareTraining(runtime={self.name!r}) needs {', '.join(missing)} to export the int8 "
                f'model at the end of training; install them with: pip install "lightning-slim[{self.extra}]"'
            )

    @abc.abstractmethod
    def check_config(self, config: QuantizationConfig) -> None:
        """Raise ``ValueError`` for options this runtime cannot serve (the config's own check)."""

    @abc.abstractmethod
    def check_layer(self, name: str, module: nn.Module, config: QuantizationConfig) -> None:
        """Raise ``ValueError`` for a chosen layer this runtime cannot quantize with ``config``."""

    @abc.abstractmethod
    def fake_quantize(self, module: nn.Module, config: QuantizationConfig, bn: nn.Module | None) -> nn.Module:
        """The fake-quantized form of a float layer (same parameter objects; ``bn`` folded into a conv)."""

    @abc.abstractmethod
    def prepared(self, model: nn.Module) -> bool:
        """Whether ``model``'s fake-quantized layers are this backend's."""

    @abc.abstractmethod
    def export_call(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: QuantizationConfig
    ) -> ExportCall | None:
        """What the pre-training dry run calls (None: no sample without iterating the loader)."""

    @abc.abstractmethod
    def observe(self, target: nn.Module, call: ExportCall) -> None:
        """Before the dry run's fake-quantized pass: record what the layers need (e.g. first ranges)."""

    @abc.abstractmethod
    def deployable_in_torch(self, target: nn.Module) -> nn.Module:
        """The export's modules run in torch (the dry run calls them), from a fake-quantized ``target``."""

    @abc.abstractmethod
    def convert(self, model: nn.Module, example: ExportCall | None) -> nn.Module:
        """The deployable int8 model of a fake-quantized ``model`` (modified in place or consumed)."""

    def float_in_runtime(self, model: nn.Module, example: ExportCall) -> nn.Module | None:
        """The float model served by this runtime (the report's middle column); None when it is torch."""
        return None

    @abc.abstractmethod
    def save(self, model: nn.Module, example: ExportCall, path: str | Path) -> Path:
        """Write what :meth:`convert` returned to a file that loads without lightning-slim."""

    @abc.abstractmethod
    def int8_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The integer weight of each quantized layer of a converted ``model``, as (out, in) rows."""

    @abc.abstractmethod
    def record_when(self, layers: dict[str, nn.Module], recording: Callable[[], bool]) -> None:
        """Make the range observers of ``layers`` record when ``recording()`` holds (the user's step)."""

    @abc.abstractmethod
    def observed_ranges(self, layers: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
        """What the layers observed in training (activation ranges), to be saved in a checkpoint."""

    @abc.abstractmethod
    def load_observed_ranges(self, layers: dict[str, nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set back what :meth:`observed_ranges` returned."""

    @abc.abstractmethod
    def sync_ranks(self, layers: dict[str, nn.Module], reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """After each step under DDP: make every rank's training-time state (e.g. observed ranges) equal."""


_instances: dict[str, Backend] = {}


def backend(runtime: str) -> Backend:
    """The backend of ``runtime`` (one of :data:`BACKENDS`)."""
    if runtime not in BACKENDS:
        raise ValueError(f"runtime={runtime!r} is not one of {tuple(BACKENDS)}")
    if runtime not in _instances:
        module, _, cls = BACKENDS[runtime].partition(":")
        _instances[runtime] = getattr(importlib.import_module(module), cls)()
    return _instances[runtime]


def backend_of(model: nn.Module) -> Backend:
    """The backend whose fake-quantized layers ``model`` holds."""
    for runtime in BACKENDS:
        if backend(runtime).prepared(model):
            return backend(runtime)
    raise ValueError(f"{type(model).__name__} has no fake-quantized layer to convert; prepare it first")


def backend_of_artifact(model: nn.Module) -> Backend:
    """The backend that converted ``model``: a deployed file (an :class:`~lightning_slim.reporting.measure.Artifact`,
    ONNX Runtime's) or torch modules holding torchao's int8 tensors."""
    from lightning_slim.reporting.measure import Artifact

    return backend("onnxruntime") if isinstance(model, Artifact) else backend("torchao")
