"""Which layers QAT quantizes: the targets grammar, the checks before training, and what stays float.

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

from torch import nn

from lightning_slim.core.loading import find_class
from lightning_slim.quantization import conv as qconv
from lightning_slim.targets import _check_spec as check_spec
from lightning_slim.targets import matches

SUPPORTED_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
HF_CONV1D = "Conv1D"  # transformers.pytorch_utils.Conv1D, matched by name: transformers is never imported here
DEFAULT_TARGETS = ("Linear", "Conv1d", "Conv2d")


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


def _matches(entry: str, name: str, module: nn.Module) -> bool:
    if _is_type_name(entry) and isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False  # nn.MultiheadAttention's out_proj: its weight is read directly, never called
    if entry in ("Linear", HF_CONV1D) and is_hf_conv1d(module):
        return True
    return matches(entry, name, module)


def _check_entries(model: nn.Module, entries, what: str) -> None:
    names = {n for n, _ in model.named_modules()}
    for entry in entries:
        check_spec(entry, what)  # a non-empty string, a valid regex
        if entry.startswith("re:") or entry in names:
            continue
        if _is_type_name(entry):
            cls = find_class(entry) if entry != HF_CONV1D else None
            known = cls is not None and (issubclass(cls, tuple(SUPPORTED_TYPES.values())) or _hf_conv1d_class(cls))
            if entry not in SUPPORTED_TYPES and entry != HF_CONV1D and not known:
                raise ValueError(
                    f"layer type {entry!r} in {what} is not supported; supported types: "
                    f"{[*sorted(SUPPORTED_TYPES), HF_CONV1D]}"
                )
        else:
            raise ValueError(
                f"{what} entry {entry!r} names no module of the model (module names look like "
                f"{sorted(n for n in names if n)[:6]}...)"
            )


def select_layers(model: nn.Module, targets=DEFAULT_TARGETS, exclude=()) -> list[str]:
    """Names of the modules to quantize: matched by ``targets``, not by ``exclude``.

    A module named explicitly must be of a supported type; a regex or type that selects nothing
    supported is an error.
    """
    _check_entries(model, targets, "targets")
    _check_entries(model, exclude, "exclude")
    chosen = []
    for name, module in model.named_modules():
        if not any(_matches(t, name, module) for t in targets) or any(_matches(e, name, module) for e in exclude):
            continue
        if not is_supported(module):
            if name in targets:
                raise ValueError(
                    f"layer {name!r} is a {type(module).__name__}, which is not supported; supported "
                    f"types: {[*sorted(SUPPORTED_TYPES), HF_CONV1D]}"
                )
            continue
        chosen.append(name)
    if not chosen:
        raise ValueError(
            f"targets={list(targets)} (exclude={list(exclude)}) match no supported layer "
            f"({[*sorted(SUPPORTED_TYPES), HF_CONV1D]}) of {type(model).__name__}"
        )
    return chosen


def check_layers(model: nn.Module, names: list[str], spec) -> None:
    """Raise a clear error for chosen layers the flow cannot quantize with ``spec`` (a ``QuantSpec``)."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if isinstance(m, qconv.CONV_TYPES):
            if not spec.static:
                qconv.check_conv(name, m)
            elif m.padding_mode != "zeros":
                raise ValueError(
                    f"layer {name!r}: padding_mode={m.padding_mode!r} is not supported ('zeros' only); "
                    "add it to `exclude`"
                )
            if spec.weight_bits != 8:
                raise ValueError(
                    f"layer {name!r}: weight_bits={spec.weight_bits} is supported for Linear/Embedding "
                    "only; convolutions take 8-bit weights (exclude it or use weight_bits=8)"
                )
            if spec.static and spec.activation_bits is None:
                raise ValueError(
                    f"layer {name!r}: onnxruntime has no weight-only int8 convolution; use "
                    "activation_bits=8 or exclude the layer"
                )
            if spec.static and spec.dynamic:
                raise ValueError(
                    f"layer {name!r}: activation_mode='dynamic' quantizes Linear layers (per-token ranges); "
                    "exclude the convolutions or use activation_mode='static'"
                )
        elif spec.weight_bits == 4 and (not spec.static or isinstance(m, nn.Embedding)):
            # whole groups only: torchao's int4 layouts, and ORT's GatherBlockQuantized for embeddings
            # (a weight-only Linear on onnxruntime pads its last group, as MatMulNBits does)
            width = in_features(m) if is_linear(m) else m.embedding_dim
            if width % spec.group_size:
                raise ValueError(
                    f"layer {name!r}: group_size={spec.group_size} does not divide its input width "
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
