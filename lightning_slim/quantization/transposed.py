"""transformers' ``Conv1D`` (GPT-2's projections) quantized as the Linear it is.

``Conv1D(nf, nx)`` computes ``x @ W + b`` with ``W`` stored ``(in, out)``: a Linear whose weight is
transposed. Both runtimes quantize it through :meth:`quant_weight`, which gives the ``(out, in)``
view ``W.t()`` (a view: gradients reach the user's parameter), so per-output-channel scales, the
int8 export (a ``Gemm``/``MatMul`` of ``(out, in)`` int8 rows in ONNX, an ``nn.Linear`` of torchao
int8 weights) and every range/error helper are exactly the Linear ones. The user's ``Parameter``
objects and state-dict keys (``weight``, ``bias``) are kept; :meth:`to_float` gives the
``Conv1D`` back. transformers is never imported here: the class comes from the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.quantization.fake_layer import FakeQuantizedLayer
from lightning_slim.quantization.static import WeightQuantizer, _StaticMixin


class _Transposed(FakeQuantizedLayer, nn.Module):
    """The parameters and shape of a ``Conv1D``, and the way back to it."""

    def _take(self, conv1d: nn.Module) -> None:
        self.weight, self.bias = conv1d.weight, conv1d.bias  # the same Parameter objects
        self._slim_float_class = type(conv1d)
        self._forward_hooks, self._forward_pre_hooks = conv1d._forward_hooks, conv1d._forward_pre_hooks
        self.train(conv1d.training)

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def quant_weight(self) -> torch.Tensor:
        """The weight as ``(out, in)`` rows, what the weight quantizer sees (and the export writes)."""
        return self.weight.t()

    def to_float(self) -> nn.Module:
        """The user's ``Conv1D`` again, holding this module's parameters."""
        with torch.device("meta"):
            plain = self._slim_float_class(self.out_features, self.in_features)
        plain.weight, plain.bias = self.weight, self.bias
        plain._forward_hooks, plain._forward_pre_hooks = self._forward_hooks, self._forward_pre_hooks
        plain.train(self.training)
        return plain


class StaticTransposedLinear(_StaticMixin, _Transposed):
    """``Conv1D`` with the onnxruntime numerics of :class:`~.static.StaticLinear`."""

    channels_last = True
    quant_weight = _Transposed.quant_weight  # (not the mixin's: no BatchNorm folds into a Linear)
    to_float = _Transposed.to_float

    def __init__(self, conv1d: nn.Module, weight_quantizer: WeightQuantizer, activations: nn.Module | None):
        super().__init__()
        self._take(conv1d)
        self._setup_static(weight_quantizer, activations, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._static_forward(x, lambda a, w: F.linear(a, w))


class TorchaoTransposedLinear(_Transposed):
    """``Conv1D`` with torchao's fake quantizers (the numerics of its ``FakeQuantizedLinear``)."""

    def __init__(self, conv1d: nn.Module, activation_config, weight_config):
        from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

        super().__init__()
        self._take(conv1d)
        self.activation_fake_quantizer = (
            FakeQuantizerBase.from_config(activation_config) if activation_config is not None else None
        )
        self.weight_fake_quantizer = FakeQuantizerBase.from_config(weight_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return F.linear(x, self.weight_fake_quantizer(self.quant_weight()), self.bias)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding a copy of the ``(out, in)`` weight (for the int8 conversion)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.quant_weight().detach().contiguous().clone(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear
