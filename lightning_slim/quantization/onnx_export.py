"""From a statically fake-quantized model to an ONNX file that ONNX Runtime serves with int8 kernels.

Why a hand-written QDQ graph (and not ``onnxruntime.quantization.quantize_static``): the export
writes the very integers and scales that training simulated, so nothing is re-derived by a
second quantizer (its own rounding, calibration, BN folding or ReLU fusion). Each quantized
layer becomes the pattern ORT fuses at load time (checked in the tests on the optimized graph):

- input ``QuantizeLinear -> DequantizeLinear`` (uint8, the layer's frozen per-tensor range);
- weight ``DequantizeLinear`` of an int8 initializer (per output channel, BN folded in);
- bias ``DequantizeLinear`` of an int32 initializer at scale ``s_input * s_weight`` (what ORT's
  own quantizer writes; the bias rounding it adds is below 1/1000 of an output step);
- then the float ``Conv`` / ``Gemm`` / ``MatMul``, which ORT replaces by ``QLinearConv`` /
  ``QGemm`` / ``MatMulIntegerToFloat`` (a following ReLU is dropped when the next Q has zero
  point 0, which the observers guarantee for ReLU outputs).

Weight-only Linears (``activation_bits=None``: 8- or 4-bit) become ``com.microsoft.MatMulNBits``
nodes with the trained group scales, packed two 4-bit weights per byte, ``accuracy_level=0``
(float activations: exactly what training simulated).

The Q/DQ pairs come from two custom torch ops (:func:`qdq`, :func:`dq`) with ONNX translations
given to ``torch.onnx.export(dynamo=True, custom_translation_table=...)``; in eager mode they
compute the same fake quantization, so the deploy module can be checked against training.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.quantization.functional import _set, fake_quantized_layers, no_mha_fastpath
from lightning_slim.quantization.static import QMAX_U8, ActivationObserver

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


def _contrib_op(name: str, inputs: list[tuple[str, str, bool]], types: dict[str, list[str]], attributes):
    """An ORT contrib op (``com.microsoft``) with a schema written here (``onnx`` ships none for them):
    ``inputs`` as (name, type variable, optional)."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    p, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        name,
        "com.microsoft",
        1,
        inputs=[p(n, t, param_option=optional) if opt else p(n, t) for n, t, opt in inputs],
        outputs=[p("Y", "T1")],
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


