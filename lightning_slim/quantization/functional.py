"""Quantization-aware training in plain PyTorch (no Lightning): choose layers, fake-quantize
them, freeze ranges / BatchNorm, measure the error, convert to int8 and save.

The runtime of the :class:`~.config.QuantizationConfig` decides the numerics: its
:class:`~.backends.Backend` builds the fake-quantized layers (:mod:`.backends.onnxruntime`: the
static layers of :mod:`.static`; :mod:`.backends.torchao`: torchao's QAT modules and the im2col
convolutions of :mod:`.conv`). Every swap keeps the parameter objects and the state-dict keys of
the float model.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> from lightning_slim.quantization.layers import select_layers
>>> names = select_layers(model, ["Linear"], exclude=["2"])
>>> names
['0']
>>> prepare_qat(model, names, QuantizationConfig())
{}
>>> set_fake_quant(model, True)
>>> model(torch.randn(3, 16)).shape
torch.Size([3, 4])
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lightning_slim.core import sharding
from lightning_slim.quantization import conv
from lightning_slim.quantization.config import QuantizationConfig
from lightning_slim.quantization.fake_layer import FakeQuantizedLayer, torchao_layers
from lightning_slim.quantization.layers import check_layers


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
def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
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
    return isinstance(module, (FakeQuantizedLayer, *torchao_layers()))


def prepare_qat(model: nn.Module, names: list[str], config: QuantizationConfig) -> dict[str, str]:
    """Swap the named layers for the fake-quantized ones of ``config``'s runtime, in place
    (parameters are kept).

    Fake quantization starts disabled (see :func:`set_fake_quant`). Returns ``{conv: bn}``
    for the BatchNorms folded into convolutions (``config.fold_bn``). Already-prepared layers are
    left alone.
    """
    check_layers(model, names, config)
    folded = {}
    for name in names:
        m = model.get_submodule(name)
        if is_fake_quantized(m):
            continue
        bn = _next_batchnorm(model, name) if config.fold_bn and isinstance(m, conv.CONV_TYPES) else None
        if bn:
            folded[name] = bn[0]
        new = config.backend.fake_quantize(m, config, bn[1] if bn else None)
        new._forward_hooks, new._forward_pre_hooks = m._forward_hooks, m._forward_pre_hooks
        new.train(m.training)
        set_module(model, name, new)
    set_fake_quant(model, False)
    return folded


def unprepare(model: nn.Module) -> None:
    """Put plain float layers back (same parameters): the model is the user's again."""
    for name, m in list(model.named_modules()):
        if is_fake_quantized(m):
            if isinstance(m, FakeQuantizedLayer):
                plain = m.to_float()
            else:  # torchao's own
                plain = m.to_linear() if isinstance(m, nn.Linear) else m.to_embedding()
            plain._forward_hooks, plain._forward_pre_hooks = m._forward_hooks, m._forward_pre_hooks
            plain.train(m.training)
            set_module(model, name, plain)


def fake_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_fake_quantized(m)}


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


def folded_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms folded into fake-quantized convolutions."""
    return [bn for m in fake_quantized_layers(model).values() if (bn := getattr(m, "folded_bn", None)) is not None]


@torch.no_grad()
def average_batchnorm_statistics(model: nn.Module, reduce_mean) -> None:
    """Make the running statistics of the folded BatchNorms equal on every rank (``reduce_mean`` averages a
    tensor over ranks). They scale the weights that are fake-quantized, so every rank must hold the same;
    FSDP2 leaves buffers per rank (DDP broadcasts rank 0's before each forward). EMAs are linear: the
    averaged mean is the EMA of the global batch's mean (equal local batches); the averaged variance
    lacks the spread between the ranks' means, as every rank's own statistics do without SyncBatchNorm."""
    bns = [bn for bn in folded_batchnorms(model) if bn.training]  # frozen ones stopped moving, and agree
    if not bns:
        return
    flat = reduce_mean(torch.cat([torch.cat([bn.running_mean, bn.running_var]) for bn in bns]))
    for bn, block in zip(bns, flat.split([2 * bn.num_features for bn in bns])):
        bn.running_mean.copy_(block[: bn.num_features])
        bn.running_var.copy_(block[bn.num_features :])


def check_sharded_folds(model: nn.Module, folded: dict[str, str]) -> None:
    """Raise before training when a folded BatchNorm was sharded by a ``fully_shard`` of its own: FSDP2
    gathers a module's parameters in its own forward (or an enclosing sharded module's), and the
    convolution reads the BatchNorm's before that forward runs."""
    alone = [bn for bn in folded.values() if isinstance(model.get_submodule(bn), FSDPModule)]
    if alone:
        raise ValueError(
            f"QuantizationAwareTraining folds the BatchNorms {alone} into the convolutions before them, but "
            "configure_model shards each with a fully_shard of its own, so their parameters are still sharded "
            "when the convolution reads them; shard them with an enclosing module (their parent or the root), "
            "or pass fold_bn=False"
        )


