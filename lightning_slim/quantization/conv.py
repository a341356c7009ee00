"""Convolutions for QAT and their int8 form: the one place that decides how convs are quantized.

Choice (see README.md): torchao's QAT covers ``nn.Linear``/``nn.Embedding`` only; its graph
flow (``torchao.quantization.pt2e``) captures the whole model into a new ``GraphModule``
(fixed shapes, new module structure and state-dict keys: the user's LightningModule and its
checkpoints would no longer match), and ``torch.ao.quantization`` eager QAT is deprecated.
So a Conv1d/Conv2d is computed as im2col (``F.unfold``) + a matrix product, which makes it a
Linear over patches: training fake-quantizes patches per row and weights per output channel
with torchao's own ``IntxFakeQuantizer``, and the export runs the same product through
torchao's ``Int8Tensor`` int8 GEMM. Train-time numerics equal deploy-time numerics.

A BatchNorm right after the conv is folded the standard QAT way (Jacob et al. 2018,
Krishnamoorthi 2018): the weight is scaled by ``gamma / sqrt(running_var + eps)`` before
fake quantization and the product divided by it again, so once BN statistics freeze the
trained network computes exactly what the folded int8 export computes.

Parameters keep their identity and the state-dict keys do not change, so optimizers,
DDP, pruning masks and plain-model checkpoints keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.core import sharding
from lightning_slim.quantization.fake_layer import FakeQuantizedLayer

CONV_TYPES = (nn.Conv1d, nn.Conv2d)


def check_conv(name: str, conv: nn.Module) -> None:
    """Raise a clear error for convolutions the im2col flow does not handle."""
    if conv.groups != 1:
        raise ValueError(
            f"layer {name!r}: groups={conv.groups} convolutions are not supported (groups=1 only); add it to `exclude`"
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"layer {name!r}: padding_mode={conv.padding_mode!r} is not supported ('zeros' only); add it to `exclude`"
        )
    if isinstance(conv.padding, str) and conv.padding != "valid":
        raise ValueError(
            f"layer {name!r}: padding={conv.padding!r} is not supported (integers or 'valid'); add it to `exclude`"
        )


def _geometry(conv: nn.Module):
    """kernel/stride/padding/dilation as 2-d tuples (a Conv1d is a 1 x k Conv2d)."""
    pad = (0,) * len(conv.kernel_size) if conv.padding == "valid" else conv.padding
    if isinstance(conv, nn.Conv1d):
        return ((1, conv.kernel_size[0]), (1, conv.stride[0]), (0, pad[0]), (1, conv.dilation[0]))
    return tuple(conv.kernel_size), tuple(conv.stride), tuple(pad), tuple(conv.dilation)


def unfold_patches(x: torch.Tensor, geometry, one_d: bool):
    """Patches as rows: (B, L, C*k) plus the output spatial shape.

    Strided views (``Tensor.unfold``) and one copy; ``F.unfold``'s im2col kernel measured
    10-1000x slower here on (256, 32, 1, 40) inputs."""
    kernel, stride, padding, dilation = geometry
    x4 = x.unsqueeze(2) if one_d else x
    if any(padding):
        x4 = F.pad(x4, (padding[1], padding[1], padding[0], padding[0]))
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    p = x4.unfold(2, span[0], stride[0]).unfold(3, span[1], stride[1])  # (B, C, H', W', span_h, span_w)
    p = p[..., :: dilation[0], :: dilation[1]]
    b, c, out_h, out_w = p.shape[:4]
    cols = p.permute(0, 2, 3, 1, 4, 5).reshape(b, out_h * out_w, c * kernel[0] * kernel[1])
    return cols, ((out_w,) if one_d else (out_h, out_w))


def bn_factor(bn: nn.Module) -> torch.Tensor:
    """gamma / sqrt(running_var + eps): what folding BN into the conv multiplies weights by.

    FSDP2, outside a forward: gamma is this rank's block of channels (a ``DTensor``) while the running
    statistics are whole buffers; each rank takes its block of them (nothing sent)."""
    if not bn.affine:
        return torch.rsqrt(bn.running_var + bn.eps)
    return torch.rsqrt(sharding.place_like(bn.running_var, bn.weight) + bn.eps) * bn.weight


def scale_rows(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``w`` with each output channel (row) multiplied by ``factor``'s entry (placed as ``w``'s rows under FSDP2)."""
    return w * sharding.place_like(factor, w).reshape(-1, *[1] * (w.dim() - 1))


