"""Static-activation fake quantization: what ONNX Runtime's int8 kernels compute, simulated in torch.

The ``onnxruntime`` runtime serves QDQ graphs whose integer kernels (QLinearConv, QGemm,
QLinearMatMul, MatMulIntegerToFloat) take

- activations: uint8, one scale and zero point per tensor, fixed at export (static);
- weights: int8, symmetric, one scale per output channel; ``reduce_range`` keeps them in
  [-64, 64] (7 bits), so that AVX2's u8 x s8 kernel (``vpmaddubsw``, which adds two u8*s8
  products into int16) can never saturate: 2 * 255 * 64 = 32640 < 32767. Reducing the
  *activations* to 7 bits instead would not be a guarantee: ``QuantizeLinear`` clamps to
  the dtype's [0, 255], so any input beyond the frozen range would reach 8 bits again;
- weight-only layers (``activation_bits=None``, Linear): 8- or 4-bit symmetric weights per
  group of ``group_size`` inputs, served by ``MatMulNBits`` with float activations.

The layers here are subclasses of the user's ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with
the same Parameter objects (no new state-dict keys); observer statistics live in plain tensor
attributes and reach checkpoints through the callback's ``state_dict``
(:func:`observer_state` / :func:`load_observer_state`).

Numerics: activations ``torch.fake_quantize_per_tensor_affine`` (round half to even, like
``QuantizeLinear``), weights ``torch.fake_quantize_per_channel_affine`` with the integers the
export writes (:meth:`WeightQuantizer.quantize` gives exactly the fake-quantized values back).
A convolution is an ordinary ``F.conv*`` (no im2col): per-tensor quantization of the input equals
per-patch quantization, and zero padding is exact (0 maps to the integer zero point).

>>> import torch
>>> obs = ActivationObserver()
>>> _ = obs.train()(torch.tensor([0.0, 1.0, 2.55]))   # observes, fake quantization still off
>>> obs.enabled = True
>>> scale, zero_point = obs.qparams()
>>> round(scale, 6), zero_point
(0.01, 0)
>>> [round(v, 4) for v in obs.eval()(torch.tensor([0.013, 9.0])).tolist()]  # to the grid, clamped
[0.01, 2.55]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.quantization.conv import bn_factor, rebuild_conv, scale_rows
from lightning_slim.quantization.fake_layer import FakeQuantizedLayer

QMAX_U8 = 255


class ActivationObserver(nn.Module):
    """Per-tensor uint8 range of a layer's input: EMA of batch min/max while training (from the
    first batch on, also during the float warm-up), fixed once :meth:`freeze` is called. Fake
    quantization (``enabled``) uses the current range in training and validation alike. Only
    training batches move the range: an evaluation before the first one (Lightning's sanity
    check, another callback's probe with ``example_input_array``) runs unquantized."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum, self.enabled, self.frozen = momentum, False, False
        self.min_val: torch.Tensor | None = None  # plain attributes: not in the model's state dict
        self.max_val: torch.Tensor | None = None
        self.recording: Callable[[], bool] | None = None  # when to observe; None: in train mode

    def observing(self) -> bool:
        """Whether this call moves the range: ``recording()`` when set (the callback sets "inside the
        user's training step", whatever mode the model is in), else train mode."""
        return not self.frozen and (self.recording() if self.recording is not None else self.training)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().amin().float(), x.detach().amax().float()
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.momentum * (lo - self.min_val)
            self.max_val = self.max_val + self.momentum * (hi - self.max_val)

    @property
    def active(self) -> bool:
        """Fake-quantizing: enabled and a range observed (no training batch yet, e.g. in a sanity check: float)."""
        return self.enabled and self.min_val is not None

    def qparams(self) -> tuple[float, int]:
        """(scale, zero point) as the export writes them: the range always contains 0 (exact
        zero padding; a ReLU output gets zero point 0, which lets ORT drop the ReLU)."""
        if self.min_val is None:
            raise RuntimeError(
                "the activation observer has seen no batch yet (it records inside the training step, or in "
                "train mode outside a Trainer: run a forward pass there first)"
            )
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        scale = float(torch.tensor((hi - lo) / QMAX_U8, dtype=torch.float32)) or 1.0
        return scale, int(min(max(round(-lo / scale), 0), QMAX_U8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing():
            self.observe(x)
        if not self.active:
            return x
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, QMAX_U8)

    def freeze(self) -> None:
        self.qparams()  # fails clearly if nothing was observed
        self.frozen = True


class WeightQuantizer(nn.Module):
    """Symmetric weight fake quantization: per output channel, or per group of ``group_size``
    inputs (rows padded with zeros to a whole number of groups, as ``MatMulNBits`` does)."""

    def __init__(self, bits: int = 8, reduce_range: bool = True, group_size: int | None = None):
        super().__init__()
        self.bits, self.group_size, self.enabled = bits, group_size, False
        self.qmax = 2 ** (bits - 1) - 1 if bits != 8 or not reduce_range else 64
        self.scale: torch.Tensor | None = None  # set when frozen

    @property
    def frozen(self) -> bool:
        return self.scale is not None

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        rows = w.reshape(w.shape[0], -1)
        if self.group_size is None:
            return rows
        pad = -rows.shape[1] % self.group_size
        return F.pad(rows, (0, pad)).reshape(-1, self.group_size)

    def compute_scale(self, w: torch.Tensor) -> torch.Tensor:
        amax = self._rows(w).detach().abs().amax(1)
        return torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax)).float()

    def _fake(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows = self._rows(w)
        zero = torch.zeros(rows.shape[0], dtype=torch.int32, device=w.device)
        out = torch.fake_quantize_per_channel_affine(rows, scale.to(w.device), zero, 0, -self.qmax, self.qmax)
        width = w[0].numel()
        return out.reshape(w.shape[0], -1)[:, :width].reshape(w.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fake_with_scale(w)[0]

    def fake_with_scale(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.enabled:
            return w, None
        scale = self.scale if self.frozen else self.compute_scale(w)
        return self._fake(w, scale), scale

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integers as int8 rows/groups, scales) with ``integers * scales == forward(w)`` exactly."""
        scale = self.scale if self.frozen else self.compute_scale(w)
        rows = self._rows(w.float())
        q = torch.clamp(torch.round(rows * (1.0 / scale[:, None])), -self.qmax, self.qmax)
        return q.to(torch.int8), scale


def bias_scale(weight_scale: torch.Tensor, input_scale: float) -> torch.Tensor:
    """The int32 bias grid of QLinearConv / QGemm: input scale x weight scale (per channel)."""
    return weight_scale * torch.tensor(input_scale, dtype=torch.float32, device=weight_scale.device)


def quantize_bias(b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(b / scale)


class _StaticMixin(FakeQuantizedLayer):
    """Shared forward pieces: fake-quantized input, weight and bias; a BatchNorm right after a conv
    is folded the standard QAT way (weight scaled by gamma/sqrt(var+eps) before quantization, the
    output divided back, the user's BN then runs as usual).

    With fake quantization on and the BN using running statistics (validation, or after
    ``freeze_bn_after``), the output is arranged so that the user's BN produces exactly the export's
    ``conv(x, W_folded) + round(b_folded / (s_x s_w)) s_x s_w``: rounding the bias to ORT's int32
    grid moves about one activation in 500 by one step, so it is simulated too."""

    channels_last = False  # output channels on the last dimension (Linear), else the second (conv)

    def _setup_static(self, weight_quantizer: WeightQuantizer, activations: nn.Module | None, bn) -> None:
        self.weight_fake_quantizer = weight_quantizer
        self.activation_fake_quantizer = activations  # ActivationObserver, dynamic.TokenQuantizer, or None
        self._slim_bn = (bn,) if bn is not None else ()  # a tuple: the BN stays the user's submodule

    @property
    def folded_bn(self) -> nn.Module | None:
        return self._slim_bn[0] if self._slim_bn else None

    def _factor(self) -> torch.Tensor | None:
        bn = self.folded_bn
        return bn_factor(bn) if bn is not None else None

    def quant_weight(self) -> torch.Tensor:
        """The (BN-scaled) weight the weight quantizer sees."""
        f = self._factor()
        return self.weight if f is None else scale_rows(self.weight, f)

    def folded_bias(self) -> torch.Tensor:
        """The bias the export writes: the conv's, with the BN (running statistics) folded in."""
        bias = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0], device=self.weight.device)
        bn = self.folded_bn
        if bn is None:
            return bias
        return (bias - bn.running_mean) * bn_factor(bn) + (bn.bias if bn.affine else 0.0)

    def _static_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        aq = self.activation_fake_quantizer
        if aq is not None:
            x = aq(x)
        w, w_scale = self.weight_fake_quantizer.fake_with_scale(self.quant_weight())
        y = op(x, w)
        shape = (-1,) if self.channels_last else (1, -1, *[1] * (y.dim() - 2))
        bn, f = self.folded_bn, self._factor()
        static_range = isinstance(aq, ActivationObserver) and aq.active and w_scale is not None
        exact = static_range and (bn is None or not bn.training)
        if not exact:  # float warm-up, weight-only, dynamic activations (float bias), or BN on batch statistics
            if f is not None:
                y = y / torch.where(f == 0, torch.ones_like(f), f).reshape(shape)
            return y if self.bias is None else y + self.bias.reshape(shape)
        b = self.folded_bias()
        s_b = bias_scale(w_scale, aq.qparams()[0])
        y = y + (b + (quantize_bias(b, s_b) * s_b - b).detach()).reshape(shape)  # straight-through
        if bn is None:
            return y
        shift = bn.bias if bn.affine else torch.zeros_like(f)  # undo the BN the user's module applies next
        return (y - shift.reshape(shape)) / torch.where(f == 0, torch.ones_like(f), f).reshape(
            shape
        ) + bn.running_mean.reshape(shape)

    def deploy_weights(self) -> dict[str, torch.Tensor]:
        """What the export writes: integer weight and its scales (BN folded in); the folded bias as
        float and, for layers with an activation range, as int32 on the ``bias_scale`` grid."""
        with torch.no_grad():
            w, b = self.quant_weight().detach(), self.folded_bias().detach()
        q, scale = self.weight_fake_quantizer.quantize(w)
        out = {"q": q, "scale": scale, "bias": b, "shape": torch.tensor(w.shape)}
        if isinstance(self.activation_fake_quantizer, ActivationObserver):
            out["bias_scale"] = bias_scale(scale, self.activation_fake_quantizer.qparams()[0])
            out["bias_q"] = quantize_bias(b, out["bias_scale"]).to(torch.int32)
        return out

    def to_float(self) -> nn.Module:
        """The plain layer again, sharing this module's parameters."""
        return rebuild(self, next(base for base, cls in STATIC.items() if isinstance(self, cls)))


class StaticLinear(_StaticMixin, nn.Linear):
    channels_last = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._static_forward(x, lambda a, w: F.linear(a, w))


class StaticConv1d(_StaticMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._static_forward(x, lambda a, w: self._conv_forward(a, w, None))


class StaticConv2d(_StaticMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._static_forward(x, lambda a, w: self._conv_forward(a, w, None))


class StaticEmbedding(FakeQuantizedLayer, nn.Embedding):
    """Weight-only int8 embedding (one scale per row)."""

    def quant_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            idx,
            self.weight_fake_quantizer(self.weight),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def to_float(self) -> nn.Module:
        return rebuild(self, nn.Embedding)


STATIC = {nn.Linear: StaticLinear, nn.Conv1d: StaticConv1d, nn.Conv2d: StaticConv2d, nn.Embedding: StaticEmbedding}


def rebuild(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance holding ``module``'s Parameter objects (and hooks, mode)."""
    if issubclass(cls, nn.Embedding):
        new = cls(
            module.num_embeddings,
            module.embedding_dim,
            module.padding_idx,
            module.max_norm,
            module.norm_type,
            module.scale_grad_by_freq,
            module.sparse,
            device="meta",
        )
        new.weight = module.weight
    elif issubclass(cls, nn.Linear):
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
    else:
        return rebuild_conv(module, cls)
    new._forward_hooks, new._forward_pre_hooks = module._forward_hooks, module._forward_pre_hooks
    new.train(module.training)
    return new


def fake_quantize_static(
    module: nn.Module, weight_quantizer: WeightQuantizer, activations: nn.Module | None, bn: nn.Module | None = None
) -> nn.Module:
    new = rebuild(module, next(cls for base, cls in STATIC.items() if isinstance(module, base)))
    if isinstance(new, nn.Embedding):
        new.weight_fake_quantizer, new.activation_fake_quantizer = weight_quantizer, None
    else:
        new._setup_static(weight_quantizer, activations, bn)
    return new


# --- observer state for checkpoints / DDP ----------------------------------------------------------
def _observers(layers: dict[str, nn.Module]) -> dict[str, ActivationObserver]:
    return {
        n: m.activation_fake_quantizer
        for n, m in layers.items()
        if isinstance(getattr(m, "activation_fake_quantizer", None), ActivationObserver)
    }


def observer_state(layers: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Every activation observer's range (and whether it is frozen): the callback saves this."""
    return {
        n: {
            "min": o.min_val.detach().cpu().clone(),
            "max": o.max_val.detach().cpu().clone(),
            "frozen": torch.tensor(o.frozen),
        }
        for n, o in _observers(layers).items()
        if o.min_val is not None
    }


def load_observer_state(layers: dict[str, nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
    observers = _observers(layers)
    for name, s in state.items():
        if name not in observers:
            raise KeyError(f"activation range for {name!r}, which is not a statically quantized layer of the model")
        o = observers[name]
        o.min_val, o.max_val, o.frozen = s["min"].clone(), s["max"].clone(), bool(s["frozen"])


def average_observers(layers: dict[str, nn.Module], reduce_mean) -> None:
    """Make every rank's ranges equal (``reduce_mean`` averages a tensor over ranks; EMAs are linear,
    so this is the EMA of the ranks' averaged batch statistics)."""
    observers = [o for o in _observers(layers).values() if o.min_val is not None and not o.frozen]
    if not observers:
        return
    flat = reduce_mean(torch.stack([t for o in observers for t in (o.min_val, o.max_val)]))
    for i, o in enumerate(observers):
        o.min_val, o.max_val = flat[2 * i].clone(), flat[2 * i + 1].clone()


def record_when(layers: dict[str, nn.Module], recording: Callable[[], bool] | None) -> None:
    """Make every activation observer of ``layers`` record when ``recording()`` holds (None: in train mode)."""
    for o in _observers(layers).values():
        o.recording = recording


def _always() -> bool:
    return True


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> None:
    """Post-training ranges: run ``batches`` (input tensors, or dicts of keyword inputs) through
    ``model`` in eval mode (BatchNorm statistics untouched) with every activation observer recording."""
    from lightning_slim.modules import evaluating

    observers = [m for m in model.modules() if isinstance(m, ActivationObserver)]
    before = [o.recording for o in observers]
    for o in observers:
        o.recording = _always
    try:
        with evaluating(model):
            for x in batches:
                model(**x) if isinstance(x, dict) else model(x)
    finally:
        for o, recording in zip(observers, before):
            o.recording = recording