def _translations() -> dict:
    from onnxscript import opset18 as op

    nbits, gather = _matmul_nbits_op(), _gather_nbits_op()

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

    def gather_onnx(idx, packed, scales, bits: int, block_size: int):
        # the packed table's zero point is the default 2^(bits-1), as pack_nbits writes it
        return gather(packed, idx, scales, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)

    return {
        torch.ops.lightning_slim.gather_nbits.default: gather_onnx,
        torch.ops.lightning_slim.qdq.default: qdq_onnx,
        torch.ops.lightning_slim.dq.default: dq_onnx,
        torch.ops.lightning_slim.matmul_nbits.default: nbits_onnx,
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


# --- deploy modules ------------------------------------------------------------------------------------
class _QDQ(nn.Module):
    """Input QDQ + int8 weight DQ + int32 bias DQ around ``op``: the pattern ORT fuses."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        scale, zero_point = layer.activation_fake_quantizer.qparams()
        d = layer.deploy_weights()
        n = d["q"].shape[0]
        self.register_buffer("s_in", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("z_in", torch.tensor(zero_point, dtype=torch.uint8))
        self.register_buffer("weight", d["q"].reshape(*d["shape"].tolist()))
        self.register_buffer("s_w", d["scale"])
        self.register_buffer("z_w", torch.zeros(n, dtype=torch.int8))
        self.register_buffer("bias", d["bias_q"])
        self.register_buffer("s_b", d["bias_scale"])
        self.conv = (layer.stride, layer.padding, layer.dilation, layer.groups) if hasattr(layer, "stride") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = qdq(x, self.s_in, self.z_in)
        w, b = dq(self.weight, self.s_w, self.z_w, 0), dq(self.bias, self.s_b, None, 0)
        if self.conv is None:
            return F.linear(x, w, b)
        conv = F.conv1d if w.dim() == 3 else F.conv2d
        return conv(x, w, b, *self.conv)


class _NBits(nn.Module):
    """Weight-only Linear as MatMulNBits (8 or 4 bits, per group)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        fq = layer.weight_fake_quantizer
        d = layer.deploy_weights()
        self.k, self.bits, self.block_size = layer.in_features, fq.bits, fq.group_size
        self.register_buffer("packed", pack_nbits(d["q"], layer.out_features, fq.bits))
        self.register_buffer("scales", d["scale"])
        self.register_buffer("bias", d["bias"].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_nbits(x, self.packed, self.scales, self.bias, self.k, self.bits, self.block_size)


class _Int8Embedding(nn.Module):
    """Embedding with an int8 table, dequantized per row (ORT: DequantizeLinear -> Gather)."""

    def __init__(self, emb: nn.Module):
        super().__init__()
        q, scale = emb.weight_fake_quantizer.quantize(emb.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", torch.zeros_like(scale, dtype=torch.int8))
        self.padding_idx = emb.padding_idx

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, dq(self.weight, self.scale, self.zero, 0), self.padding_idx)


class _NBitsEmbedding(nn.Module):
    """Embedding with a 4-bit table packed two per byte, one scale per group of ``block_size``
    (ORT: ``GatherBlockQuantized``, which dequantizes only the rows it gathers)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        fq = emb.weight_fake_quantizer
        q, scales = fq.quantize(emb.weight)
        self.bits, self.block_size = fq.bits, fq.group_size
        self.register_buffer("packed", pack_nbits(q, emb.num_embeddings, fq.bits).flatten(1))  # (rows, width / 2)
        self.register_buffer("scales", scales.reshape(emb.num_embeddings, -1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return gather_nbits(idx, self.packed, self.scales, self.bits, self.block_size)


def deploy_module(model: nn.Module) -> nn.Module:
    """A copy of a statically fake-quantized ``model`` with each quantized layer replaced by its
    export form (folded BatchNorms become ``Identity``). Runs in torch with the same numerics."""
    model = copy.deepcopy(model).eval()
    names = {id(m): n for n, m in model.named_modules()}
    for name, m in fake_quantized_layers(model).items():
        if isinstance(m, nn.Embedding):
            new = _Int8Embedding(m) if m.weight_fake_quantizer.bits == 8 else _NBitsEmbedding(m)
        elif isinstance(getattr(m, "activation_fake_quantizer", None), ActivationObserver):
            new = _QDQ(m)
        else:
            new = _NBits(m)
        if getattr(m, "folded_bn", None) is not None:
            _set(model, names[id(m.folded_bn)], nn.Identity())
        _set(model, name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def to_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, custom_ops: bool = True) -> Path:
    """``torch.onnx.export(dynamo=True)`` with a dynamic batch dimension (and, for token ids, a
    dynamic sequence dimension); returns the file written.

    Token ids (an integer ``(B, T, ...)`` input, a language model's ``input_ids``) get a dynamic
    ``T`` too: the file serves any prompt length, and the positions' tables (a Llama's rotary
    cos/sin, one ``(T, head_dim)`` pair per layer) are computed in the graph instead of being
    stored as constants. A model whose forward needs one fixed length is exported with that
    length, as before."""
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example.detach().cpu()
    if example.shape[0] < 2:  # a batch of 1 would be specialised
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    table = _translations() if custom_ops else None
    batch = {0: torch.export.Dim("batch")}
    tokens = not example.is_floating_point() and example.dim() >= 2 and example.shape[1] >= 2
    program = None
    with no_mha_fastpath(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's chatter (deprecations, torchvision absent)
        for dims in ([{**batch, 1: torch.export.Dim("seq")}] if tokens else []) + [batch]:
            try:
                program = torch.onnx.export(
                    module.eval(),
                    (example,),
                    dynamo=True,
                    custom_translation_table=table,
                    dynamic_shapes=(dims,),
                    verbose=False,
                )
                break
            except Exception:
                if dims is batch:
                    raise
    program.save(str(path))
    _strip(path)
    return path


def _strip(path: Path) -> None:
    """Drop the exporter's per-node metadata (stack traces with local paths, class names) and
    intermediate shape annotations: on a 5k-parameter model they were 2/3 of the file."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    for item in (*graph.node, *graph.initializer, *graph.input, *graph.output):
        del item.metadata_props[:]
    del graph.value_info[:]
    _compact_biases(graph)
    onnx.save(model, str(path))


def _compact_biases(graph) -> None:
    """Drop the third per-channel table of each int32 bias (4 bytes per output channel, about 2.5%
    of a small transformer's file), bit-identically:

    - a bias that ORT fuses into ``QGemm`` / ``QLinearConv`` keeps its int32 grid, its scale stored
      as ``Mul(weight scale, input scale)`` (the float32 product :func:`bias_scale` computed; ORT
      folds it back into a constant at load, before its QDQ fusion);
    - a bias added after a ``MatMul`` (3-D inputs: ORT runs the product as ``MatMulIntegerToFloat``
      and the ``Add`` in float) becomes the float32 table that its ``DequantizeLinear`` computed at
      every call."""
    from onnx import TensorProto, helper, numpy_helper

    tables = {t.name: t for t in graph.initializer}
    made_by = {out: n for n in graph.node for out in n.output}
    uses: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    nodes, dropped, added, converted = [], set(), [], {}
    for node in graph.node:
        bias = tables.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        users = uses.get(node.output[0], [])
        s_b = tables.get(node.input[1]) if bias is not None else None
        if s_b is None or bias.data_type != TensorProto.INT32 or len(users) != 1 or len(uses[s_b.name]) != 1:
            nodes.append(node)
            continue
        value = numpy_helper.to_array(bias).astype("float32") * numpy_helper.to_array(s_b)
        user = users[0]
        if user.op_type not in ("Gemm", "Conv"):  # float Add: store what the DequantizeLinear computed
            # the exporter shares equal initializers (e.g. zero biases), so a shared int32 table gets
            # one float table per scale and goes only when none of its DequantizeLinears is left
            shared = len(uses[bias.name]) > 1
            table = f"{s_b.name}_float" if shared else bias.name
            added.append(numpy_helper.from_array(value, table))
            dropped.add(s_b.name)
            converted[bias.name] = converted.get(bias.name, 0) + 1
            for j, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[j] = table
            continue
        x_dq, w_dq = (made_by.get(i) for i in user.input[:2])
        s_in, s_w = (tables.get(dq.input[1]) if dq is not None else None for dq in (x_dq, w_dq))
        if s_in is None or s_w is None:
            nodes.append(node)
            continue
        product = numpy_helper.to_array(s_w) * numpy_helper.to_array(s_in)
        if product.shape != numpy_helper.to_array(s_b).shape or (product != numpy_helper.to_array(s_b)).any():
            nodes.append(node)  # not the grid bias_scale() wrote: keep the table
            continue
        derived = f"{s_b.name}_derived"
        nodes += [helper.make_node("Mul", [s_w.name, s_in.name], [derived], name=derived), node]
        node.input[1] = derived
        dropped.add(s_b.name)
    del graph.node[:]
    graph.node.extend(nodes)
    dropped |= {name for name, n in converted.items() if n == len(uses[name])}
    kept = [t for t in graph.initializer if t.name not in dropped] + added
    del graph.initializer[:]
    graph.initializer.extend(kept)


class TensorOutput(nn.Module):
    """``model`` with its output reduced to the logits tensor: a Hugging Face ``ModelOutput`` (and the
    ``DynamicCache`` inside it, which the exporter cannot serialize) becomes what the file returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lightning_slim.modules import output_tensor

        return output_tensor(self.model(x))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write the int8 (QDQ / MatMulNBits) ONNX file of a statically fake-quantized model."""
    module = deploy_module(model)
    with torch.no_grad(), no_mha_fastpath():
        plain = isinstance(module(example), torch.Tensor)
    return to_onnx(module if plain else TensorOutput(module), example, path)  # plain: initializer names as before
