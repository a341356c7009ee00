"""Quantization-aware training in plain PyTorch (no Lightning): choose layers, fake-quantize
them, freeze ranges / BatchNorm, measure the error, convert to int8 and save.

The runtime in :class:`QuantSpec` decides the numerics. ``onnxruntime`` (the default): the
static layers of :mod:`.static` (per-tensor uint8 activation ranges, per-channel int8 weights,
native convolutions). ``torchao``: torchao's QAT modules for Linear / Embedding
(``FakeQuantizedLinear``/``FakeQuantizedEmbedding`` with ``IntxFakeQuantizer``, dynamic per-token
activations) and the im2col convolutions of :mod:`.conv`. Every swap keeps the parameter
objects and the state-dict keys of the float model.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> names = select_layers(model, ["Linear"], exclude=["2"])
>>> names
['0']
>>> prepare_qat(model, names, QuantSpec())
{}
>>> set_fake_quant(model, True)
>>> model(torch.randn(3, 16)).shape
torch.Size([3, 4])
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_slim.core import sharding
from lightning_slim.quantization import conv as qconv

# the guard and the layer choice live in their own modules; re-exported for the callers of this one
from lightning_slim.quantization.guard import DivergenceGuard as DivergenceGuard
from lightning_slim.quantization.layers import DEFAULT_TARGETS as DEFAULT_TARGETS
from lightning_slim.quantization.layers import SUPPORTED_TYPES as SUPPORTED_TYPES
from lightning_slim.quantization.layers import check_layers, is_hf_conv1d
from lightning_slim.quantization.layers import select_layers as select_layers
from lightning_slim.quantization.layers import skipped_layers as skipped_layers

WEIGHT_BITS = (8, 4)
ACTIVATION_BITS = (8, None)
RUNTIMES = ("onnxruntime", "torchao")
ACTIVATION_MODES = ("static", "dynamic")


@dataclass(frozen=True)
class QuantSpec:
    """What to simulate, decided by the runtime that will serve the model.

    ``runtime="onnxruntime"`` (static, see :mod:`.static`): uint8 activations with one observed
    range per tensor, int8 symmetric per-channel weights (``reduce_range``: 7-bit, [-64, 64], so
    AVX2 int8 kernels never saturate); weight-only (``activation_bits=None``) Linears take 8- or
    4-bit weights per group of ``group_size`` (a power of two >= 16, MatMulNBits' blocks).
    ``activation_mode="dynamic"`` on onnxruntime: uint8 ranges per token computed at run time
    (Linear layers; :mod:`.dynamic`). ``runtime="torchao"``: int8 per-channel (or int4 per-group)
    symmetric weights, int8 dynamic per-token asymmetric activations, as torchao's ``Int8Tensor``
    kernels compute them (its only mode). ``activation_mode=None``: the runtime's default.

    >>> QuantSpec(weight_bits=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: weight_bits=4 with runtime='onnxruntime' is weight-only (MatMulNBits): set activation_bits=None, ...
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    group_size: int = 32  # int4 weights; on onnxruntime every weight-only Linear
    runtime: str = "onnxruntime"
    reduce_range: bool = True  # onnxruntime: 7-bit weights beside uint8 activations
    activation_mode: str | None = None  # "static" / "dynamic"; None: static on onnxruntime, dynamic on torchao

    def __post_init__(self):
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits={self.weight_bits!r} is not supported; allowed: {list(WEIGHT_BITS)}")
        if self.activation_bits not in ACTIVATION_BITS:
            raise ValueError(
                f"activation_bits={self.activation_bits!r} is not supported; allowed: 8 or None (weight-only)"
            )
        if not (isinstance(self.group_size, int) and self.group_size >= 2):
            raise ValueError(f"group_size={self.group_size!r} must be an integer >= 2")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r} is not one of {RUNTIMES}")
        if not isinstance(self.reduce_range, bool):
            raise ValueError(f"reduce_range={self.reduce_range!r} must be true or false")
        if self.activation_mode not in (None, *ACTIVATION_MODES):
            raise ValueError(f"activation_mode={self.activation_mode!r} is not one of {ACTIVATION_MODES} or None")
        if self.runtime == "torchao" and self.activation_mode == "static":
            raise ValueError(
                "activation_mode='static' needs runtime='onnxruntime'; torchao's int8 kernels quantize "
                "activations per token at run time (activation_mode='dynamic' or None)"
            )
        if self.static and self.weight_bits == 4 and self.activation_bits is not None:
            raise ValueError(
                "weight_bits=4 with runtime='onnxruntime' is weight-only (MatMulNBits): set "
                "activation_bits=None, or runtime='torchao' for int8 dynamic activations with int4 "
                "weights"
            )
        if (
            self.static
            and self.activation_bits is None
            and (self.group_size < 16 or self.group_size & (self.group_size - 1))
        ):
            raise ValueError(
                f"group_size={self.group_size} must be a power of two >= 16 for weight-only layers on "
                "onnxruntime (MatMulNBits blocks)"
            )

    @property
    def static(self) -> bool:
        """The onnxruntime runtime's layers (:mod:`.static`; static or dynamic activations)."""
        return self.runtime == "onnxruntime"

    @property
    def dynamic(self) -> bool:
        """Activations quantized per token at run time (always on torchao)."""
        return self.activation_mode == "dynamic" or self.runtime == "torchao"

    def activation_quantizer(self, module: nn.Module) -> nn.Module | None:
        """The onnxruntime layers' activation quantizer: a static range observer, a per-token
        quantizer, or None (weight-only layers and embeddings)."""
        from lightning_slim.quantization.dynamic import TokenQuantizer
        from lightning_slim.quantization.static import ActivationObserver

        if self.activation_bits is None or isinstance(module, nn.Embedding):
            return None
        return TokenQuantizer() if self.dynamic else ActivationObserver()

    def weight_quantizer(self, module: nn.Module):
        from lightning_slim.quantization.static import WeightQuantizer

        if isinstance(module, nn.Embedding):  # int8 rows, or int4 groups (ORT's GatherBlockQuantized)
            if self.static and self.weight_bits == 4:
                return WeightQuantizer(4, group_size=self.group_size)
            return WeightQuantizer(8, reduce_range=False)
        if self.activation_bits is None:
            return WeightQuantizer(self.weight_bits, group_size=self.group_size)
        return WeightQuantizer(8, reduce_range=self.reduce_range)

    def weight_config(self):
        from torchao.quantization.qat import IntxFakeQuantizeConfig

        if self.weight_bits == 8:
            return IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
        return IntxFakeQuantizeConfig(torch.int4, group_size=self.group_size, is_symmetric=True)

    def activation_config(self):
        from torchao.quantization.qat import IntxFakeQuantizeConfig

        if self.activation_bits is None:
            return None
        return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)


