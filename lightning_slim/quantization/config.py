"""``QuantizationAwareTraining``'s options as one validated dataclass (a YAML mapping in LightningCLI, a
dict or an instance in Python; torchao's ``quantize_(model, Config())`` style). The runtime that will
serve the model (``runtime``) picks a :class:`~.backends.Backend`, which checks what it cannot do.

>>> QuantizationConfig(weight_bits=4, activation_bits=None, group_size=16).backend.name
'onnxruntime'
>>> QuantizationConfig(weight_bits=4)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: weight_bits=4 with runtime='onnxruntime' is weight-only (MatMulNBits): set activation_bits=None, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_slim.core.arguments import check_choice, check_int
from lightning_slim.core.clock import Moment, check_unit

if TYPE_CHECKING:
    from lightning_slim.quantization.backends import Backend

WEIGHT_BITS = (8, 4)
ACTIVATION_BITS = (8, None)
RUNTIMES = ("onnxruntime", "torchao")
ACTIVATION_MODES = ("static", "dynamic")
DEFAULT_TARGETS = ("Linear", "Conv1d", "Conv2d")


@dataclass(frozen=True)
class QuantizationConfig:
    """What to quantize, how, when, and for which runtime.

    Numerics: ``weight_bits`` 8 (per channel) or 4 (per group of ``group_size`` inputs; Linear /
    Embedding); ``activation_bits`` 8 or None (weight-only); ``activation_mode`` ``"static"`` (one
    range per tensor, observed in training) or ``"dynamic"`` (per token at run time); None: the
    runtime's default. ``runtime`` ``"onnxruntime"`` (an ONNX file) or ``"torchao"`` (a
    ``torch.export`` program on torchao's int8 tensors); ``reduce_range`` (onnxruntime): 7-bit
    weights so AVX2's int8 kernels never saturate.

    Layers: ``targets`` / ``exclude``: classes (``"Linear"`` includes transformers' ``Conv1D``),
    module paths or ``re:`` regexes (:mod:`lightning_slim.targets`); default every Linear, Conv1d and
    Conv2d. ``fold_bn``: fold a BatchNorm that follows a conv into it.

    Schedule, in ``unit`` (``"epoch"`` or ``"step"``): fake quantization from ``start_after``; weight
    scales and activation ranges freeze at ``freeze_ranges_after``, folded BatchNorms at
    ``freeze_bn_after`` (None: never).

    Export: ``export_path`` saves the int8 artifact at the end of fit; ``export_module`` /
    ``export_inputs`` say which submodule the artifact serves and which batch keys become its inputs;
    ``export_diverged`` exports a model whose loss exploded after a phase switch;
    ``log_error_table`` logs the per-layer error table once at the end of fit.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    group_size: int = 32
    runtime: str = "onnxruntime"
    reduce_range: bool = True
    activation_mode: str | None = None
    targets: list[str] | None = None
    exclude: list[str] | None = None
    fold_bn: bool = True
    start_after: int = 1
    freeze_ranges_after: int | None = None
    freeze_bn_after: int | None = None
    unit: str = "epoch"
    export_path: str | None = None
    export_module: str | None = None
    export_inputs: list[str] | None = None
    export_diverged: bool = False
    log_error_table: bool = True

    def __post_init__(self):
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits={self.weight_bits!r} is not supported; allowed: {list(WEIGHT_BITS)}")
        if self.activation_bits not in ACTIVATION_BITS:
            raise ValueError(
                f"activation_bits={self.activation_bits!r} is not supported; allowed: 8 or None (weight-only)"
            )
        check_int("group_size", self.group_size, minimum=2)
        check_choice("runtime", self.runtime, RUNTIMES)
        if self.activation_mode is not None:
            check_choice("activation_mode", self.activation_mode, ACTIVATION_MODES)
        for name in ("reduce_range", "fold_bn", "export_diverged", "log_error_table"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"{name}={value!r} must be a list of strings (classes, module paths or 're:<regex>')")
        self._check_schedule()
        self._check_export()
        self.backend.check_config(self)

    def _check_schedule(self) -> None:
        check_unit(self.unit)
        check_int("start_after", self.start_after)
        for name in ("freeze_ranges_after", "freeze_bn_after"):
            value = getattr(self, name)
            check_int(name, value, allow_none=True)
            if value is not None and value < self.start_after:
                raise ValueError(
                    f"{name}={value} comes before start_after={self.start_after}; freezing happens "
                    "after fake quantization starts"
                )

    def _check_export(self) -> None:
        if self.export_path is not None and not isinstance(self.export_path, str):
            raise ValueError(f"export_path={self.export_path!r} must be a file path (a string) or None")
        if self.export_module is not None and not isinstance(self.export_module, str):
            raise ValueError(f"export_module={self.export_module!r} must be a module path such as 'model', or None")
        inputs = self.export_inputs
        if inputs is not None and (
            isinstance(inputs, str) or not inputs or not all(isinstance(n, str) and n for n in inputs)
        ):
            raise ValueError(
                f"export_inputs={inputs!r} must be a non-empty list of batch keys such as "
                "['input_ids', 'attention_mask'], or None"
            )

    @property
    def backend(self) -> Backend:
        """The runtime's :class:`~.backends.Backend`: how layers are simulated, exported and served."""
        from lightning_slim.quantization.backends import backend

        return backend(self.runtime)

    @property
    def dynamic(self) -> bool:
        """Activations quantized per token at run time (the runtime's default when not set)."""
        mode = self.activation_mode or self.backend.default_activation_mode
        return mode == "dynamic"

    @property
    def fake_quant_from(self) -> Moment:
        return Moment(self.unit, self.start_after)