def folded_weight_bias(conv: nn.Module, bn: nn.Module | None):
    """The conv's weight and bias with a following BatchNorm folded in (inference form)."""
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    if bn is None:
        return w, b
    f = bn_factor(bn).detach()
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(f)
    return scale_rows(w, f), (b - bn.running_mean) * f + shift


class _FakeQuantizedConvMixin(FakeQuantizedLayer):
    """Conv forward as unfold + matmul with fake-quantized patches and weights."""

    def _setup_qat(self, activation_config, weight_config, bn: nn.Module | None) -> None:
        from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

        self.activation_fake_quantizer = (
            FakeQuantizerBase.from_config(activation_config) if activation_config is not None else None
        )
        self.weight_fake_quantizer = FakeQuantizerBase.from_config(weight_config)
        # a tuple so the BN stays the user's submodule (not ours): same state-dict keys
        self._slim_bn = (bn,) if bn is not None else ()

    @property
    def folded_bn(self) -> nn.Module | None:
        return self._slim_bn[0] if self._slim_bn else None

    def quant_weight(self) -> torch.Tensor:
        """The (BN-scaled) weight as 2-d rows, the tensor the weight fake quantizer sees."""
        w = self.weight
        bn = self.folded_bn
        if bn is not None:
            w = scale_rows(w, bn_factor(bn))
        return w.reshape(w.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight_fake_quantizer.enabled:  # warm-up: the ordinary convolution
            return self._conv_forward(x, self.weight, self.bias)
        wq = self.weight_fake_quantizer(self.quant_weight())
        cols, spatial = unfold_patches(x, _geometry(self), isinstance(self, nn.Conv1d))
        if self.activation_fake_quantizer is not None:
            cols = self.activation_fake_quantizer(cols)
        y = cols @ wq.t()  # (B, L, out)
        bn = self.folded_bn
        if bn is not None:  # undo the scaling; the user's BN then runs as usual
            f = bn_factor(bn)
            y = y / torch.where(f == 0, torch.ones_like(f), f)
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2).reshape(x.shape[0], -1, *spatial)

    def to_float(self) -> nn.Module:
        """The plain conv again, sharing this module's parameters."""
        base = nn.Conv1d if isinstance(self, nn.Conv1d) else nn.Conv2d
        return rebuild_conv(self, base)


class FakeQuantizedConv1d(_FakeQuantizedConvMixin, nn.Conv1d):
    pass


class FakeQuantizedConv2d(_FakeQuantizedConvMixin, nn.Conv2d):
    pass


def rebuild_conv(conv: nn.Module, cls: type) -> nn.Module:
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    new.weight, new.bias = conv.weight, conv.bias  # same Parameter objects
    new._forward_hooks, new._forward_pre_hooks = conv._forward_hooks, conv._forward_pre_hooks
    new.train(conv.training)
    return new


def fake_quantize_conv(conv: nn.Module, activation_config, weight_config, bn: nn.Module | None) -> nn.Module:
    cls = FakeQuantizedConv1d if isinstance(conv, nn.Conv1d) else FakeQuantizedConv2d
    new = rebuild_conv(conv, cls)
    new._setup_qat(activation_config, weight_config, bn)
    return new


class Int8Conv(nn.Module):
    """A deployable int8 convolution: im2col + torchao's int8 dynamic-activation GEMM.

    ``linear`` holds the (BN-folded) weight as a torchao ``Int8Tensor`` of shape (out, C*k).
    """

    def __init__(self, linear: nn.Linear, geometry, one_d: bool):
        super().__init__()
        self.linear, self.geometry, self.one_d = linear, tuple(tuple(g) for g in geometry), one_d

    @property
    def weight(self) -> torch.Tensor:
        """The int8 patch weight: models read a conv's ``weight`` (HF ViT asks its dtype for the input)."""
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols, spatial = unfold_patches(x, self.geometry, self.one_d)
        return self.linear(cols).transpose(1, 2).reshape(x.shape[0], -1, *spatial)


def conv_to_int8(conv: nn.Module, quantize_linear) -> nn.Module:
    """Fold the BN (if any) into ``conv`` and return an ``Int8Conv``; the caller replaces the BN
    by ``nn.Identity``. ``quantize_linear(linear, module)`` turns the patch Linear into int8."""
    w, b = folded_weight_bias(conv, getattr(conv, "folded_bn", None))
    linear = nn.Linear(w[0].numel(), w.shape[0])
    linear.weight = nn.Parameter(w.reshape(w.shape[0], -1).clone(), requires_grad=False)
    linear.bias = nn.Parameter(b.clone(), requires_grad=False)
    return Int8Conv(quantize_linear(linear, conv), _geometry(conv), isinstance(conv, nn.Conv1d))