@contextlib.contextmanager
def no_mha_fastpath():
    """``nn.TransformerEncoderLayer``/``MultiheadAttention``'s inference fast path reads Linear weights
    directly and bypasses swapped modules: off while QAT runs and while exporting."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


# --- preparing and undoing -----------------------------------------------------------------------
def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _next_batchnorm(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """The BatchNorm registered right after ``name`` in the same parent (Conv -> BN), if any."""
    parent, _, child = name.rpartition(".")
    siblings = list((model.get_submodule(parent) if parent else model).named_children())
    keys = [k for k, _ in siblings]
    i = keys.index(child)
    conv = siblings[i][1]
    if i + 1 < len(siblings) and isinstance(siblings[i + 1][1], (nn.BatchNorm1d, nn.BatchNorm2d)):
        bn = siblings[i + 1][1]
        if bn.num_features == conv.out_channels and bn.track_running_stats:
            return (f"{parent}.{keys[i + 1]}" if parent else keys[i + 1]), bn
    return None


def is_fake_quantized(module: nn.Module) -> bool:
    return hasattr(module, "weight_fake_quantizer")


def prepare_qat(model: nn.Module, names: list[str], spec: QuantSpec, fold_bn: bool = True) -> dict[str, str]:
    """Swap the named layers for fake-quantized ones in place (parameters are kept).

    Fake quantization starts disabled (see :func:`set_fake_quant`). Returns ``{conv: bn}``
    for the BatchNorms folded into convolutions. Already-prepared layers are left alone.
    """
    check_layers(model, names, spec)
    folded = {}
    for name in names:
        m = model.get_submodule(name)
        if is_fake_quantized(m):
            continue
        bn = _next_batchnorm(model, name) if fold_bn and isinstance(m, qconv.CONV_TYPES) else None
        if bn:
            folded[name] = bn[0]
        new = _static_layer(m, spec, bn) if spec.static else _torchao_layer(m, spec, bn)
        new._forward_hooks, new._forward_pre_hooks = m._forward_hooks, m._forward_pre_hooks
        new.train(m.training)
        _set(model, name, new)
    set_fake_quant(model, False)
    return folded


def _static_layer(m: nn.Module, spec: QuantSpec, bn) -> nn.Module:
    from lightning_slim.quantization.static import fake_quantize_static

    activations = spec.activation_quantizer(m)
    if is_hf_conv1d(m):
        from lightning_slim.quantization.transposed import StaticTransposedLinear

        return StaticTransposedLinear(m, spec.weight_quantizer(m), activations)
    return fake_quantize_static(m, spec.weight_quantizer(m), activations, bn[1] if bn else None)


def _torchao_layer(m: nn.Module, spec: QuantSpec, bn) -> nn.Module:
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    act, weight = spec.activation_config(), spec.weight_config()
    if isinstance(m, qconv.CONV_TYPES):
        return qconv.fake_quantize_conv(m, act, weight, bn[1] if bn else None)
    if is_hf_conv1d(m):
        from lightning_slim.quantization.transposed import TorchaoTransposedLinear

        return TorchaoTransposedLinear(m, act, weight)
    if isinstance(m, nn.Linear):
        return FakeQuantizedLinear.from_linear(m, act, weight)
    return FakeQuantizedEmbedding.from_embedding(m, weight)


def unprepare(model: nn.Module) -> None:
    """Put plain float layers back (same parameters): the model is the user's again."""
    for name, m in list(model.named_modules()):
        if is_fake_quantized(m):
            plain = (
                m.to_float()
                if hasattr(m, "to_float")
                else m.to_conv()
                if hasattr(m, "to_conv")
                else (m.to_linear() if isinstance(m, nn.Linear) else m.to_embedding())
            )
            plain._forward_hooks, plain._forward_pre_hooks = m._forward_hooks, m._forward_pre_hooks
            plain.train(m.training)
            _set(model, name, plain)


