"""Which layers QAT quantizes: the shared targets grammar (:mod:`lightning_slim.targets`), the checks
before training, and what stays float.

Entries of ``targets`` / ``exclude`` are layer types (``"Linear"``, ``"Conv1d"``, ``"Conv2d"``,
``"Embedding"``; ``"Conv1D"`` or ``"transformers.pytorch_utils.Conv1D"`` for GPT-2's layers), module
names (``"net.0"``) or ``"re:<regex>"`` over module names. transformers' ``Conv1D`` is the Linear with
a transposed ``(in, out)`` weight that it is: ``"Linear"`` selects it too.

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> select_layers(model, ["Linear"], exclude=["2"])
['0']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from lightning_slim.core.loading import find_class
from lightning_slim.quantization.config import DEFAULT_TARGETS
from lightning_slim.quantization.conv import CONV_TYPES
from lightning_slim.targets import select_modules

if TYPE_CHECKING:
    from lightning_slim.quantization.config import QuantizationConfig

SUPPORTED_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
HF_CONV1D = "Conv1D"  # transformers.pytorch_utils.Conv1D, matched by name: transformers is never imported here


def _hf_conv1d_class(cls: type) -> bool:
    return any(c.__name__ == HF_CONV1D and c.__module__.startswith("transformers.") for c in cls.__mro__)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear with an (in, out) weight, not an ``nn.Linear``."""
    return _hf_conv1d_class(type(module))


def is_linear(module: nn.Module) -> bool:
    """A Linear by kind: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, tuple(SUPPORTED_TYPES.values())) or is_hf_conv1d(module)


def _is_type_name(entry: str) -> bool:
    if entry in SUPPORTED_TYPES or entry == HF_CONV1D:
        return True
    if entry[:1].isupper() and isinstance(getattr(nn, entry, None), type):
        return True
    return "." in entry and find_class(entry) is not None  # a dotted class path


def _check_types(entries: list[str], what: str) -> None:
    """A class entry must be a type quantization handles (a class the model lacks is fine)."""
    for entry in entries:
        if not isinstance(entry, str) or entry.startswith("re:") or not _is_type_name(entry) or entry == HF_CONV1D:
            continue
        cls = find_class(entry)
        if cls is not None and not (issubclass(cls, tuple(SUPPORTED_TYPES.values())) or _hf_conv1d_class(cls)):
            raise ValueError(
                f"layer type {entry!r} in {what} is not supported; supported types: "
                f"{[*sorted(SUPPORTED_TYPES), HF_CONV1D]}"
            )


def _with_hf_conv1d(model: nn.Module, entries: list[str]) -> list[str]:
    """``"Linear"`` and ``"Conv1D"`` name transformers' ``Conv1D`` too (by its class, when the model has one)."""
    found = next((type(m) for m in model.modules() if is_hf_conv1d(m)), None)
    if found is None:
        return [e for e in entries if e != HF_CONV1D]
    path = f"{found.__module__}.{found.__qualname__}"
    out = []
    for entry in entries:
        out += [path] if entry == HF_CONV1D else [entry, path] if entry == "Linear" else [entry]
    return list(dict.fromkeys(out))


def _quantizable(module: nn.Module) -> bool:
    # nn.MultiheadAttention's out_proj: its weight is read directly by the attention kernel, never called
    return is_supported(module) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def select_layers(model: nn.Module, targets=DEFAULT_TARGETS, exclude=()) -> list[str]:
    """Names of the modules to quantize, chosen by the shared selector
    (:func:`lightning_slim.targets.select_modules`) among the layer types quantization handles.

    A module named explicitly must be of a supported type; a class entry must name a supported type;
    a regex or path that selects nothing is an error.
    """
    targets, exclude = list(DEFAULT_TARGETS if targets is None else targets), list(exclude or ())
    _check_types(targets, "targets")
    _check_types(exclude, "exclude")
    chosen = select_modules(
        model,
        _with_hf_conv1d(model, targets),
        _with_hf_conv1d(model, exclude),
        default=tuple(SUPPORTED_TYPES.values()),
        supported=_quantizable,
        what="quantization",
    )
    return list(chosen)


def check_layers(model: nn.Module, names: list[str], config: QuantizationConfig) -> None:
    """Raise a clear error for chosen layers that ``config``'s runtime cannot quantize."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if isinstance(m, CONV_TYPES) and config.weight_bits != 8:
            raise ValueError(
                f"layer {name!r}: weight_bits={config.weight_bits} is supported for Linear/Embedding "
                "only; convolutions take 8-bit weights (exclude it or use weight_bits=8)"
            )
        config.backend.check_layer(name, m, config)


def check_whole_groups(name: str, module: nn.Module, config: QuantizationConfig) -> None:
    """int4 weights come in whole groups of ``group_size`` inputs: the group must divide the width."""
    if config.weight_bits != 4:
        return
    width = in_features(module) if is_linear(module) else module.embedding_dim
    if width % config.group_size:
        raise ValueError(
            f"layer {name!r}: group_size={config.group_size} does not divide its input width "
            f"{width}; choose a divisor or exclude the layer"
        )


def in_features(module: nn.Module) -> int:
    """Input width of a Linear by kind (a ``Conv1D``'s weight is ``(in, out)``)."""
    return module.weight.shape[0] if is_hf_conv1d(module) else module.in_features


def skipped_layers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Layers that are Linears by kind but stay float, with why (whenever Linear layers are targeted):
    ``nn.MultiheadAttention`` (``in_proj_weight`` is a bare parameter and ``out_proj``'s weight is read
    directly by the attention kernel). The callback warns about them and lists them in its report."""
    if not any(is_linear(model.get_submodule(n)) for n in names):
        return {}
    return {
        n: "nn.MultiheadAttention: in_proj_weight / out_proj are read by the attention kernel"
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
