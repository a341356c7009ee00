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
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_slim.quantization import conv as qconv
from lightning_slim.targets import matches

SUPPORTED_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
DEFAULT_TARGETS = ("Linear", "Conv1d", "Conv2d")
WEIGHT_BITS = (8, 4)
ACTIVATION_BITS = (8, None)
RUNTIMES = ("onnxruntime", "torchao")


@dataclass(frozen=True)
class QuantSpec:
    """What to simulate, decided by the runtime that will serve the model.

    ``runtime="onnxruntime"`` (static, see :mod:`.static`): uint8 activations with one observed
    range per tensor, int8 symmetric per-channel weights (``reduce_range``: 7-bit, [-64, 64], so
    AVX2 int8 kernels never saturate); weight-only (``activation_bits=None``) Linears take 8- or
    4-bit weights per group of ``group_size`` (a power of two >= 16, MatMulNBits' blocks).
    ``runtime="torchao"``: int8 per-channel (or int4 per-group) symmetric weights, int8 dynamic
    per-token asymmetric activations, as torchao's ``Int8Tensor`` kernels compute them.

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
        return self.runtime == "onnxruntime"

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


# --- choosing layers ---------------------------------------------------------------------------
def _is_type_name(entry: str) -> bool:
    return entry in SUPPORTED_TYPES or (entry[:1].isupper() and isinstance(getattr(nn, entry, None), type))


def _matches(entry: str, name: str, module: nn.Module) -> bool:
    if _is_type_name(entry) and isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False  # nn.MultiheadAttention's out_proj: its weight is read directly, never called
    return matches(entry, name, module)


def _check_entries(model: nn.Module, entries, what: str) -> None:
    names = {n for n, _ in model.named_modules()}
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ValueError(
                f"{what} entry {entry!r} must be a non-empty string (a layer type such as 'Linear', "
                "a module name, or 're:<regex>')"
            )
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as err:
                raise ValueError(f"{what} entry {entry!r} is not a valid regex: {err}") from None
        elif _is_type_name(entry):
            if entry not in SUPPORTED_TYPES:
                raise ValueError(
                    f"layer type {entry!r} in {what} is not supported; supported types: {sorted(SUPPORTED_TYPES)}"
                )
        elif entry not in names:
            raise ValueError(
                f"{what} entry {entry!r} names no module of the model (module names look like "
                f"{sorted(n for n in names if n)[:6]}...)"
            )


def select_layers(model: nn.Module, targets=DEFAULT_TARGETS, exclude=()) -> list[str]:
    """Names of the modules to quantize: matched by ``targets``, not by ``exclude``.

    Entries are layer types (``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Embedding"``), module
    names (``"net.0"``) or ``"re:<regex>"`` over module names. A module named explicitly must
    be of a supported type; a regex or type that selects nothing supported is an error.
    """
    _check_entries(model, targets, "targets")
    _check_entries(model, exclude, "exclude")
    chosen = []
    for name, module in model.named_modules():
        if not any(_matches(t, name, module) for t in targets) or any(_matches(e, name, module) for e in exclude):
            continue
        supported = isinstance(module, tuple(SUPPORTED_TYPES.values()))
        if not supported and name in targets:
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}, which is not supported; supported "
                f"types: {sorted(SUPPORTED_TYPES)}"
            )
        if supported:
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"targets={list(targets)} (exclude={list(exclude)}) match no supported layer "
            f"({sorted(SUPPORTED_TYPES)}) of {type(model).__name__}"
        )
    return chosen


def check_layers(model: nn.Module, names: list[str], spec: QuantSpec) -> None:
    """Raise a clear error for chosen layers the flow cannot quantize with ``spec``."""
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
        elif spec.weight_bits == 4 and (not spec.static or isinstance(m, nn.Embedding)):
            # whole groups only: torchao's int4 layouts, and ORT's GatherBlockQuantized for embeddings
            # (a weight-only Linear on onnxruntime pads its last group, as MatMulNBits does)
            width = m.in_features if isinstance(m, nn.Linear) else m.embedding_dim
            if width % spec.group_size:
                raise ValueError(
                    f"layer {name!r}: group_size={spec.group_size} does not divide its input width "
                    f"{width}; choose a divisor or exclude the layer"
                )


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear with an (in, out) weight, not an ``nn.Linear``."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def skipped_layers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Layers that are Linears by kind but stay float, with why (whenever Linear layers are targeted):
    ``nn.MultiheadAttention`` (``in_proj_weight`` is a bare parameter and ``out_proj``'s weight is read
    directly by the attention kernel) and transformers' ``Conv1D`` (GPT-2's projections, an (in, out)
    weight QAT has no layer for). The callback warns about them and lists them in its report."""
    if not any(isinstance(model.get_submodule(n), nn.Linear) for n in names):
        return {}
    found = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            found[n] = "nn.MultiheadAttention: in_proj_weight / out_proj are read by the attention kernel"
        elif _is_hf_conv1d(m):
            found[n] = "transformers Conv1D: no fake-quantized form (an (in, out) Linear)"
    return found


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

    observe = spec.activation_bits is not None and not isinstance(m, nn.Embedding)
    return fake_quantize_static(m, spec.weight_quantizer(m), observe, bn[1] if bn else None)


def _torchao_layer(m: nn.Module, spec: QuantSpec, bn) -> nn.Module:
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    act, weight = spec.activation_config(), spec.weight_config()
    if isinstance(m, qconv.CONV_TYPES):
        return qconv.fake_quantize_conv(m, act, weight, bn[1] if bn else None)
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
        fq = m.weight_fake_quantizer
        w = _quant_weight(m).detach()
        enabled, fq.enabled = fq.enabled, True
        err = fq(w) - w
        fq.enabled = enabled
        signal, noise = float(w.pow(2).sum()), float(err.pow(2).sum())
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


# --- the phase-switch guard ---------------------------------------------------------------------------
class DivergenceGuard:
    """Watches the training loss across QAT's phase switches (fake quantization starts, ranges freeze,
    BatchNorm freezes). A loss that is not finite, or a median of the last ``patience`` losses above
    ``factor`` times the median of the ``window`` losses before the last switch, is divergence (one noisy
    batch is not): :meth:`update` returns the message once, naming the step, the switch and its likely
    cause; :attr:`diverged` keeps it (for the export).

    >>> guard = DivergenceGuard(window=4, patience=2)
    >>> for step, loss in enumerate([1.0, 0.9, 0.8, 0.7]):
    ...     guard.update(step, loss)
    >>> guard.switch(4, "BatchNorm froze", lr=0.05, peak_lr=0.1)
    >>> guard.update(4, 9.0) is None, guard.update(5, 9.5).split(" against")[0]
    (True, 'QuantizationAwareTraining: the training loss exploded at step 5 (9.5,')
    """

    CAUSES: dict[str, str] = {  # noqa: RUF012 (read-only)
        "fake quantization started": "activation ranges too narrow for the trained model, or too high a "
        "learning rate for the quantized weights: start later or at a lower learning rate",
        "ranges froze": "the frozen ranges clip activations the model still changes: freeze them later",
        "BatchNorm froze": "a BatchNorm frozen at a high learning rate: without batch statistics the network "
        "is not normalized and large steps blow up (a plain fit diverges the same way); set freeze_bn_after "
        "where the learning rate has decayed (the last 10-20% of a OneCycle/cosine schedule) or leave it None",
    }

    def __init__(self, factor: float = 3.0, window: int = 20, patience: int = 5):
        self.factor, self.window, self.patience = factor, window, patience
        self.history: list[float] = []
        self.last_switch: dict[str, Any] | None = None
        self.diverged: dict[str, Any] | None = None

    def switch(self, step: int, what: str, lr: float | None = None, peak_lr: float | None = None) -> None:
        finite = sorted(v for v in self.history[-self.window :] if v == v and abs(v) != float("inf"))
        reference = finite[len(finite) // 2] if finite else None
        self.last_switch = {"step": step, "what": what, "reference": reference, "lr": lr, "peak_lr": peak_lr}

    def update(self, step: int, loss: float) -> str | None:
        self.history = [*self.history[-(max(self.window, self.patience) - 1) :], loss]
        s = self.last_switch
        if self.diverged is not None or s is None:
            return None
        recent = sorted(self.history[-self.patience :])
        finite = loss == loss and abs(loss) != float("inf")
        rising = (
            s["reference"] is not None
            and step - s["step"] + 1 >= self.patience  # only losses after the switch
            and recent[len(recent) // 2] > self.factor * max(s["reference"], 1e-3)
        )
        if finite and not rising:
            return None
        self.diverged = {"step": step, "loss": loss, **{f"after_{k}": v for k, v in s.items()}}
        lr = f" at lr={s['lr']:.3g} ({s['lr'] / s['peak_lr']:.0%} of the peak)" if s["lr"] and s["peak_lr"] else ""
        return (
            f"QuantizationAwareTraining: the training loss exploded at step {step} ({loss:.4g}, against a median "
            f"of {s['reference']} before) {step - s['step']} steps after {s['what']} at step {s['step']}{lr}. "
            f"Likely cause: {self.CAUSES.get(s['what'], 'the phase switch')}. The export refuses this model unless "
            "export_diverged=True"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_switch": self.last_switch, "diverged": self.diverged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.last_switch, self.diverged = state.get("last_switch"), state.get("diverged")