def fake_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_fake_quantized(m)}


def is_static(model: nn.Module) -> bool:
    """Was ``model`` prepared for the onnxruntime runtime (static layers of :mod:`.static`)?"""
    from lightning_slim.quantization.static import WeightQuantizer

    return any(isinstance(m.weight_fake_quantizer, WeightQuantizer) for m in fake_quantized_layers(model).values())


def full_range_weights(model: nn.Module) -> bool:
    """Whether an int8 product of ``model`` (a quantized input times a weight) uses 8-bit weights
    (``reduce_range=False``): such a file needs exact u8 x s8 kernels (see ``serving.session``)."""
    from lightning_slim.quantization.static import WeightQuantizer

    return any(
        isinstance(m.weight_fake_quantizer, WeightQuantizer)
        and m.weight_fake_quantizer.qmax == 127
        and getattr(m, "activation_fake_quantizer", None) is not None
        for m in fake_quantized_layers(model).values()
    )


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization of weights and activations on or off (off = the float model)."""
    for m in fake_quantized_layers(model).values():
        for fq in (getattr(m, "weight_fake_quantizer", None), getattr(m, "activation_fake_quantizer", None)):
            if fq is not None:
                fq.enabled = enabled


def freeze_batchnorm(model: nn.Module) -> None:
    """Use (and stop updating) running statistics of the BNs folded into convolutions."""
    for m in fake_quantized_layers(model).values():
        bn = getattr(m, "folded_bn", None)
        if bn is not None:
            bn.eval()


# --- ranges ------------------------------------------------------------------------------------
def _quant_weight(m: nn.Module) -> torch.Tensor:
    return m.quant_weight() if hasattr(m, "quant_weight") else m.weight


def freeze_ranges(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Fix each Linear/Conv weight's scale at its current value (the standard QAT recipe stops
    updating ranges late in training). Returns them, to be saved and set back by :func:`set_ranges`.
    Embeddings keep computing theirs (weight-only, nothing to stabilise)."""
    from lightning_slim.quantization.static import ActivationObserver, WeightQuantizer

    ranges = {}
    for name, m in fake_quantized_layers(model).items():
        if isinstance(m, nn.Embedding):
            continue
        fq = m.weight_fake_quantizer
        if isinstance(fq, WeightQuantizer):  # static (onnxruntime): weight scale and input range
            ranges[name] = {"scale": fq.compute_scale(_quant_weight(m)).clone()}
            if isinstance(m.activation_fake_quantizer, ActivationObserver):
                m.activation_fake_quantizer.freeze()
            continue
        fq.scale = fq.zero_point = None
        with torch.no_grad():
            fq.config = copy.copy(fq.config)
            fq.config.is_dynamic = True
            enabled, fq.enabled = fq.enabled, True
            fq(_quant_weight(m).detach())  # computes scale / zero point
            fq.enabled = enabled
        ranges[name] = {"scale": fq.scale.detach().clone(), "zero_point": fq.zero_point.detach().clone()}
    set_ranges(model, ranges)
    return ranges


