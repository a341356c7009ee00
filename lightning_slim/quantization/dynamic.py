"""Dynamic per-token activations for the onnxruntime runtime (``activation_mode="dynamic"``).

Static per-tensor ranges (the default) cannot follow a pretrained transformer's activations: one
range per tensor, fixed at export, is far too coarse for rows whose magnitudes differ by orders
(measured on all-MiniLM-L6-v2, PTQ on its validation sentences: static uint8 activations and 8-bit
weights keep the sentence embeddings at cosine 0.9934 to fp32; per-token uint8 ranges at 0.9991).
Here each row (token) of a Linear's input gets its own uint8 range, computed at run time:

    lo = min(min(x_row), 0), hi = max(max(x_row), 0), s = (hi - lo) / 255 (1 where 0)
    z = clamp(round(-lo / s), 0, 255), q = clamp(round(x / s) + z, 0, 255)   (round half to even)
    y = s * ((q @ W_int8.T) * s_w) - (s * z) * (colsum(W_int8) * s_w) + b

ORT has no per-row zero point or scale in its integer products, so the export writes this graph by
hand: ``QuantizeLinear`` per row (``axis=0``: one pass; it divides, as here, and rounds half to even:
checked bit for bit against torch), ORT's ``MatMulIntegerToFloat`` on uint8 x int8 (its fast kernel,
no zero points, the weight scales fused), then the row scale and the zero point's correction (a
rank-1 ``Gemm`` holding the bias). The integers are exact, so the ONNX graph computes what training
simulated up to the float rounding of the last products.

Rows never clip (their range holds every value), so the straight-through gradient is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

QMAX_U8 = 255


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, z, s)``: uint8 values (as floats), zero points and scales of each row of ``x`` (last dim)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(-1, keepdim=True).clamp(min=0.0)
    s = (hi - lo) / QMAX_U8
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.clamp(torch.round(-lo / s), 0, QMAX_U8)
    q = torch.clamp(torch.round(x / s) + z, 0, QMAX_U8)
    return q, z, s


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` on its rows' uint8 grids, with a straight-through gradient."""
    with torch.no_grad():
        q, z, s = quantize_rows(x.detach())
        grid = (q - z) * s
    return x + (grid - x).detach()


class TokenQuantizer(nn.Module):
    """The activation quantizer of a Linear under ``activation_mode="dynamic"``: per-row uint8 ranges
    computed from each call's input (nothing to observe, calibrate or freeze)."""

    def __init__(self):
        super().__init__()
        self.enabled = False

    @property
    def active(self) -> bool:
        return self.enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_rows(x) if self.enabled else x


def dynamic_linear_reference(
    x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """What the exported graph computes, in torch: ``x`` quantized per row, times the int8 weight."""
    q, z, s = quantize_rows(x)
    return torch.nn.functional.linear((q - z) * s, weight_q.float() * weight_scale[:, None], bias)
