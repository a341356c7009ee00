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
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.quantization.dynamic import TokenQuantizer
from lightning_slim.quantization.export_call import ExportCall, GraphCall, as_export_call, dynamic_shapes, two_rows
from lightning_slim.quantization.functional import (
    fake_quantized_layers,
    full_range_weights,
    no_mha_fastpath,
    set_module,
)
from lightning_slim.quantization.onnx_ops import (
    dq,
    dynamic_linear,
    gather_nbits,
    matmul_nbits,
    pack_nbits,
    qdq,
    silent_exporter,
    translations,
)
from lightning_slim.quantization.static import ActivationObserver


# --- deploy modules ------------------------------------------------------------------------------------
class _Int8Weight(nn.Module):
    """A layer whose int8 weight is ``qweight``; ``weight`` is its float value, for models that read a
    layer's ``weight`` (HF ViT casts its pixels to ``patch_embeddings.projection.weight.dtype``)."""

    @property
    def weight(self) -> torch.Tensor:
        return dq(self.qweight, self.s_w, None, 0)


class _QDQ(_Int8Weight):
    """Input QDQ + int8 weight DQ + int32 bias DQ around ``op``: the pattern ORT fuses."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        scale, zero_point = layer.activation_fake_quantizer.qparams()
        d = layer.deploy_weights()
        n = d["q"].shape[0]
        self.register_buffer("s_in", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("z_in", torch.tensor(zero_point, dtype=torch.uint8))
        self.register_buffer("qweight", d["q"].reshape(*d["shape"].tolist()))
        self.register_buffer("s_w", d["scale"])
        self.register_buffer("z_w", torch.zeros(n, dtype=torch.int8))
        self.register_buffer("bias", d["bias_q"])
        self.register_buffer("s_b", d["bias_scale"])
        self.conv = (layer.stride, layer.padding, layer.dilation, layer.groups) if hasattr(layer, "stride") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = qdq(x, self.s_in, self.z_in)
        w, b = dq(self.qweight, self.s_w, self.z_w, 0), dq(self.bias, self.s_b, None, 0)
        if self.conv is None:
            return F.linear(x, w, b)
        conv = F.conv1d if w.dim() == 3 else F.conv2d
        return conv(x, w, b, *self.conv)


class _DynamicQDQ(_Int8Weight):
    """Per-token uint8 activations x int8 weights (:mod:`.dynamic`): a hand-built ``MatMulInteger`` graph."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        d = layer.deploy_weights()
        self.register_buffer("qweight", d["q"])
        self.register_buffer("s_w", d["scale"])
        # (1, out): the zero point's correction, colsum(W) * s_w (exact integers, times the scales)
        self.register_buffer("colsum_scaled", (d["q"].sum(1, dtype=torch.int32).float() * d["scale"])[None])
        self.register_buffer("bias", d["bias"].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynamic_linear(x, self.qweight, self.s_w, self.colsum_scaled, self.bias)


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
    export form (folded BatchNorms become ``Identity``). Runs in torch with the same numerics.

    The float parameters of the quantized layers are never copied (the copy starts from their
    export forms), so exporting a 135M-parameter model holds one float model, not two."""
    layers = fake_quantized_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    memo: dict[int, object] = {}
    for m in layers.values():
        if isinstance(m, nn.Embedding):
            new = _Int8Embedding(m) if m.weight_fake_quantizer.bits == 8 else _NBitsEmbedding(m)
        elif isinstance(getattr(m, "activation_fake_quantizer", None), ActivationObserver):
            new = _QDQ(m)
        elif isinstance(getattr(m, "activation_fake_quantizer", None), TokenQuantizer):
            new = _DynamicQDQ(m)
        else:
            new = _NBits(m)
        memo[id(m)] = new
        if getattr(m, "folded_bn", None) is not None:
            memo[id(m.folded_bn)] = nn.Identity()
    was_training = model.training
    copied = copy.deepcopy(model, memo).eval()  # (the memo: quantized layers -> their export forms)
    model.train(was_training)
    for name, m in layers.items():  # a layer the copy reaches only through a non-module path is set anyway
        set_module(copied, name, memo[id(m)])
        if getattr(m, "folded_bn", None) is not None:
            set_module(copied, names[id(m.folded_bn)], memo[id(m.folded_bn)])
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def to_onnx(
    module: nn.Module,
    example: ExportCall | torch.Tensor,
    path: str | Path,
    custom_ops: bool = True,
    name_prefix: str | None = None,
    full_range: bool = False,
) -> Path:
    """``torch.onnx.export(dynamo=True)`` of ``module`` called as ``example`` says (an
    :class:`~.export_call.ExportCall`, or one tensor for ``forward(x)``): one graph input per tensor,
    named as the batch keys, with a dynamic batch dimension (and, for token ids, a dynamic sequence
    dimension); returns the file written. Initializers are named as ``module`` names them
    (``name_prefix`` + the path; default prefix: the call's module path).

    Token ids (an integer ``(B, T, ...)`` input, a language model's ``input_ids``) get a dynamic
    ``T`` too: the file serves any prompt length, and the positions' tables (a Llama's rotary
    cos/sin, one ``(T, head_dim)`` pair per layer) are computed in the graph instead of being
    stored as constants. A model whose forward needs one fixed length is exported with that
    length."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    call = two_rows(as_export_call(example).head(8))
    wrapper = GraphCall(module.eval(), call)
    tokens = any(not t.is_floating_point() and t.dim() >= 2 and t.shape[1] >= 2 for t in call.tensors)
    program = None
    with no_mha_fastpath(), silent_exporter(), torch.no_grad():
        for sequence in (True, False) if tokens else (False,):
            try:
                program = torch.onnx.export(
                    wrapper,
                    call.tensors,
                    dynamo=True,
                    custom_translation_table=translations() if custom_ops else None,
                    input_names=list(call.names),
                    dynamic_shapes=(dynamic_shapes(call, sequence),),
                    verbose=False,
                    optimize=False,  # (the light pass below)
                )
                break
            except Exception:
                if not sequence:
                    raise
    _light_optimize(program.model)
    program.save(str(path))
    _strip(
        path,
        prefix=name_prefix if name_prefix is not None else (f"{call.module}." if call.module else ""),
        full_range=full_range,
    )
    return path


def _light_optimize(model) -> None:
    """What the exporter's optimizer does that the file needs (constant folding, unused nodes, shared
    initializers, common subexpressions) without its pattern rewriter: on MiniLM that rewriter was half
    of the export's time (157,767 match attempts; export 115 s -> 58 s under load), and ORT then runs
    the same kernels (same fusions, 879 vs 873 nodes after ORT's own optimization, same latency)."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    for step in (
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
    ):
        step(model)


def _strip(path: Path, prefix: str = "", full_range: bool = False) -> None:
    """Drop the exporter's per-node metadata (stack traces with local paths, class names) and
    intermediate shape annotations (on a 5k-parameter model they were 2/3 of the file), and name
    the initializers as the LightningModule names its layers (``prefix`` + the path in the exported
    module, instead of the tracing wrapper's ``target.``), and mark full-range int8 weights in the
    file's metadata (a session on an AVX2-only CPU must then use exact kernels: ``serving.session``)."""
    import onnx

    from lightning_slim.quantization.serving import FULL_RANGE_KEY

    model = onnx.load(str(path))
    if full_range:
        onnx.helper.set_model_props(model, {FULL_RANGE_KEY: "full_range"})
    graph = model.graph
    for item in (*graph.node, *graph.initializer, *graph.input, *graph.output):
        del item.metadata_props[:]
    del graph.value_info[:]
    _rename_initializers(graph, GraphCall.TARGET + ".", prefix)
    _compact_biases(graph)
    onnx.save(model, str(path))


def _rename_initializers(graph, old: str, new: str) -> None:
    renamed = {t.name: new + t.name[len(old) :] for t in graph.initializer if t.name.startswith(old)}
    for t in graph.initializer:
        t.name = renamed.get(t.name, t.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


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


def export_onnx(model: nn.Module, example: ExportCall | torch.Tensor, path: str | Path) -> Path:
    """Write the int8 (QDQ / MatMulNBits) ONNX file of a statically fake-quantized model, called as
    ``example`` says (the exported graph returns the call's output tensor: the logits of a Hugging
    Face ``ModelOutput``, whose ``DynamicCache`` the exporter could not serialize)."""
    call = as_export_call(example)
    target = model.get_submodule(call.module) if call.module else model  # only what is served is copied
    own = dataclasses.replace(call, module="")
    prefix = f"{call.module}." if call.module else ""
    return to_onnx(deploy_module(target), own, path, name_prefix=prefix, full_range=full_range_weights(target))