def set_ranges(model: nn.Module, ranges: dict[str, dict[str, torch.Tensor]]) -> None:
    """Use fixed weight scales (from :func:`freeze_ranges` or a checkpoint)."""
    layers = fake_quantized_layers(model)
    for name, r in ranges.items():
        if name not in layers:
            raise KeyError(f"frozen ranges for {name!r}, which is not a fake-quantized layer of the model")
        fq = layers[name].weight_fake_quantizer
        device = layers[name].weight.device
        if "zero_point" not in r:  # static WeightQuantizer
            fq.scale = r["scale"].to(device)
            continue
        fq.config = copy.copy(fq.config)
        fq.config.is_dynamic = False
        fq.scale, fq.zero_point = r["scale"].to(device), r["zero_point"].to(device)


@torch.no_grad()
def quantization_error(model: nn.Module) -> list[dict[str, Any]]:
    """Per fake-quantized layer: the weight's relative error and SQNR under its quantizer."""
    rows = []
    for name, m in fake_quantized_layers(model).items():
        fq, whole = m.weight_fake_quantizer, _quant_weight(m)
        w = sharding.local(whole.detach())  # FSDP2: this rank's output rows, each with its own scale
        enabled, fq.enabled = fq.enabled, True
        err = fq(w) - w
        fq.enabled = enabled
        signal, noise = sharding.total(w.pow(2).sum(), whole), sharding.total(err.pow(2).sum(), whole)
        rows.append(
            {
                "layer": name,
                "type": type(m).__name__.replace("FakeQuantized", "").replace("Static", ""),
                "weight_bits": _bits(fq),
                "activation_bits": 8 if getattr(m, "activation_fake_quantizer", None) is not None else None,
                "relative_error": (noise / signal) ** 0.5 if signal else 0.0,
                "sqnr_db": 10 * torch.log10(torch.tensor(signal / noise)).item() if noise else float("inf"),
                "ranges_frozen": _frozen(fq),
            }
        )
    return rows


def _bits(fq) -> int:
    return fq.bits if hasattr(fq, "bits") else 4 if fq.config.dtype == torch.int4 else 8


def _frozen(fq) -> bool:
    return fq.frozen if hasattr(fq, "frozen") else not fq.config.is_dynamic
