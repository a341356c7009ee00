"""The custom torch ops of the int8 export and their ONNX translations.

In eager mode each op computes what training simulated (a fake quantization, a dequantization, a
weight-only product of packed 4/8-bit groups, a gather from a packed table, a Linear on per-token
uint8 activations), so the deploy module
can be checked against training in torch; ``torch.onnx.export(dynamo=True,
custom_translation_table=translations())`` writes them as ``QuantizeLinear`` / ``DequantizeLinear``
and ORT's contrib ops ``MatMulNBits`` / ``GatherBlockQuantized``, or (per-token activations) a
hand-built ``MatMulInteger`` graph.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.nn.functional as F

from lightning_slim.quantization.static import QMAX_U8

NBITS_ACCURACY_LEVEL = 0  # float activations in MatMulNBits: the numerics weight-only QAT simulates


# --- the custom ops (eager = the fake quantization; ONNX = QuantizeLinear / DequantizeLinear) -----------
@torch.library.custom_op("lightning_slim::qdq", mutates_args=())
def qdq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), 0, QMAX_U8)


@qdq.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("lightning_slim::dq", mutates_args=())
def dq(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, axis: int) -> torch.Tensor:
    shape = [-1 if i == axis else 1 for i in range(q.dim())]
    q = q.float() if zero_point is None else q.float() - zero_point.float().reshape(shape)
    return q * scale.reshape(shape)


@dq.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("lightning_slim::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, k: int, bits: int, block_size: int
) -> torch.Tensor:
    return F.linear(x, unpack_nbits(packed, scales, k, bits, block_size), bias)


@matmul_nbits.register_fake
def _(x, packed, scales, bias, k, bits, block_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("lightning_slim::gather_nbits", mutates_args=())
def gather_nbits(
    idx: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    blocks = scales.shape[1]
    table = unpack_nbits(packed.reshape(packed.shape[0], blocks, -1), scales, blocks * block_size, bits, block_size)
    return F.embedding(idx, table)


@gather_nbits.register_fake
def _(idx, packed, scales, bits, block_size):
    return scales.new_empty(*idx.shape, scales.shape[1] * block_size)


@torch.library.custom_op("lightning_slim::dynamic_linear", mutates_args=())
def dynamic_linear(
    x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, colsum_scaled: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    from lightning_slim.quantization.dynamic import dynamic_linear_reference

    return dynamic_linear_reference(x, weight_q, weight_scale, bias)


@dynamic_linear.register_fake
def _(x, weight_q, weight_scale, colsum_scaled, bias):
    return x.new_empty(*x.shape[:-1], weight_q.shape[0])


def _contrib_op(
    name: str, inputs: list[tuple[str, str, bool]], types: dict[str, list[str]], attributes, output: str = "T1"
):
    """An ORT contrib op (``com.microsoft``) with a schema written here (``onnx`` ships none for them):
    ``inputs`` as (name, type variable, optional), ``output`` the output's type variable."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    p, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        name,
        "com.microsoft",
        1,
        inputs=[p(n, t, param_option=optional) if opt else p(n, t) for n, t, opt in inputs],
        outputs=[p("Y", output)],
        type_constraints=[(t, allowed, "") for t, allowed in types.items()],
        attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in attributes],
    )
    return Op(Opset("com.microsoft", 1), name, schema)


def _gather_nbits_op():
    return _contrib_op(
        "GatherBlockQuantized",
        [("data", "T2", False), ("indices", "Tind", False), ("scales", "T1", False), ("zero_points", "T2", True)],
        {"T1": ["tensor(float)"], "T2": ["tensor(uint8)"], "Tind": ["tensor(int32)", "tensor(int64)"]},
        ("gather_axis", "quantize_axis", "block_size", "bits"),
    )


def _matmul_nbits_op():
    return _contrib_op(
        "MatMulNBits",
        [
            ("A", "T1", False),
            ("B", "T2", False),
            ("scales", "T1", False),
            ("zero_points", "T3", True),
            ("g_idx", "T4", True),
            ("bias", "T1", True),
        ],
        {
            "T1": ["tensor(float)"],
            "T2": ["tensor(uint8)"],
            "T3": ["tensor(uint8)", "tensor(float)"],
            "T4": ["tensor(int32)"],
        },
        ("K", "N", "bits", "block_size", "accuracy_level"),
    )