def freeze_batchnorm(model: nn.Module) -> None:
    """Use (and stop updating) running statistics of the BNs folded into convolutions."""
    for bn in folded_batchnorms(model):
        bn.eval()


# --- ranges ------------------------------------------------------------------------------------
def quantized_weight(m: nn.Module) -> torch.Tensor:
    """The weight a fake-quantized layer's weight quantizer sees."""
    return m.quant_weight() if isinstance(m, FakeQuantizedLayer) else m.weight


def whole_quantized_weight(m: nn.Module) -> torch.Tensor:
    """:func:`quantized_weight`, detached and whole on every rank: under FSDP2, outside a forward, one
    layer's weight is gathered (as FSDP2's forward gathers it), so every rank computes the scales one
    process computes from the same weight (a collective: every rank calls it for the same layers)."""
    return sharding.full(quantized_weight(m).detach())


def freeze_ranges(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Fix each Linear/Conv weight's scale at its current value (the standard QAT recipe stops
    updating ranges late in training). Returns them, to be saved and set back by :func:`set_ranges`.
    Embeddings keep computing theirs (weight-only, nothing to stabilise). The scales are the whole
    weight's (one per output channel of the whole layer, equal on every rank under FSDP2): they are
    used inside the forward, where FSDP2 has gathered the whole weight."""
    from lightning_slim.quantization.static import ActivationObserver, WeightQuantizer

    ranges = {}
    for name, m in fake_quantized_layers(model).items():
        if isinstance(m, nn.Embedding):
            continue
        fq = m.weight_fake_quantizer
        if isinstance(fq, WeightQuantizer):  # static (onnxruntime): weight scale and input range
            ranges[name] = {"scale": fq.compute_scale(whole_quantized_weight(m)).clone()}
            if isinstance(m.activation_fake_quantizer, ActivationObserver):
                m.activation_fake_quantizer.freeze()
            continue
        fq.scale = fq.zero_point = None
        with torch.no_grad():
            fq.config = copy.copy(fq.config)
            fq.config.is_dynamic = True
            enabled, fq.enabled = fq.enabled, True
            fq(whole_quantized_weight(m))  # computes scale / zero point
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
    """Per fake-quantized layer: the weight's relative error and SQNR under its quantizer (under FSDP2
    a collective, the whole weight one layer at a time: frozen scales are the whole weight's)."""
    rows = []
    for name, m in fake_quantized_layers(model).items():
        fq, w = m.weight_fake_quantizer, whole_quantized_weight(m)
        enabled, fq.enabled = fq.enabled, True
        err = fq(w) - w
        fq.enabled = enabled
        signal, noise = float(w.double().pow(2).sum()), float(err.double().pow(2).sum())
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


def _bits(fq: nn.Module) -> int:
    from lightning_slim.quantization.static import WeightQuantizer

    if isinstance(fq, WeightQuantizer):
        return fq.bits
    return 4 if fq.config.dtype == torch.int4 else 8  # torchao's IntxFakeQuantizer


def _frozen(fq: nn.Module) -> bool:
    from lightning_slim.quantization.static import WeightQuantizer

    return fq.frozen if isinstance(fq, WeightQuantizer) else not fq.config.is_dynamic