def _matmul_integer_to_float_op():
    return _contrib_op(
        "MatMulIntegerToFloat",
        [
            ("A", "T1", False),
            ("B", "T2", False),
            ("a_scale", "T3", False),
            ("b_scale", "T3", False),
            ("a_zero_point", "T1", True),
            ("b_zero_point", "T2", True),
            ("bias", "T3", True),
        ],
        {"T1": ["tensor(uint8)"], "T2": ["tensor(int8)"], "T3": ["tensor(float)"]},
        (),
        output="T3",
    )


def translations() -> dict:
    from onnxscript import opset18 as op

    nbits, gather, int_to_float = _matmul_nbits_op(), _gather_nbits_op(), _matmul_integer_to_float_op()

    def qdq_onnx(x, scale, zero_point):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def dq_onnx(q, scale, zero_point, axis: int):
        if zero_point is None:  # int32 biases: ORT fuses them without one (QGemm needs the weights')
            return op.DequantizeLinear(q, scale, axis=axis)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    def nbits_onnx(x, packed, scales, bias, k: int, bits: int, block_size: int):
        return nbits(
            x,
            packed,
            scales,
            None,
            None,
            bias,
            K=k,
            N=packed.shape[0],
            bits=bits,
            block_size=block_size,
            accuracy_level=NBITS_ACCURACY_LEVEL,
        )

    def dynamic_onnx(x, weight_q, weight_scale, colsum_scaled, bias):
        # per-row uint8 ranges (see dynamic.py): quantized in one pass, multiplied on ORT's u8 x s8 kernel
        rows = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))
        zero, top = op.Constant(value_float=0.0), op.Constant(value_float=float(QMAX_U8))
        lo = op.Min(op.ReduceMin(rows, op.Constant(value_ints=[1]), keepdims=1), zero)
        hi = op.Max(op.ReduceMax(rows, op.Constant(value_ints=[1]), keepdims=1), zero)
        s = op.Div(op.Sub(hi, lo), top)
        s = op.Where(op.Equal(s, zero), op.Constant(value_float=1.0), s)  # (rows, 1)
        z = op.Clip(op.Round(op.Div(op.Neg(lo), s)), zero, top)
        flat = op.Constant(value_ints=[-1])
        q = op.QuantizeLinear(rows, op.Reshape(s, flat), op.Cast(op.Reshape(z, flat), to=2), axis=0)  # uint8
        out = int_to_float(q, op.Transpose(weight_q, perm=[1, 0]), op.Constant(value_float=1.0), weight_scale)
        # s * (q W) s_w  -  (s z) (colsum(W) s_w)  +  b: the zero point's correction is a rank-1 Gemm
        y = op.Add(op.Mul(out, s), op.Gemm(op.Mul(s, z), colsum_scaled, bias, alpha=-1.0, beta=1.0))
        return op.Reshape(y, op.Concat(op.Shape(x, start=0, end=-1), op.Shape(weight_q, start=0, end=1), axis=0))

    def gather_onnx(idx, packed, scales, bits: int, block_size: int):
        # the packed table's zero point is the default 2^(bits-1), as pack_nbits writes it
        return gather(packed, idx, scales, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)

    return {
        torch.ops.lightning_slim.gather_nbits.default: gather_onnx,
        torch.ops.lightning_slim.qdq.default: qdq_onnx,
        torch.ops.lightning_slim.dq.default: dq_onnx,
        torch.ops.lightning_slim.matmul_nbits.default: nbits_onnx,
        torch.ops.lightning_slim.dynamic_linear.default: dynamic_onnx,
    }


# --- packing for MatMulNBits ------------------------------------------------------------------------------
def pack_nbits(q: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Signed group integers (n * blocks, block) -> MatMulNBits' B: unsigned (default zero point
    2^(bits-1)), (n, blocks, block * bits / 8) uint8, 4-bit values two per byte, low nibble first."""
    u = (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8).reshape(n, -1, q.shape[-1])
    return u if bits == 8 else u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nbits(packed: torch.Tensor, scales: torch.Tensor, k: int, bits: int, block_size: int) -> torch.Tensor:
    u = packed if bits == 8 else torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)
    w = (u.float() - 2 ** (bits - 1)) * scales.reshape(*u.shape[:2], 1)
    return w.reshape(u.shape[0], -1)[:, :k]


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


@contextlib.contextmanager
def silent_exporter():
    """Quiet ``torch.onnx.export`` while it runs: its warnings (deprecations) and the four
    "torchvision is not installed. Skipping torchvision::<op>" lines it logs per export (torchvision
    is an optional dependency nobody here needs). Other log records pass."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _NoTorchvisionNotice()
    logger.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(notice)
