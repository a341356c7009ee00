"""From a fake-quantized model to a real int8 one, and to a file that loads without our code.

:func:`to_runtime` picks the path from the model's layers: statically fake-quantized layers
(``runtime="onnxruntime"``) become an ONNX file served by ONNX Runtime
(:class:`~.serving.OrtModel`, see :mod:`.onnx_export`); torchao layers go through
:func:`convert_to_int8`. :func:`save_int8` / :func:`load_int8` handle both kinds of artifact.

torchao path: ``convert_to_int8`` swaps every fake-quantized layer for its torchao int8 form with the same
numerics as training: Linear -> ``Int8DynamicActivationInt8WeightConfig`` (asymmetric
per-token int8 activations, symmetric per-channel int8 weights; torchao's int8 GEMM), int4 ->
``Int8DynamicActivationIntxWeightConfig`` (per-group int4), Embedding -> ``IntxWeightOnlyConfig``,
Conv -> :class:`~lightning_slim.quantization.conv.Int8Conv` with the BN folded in. Frozen
weight scales are used as they are. Exact zeros (pruned weights) quantize to exact zeros.

``save_int8`` writes a ``torch.export`` program (``.pt2``): the graph and its int8 weights,
loadable with ``torch.export.load(path).module()`` by a process that has torch (and torchao
installed) but neither lightning-slim nor the user's model class.

>>> import copy, torch
>>> from torch import nn
>>> from lightning_slim.quantization.functional import QuantSpec, prepare_qat
>>> model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(),
...                       nn.Linear(8 * 16, 4))
>>> folded = prepare_qat(model, ["0", "4"], QuantSpec(runtime="torchao"))
>>> folded
{'0': '1'}
>>> int8 = convert_to_int8(copy.deepcopy(model).eval())
>>> int8(torch.randn(2, 1, 16)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lightning_slim.quantization import conv as qconv
from lightning_slim.quantization.functional import _set, fake_quantized_layers, full_range_weights, is_static
from lightning_slim.quantization.transposed import TorchaoTransposedLinear


def to_runtime(model: nn.Module, example=None) -> nn.Module:
    """The deployable int8 model of a fake-quantized ``model``: an ``OrtModel`` (ONNX Runtime) for
    static layers, else torchao's int8 modules. ``example`` traces the ONNX graph: a CPU batch of
    ``forward(x)``'s input, or an :class:`~.export_call.ExportCall` (which submodule is served, with
    which named inputs: ``input_ids``, ``attention_mask``...)."""
    if not is_static(model):
        return convert_to_int8(model)
    if example is None:
        raise ValueError("exporting to onnxruntime needs an example input (a CPU batch of the model's inputs)")
    import tempfile

    from lightning_slim.quantization.export_call import as_export_call
    from lightning_slim.quantization.onnx_export import export_onnx
    from lightning_slim.quantization.serving import OrtModel

    call = as_export_call(example)
    with tempfile.TemporaryDirectory() as tmp:
        written = export_onnx(model, call, Path(tmp) / "int8.onnx")
        return OrtModel(written.read_bytes(), input_names=call.names, full_range=full_range_weights(model))


def _int8_weight(linear: nn.Linear, fq, activations: bool) -> nn.Linear:
    """``linear`` with a torchao int8 weight; ``fq`` (the layer's weight fake quantizer) gives
    the bit-width, group size and any frozen scale."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerGroup,
        quantize_,
    )

    cfg = fq.config
    if cfg.dtype == torch.int4:
        group = PerGroup(cfg.granularity.group_size)
        config = (
            Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=group)
            if activations
            else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=group)
        )
        quantize_(linear, config)
        return linear
    config = (
        Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)
        if activations
        else Int8WeightOnlyConfig()
    )
    w = linear.weight.detach().clone()
    quantize_(linear, config)
    if not cfg.is_dynamic and fq.scale is not None:  # frozen ranges: quantize on that grid exactly
        from torchao.quantization import Int8Tensor

        q = linear.weight
        scale = fq.scale.detach().to(q.scale.dtype).reshape(q.scale.shape)
        frozen = Int8Tensor.from_hp(
            w,
            granularity=_granularity(q),
            scale=scale,
            zero_point=torch.zeros_like(scale, dtype=torch.int8),
            act_quant_kwargs=q.act_quant_kwargs,
        )
        linear.weight = nn.Parameter(frozen, requires_grad=False)
    return linear


def _granularity(q):
    from torchao.quantization import PerRow, PerTensor

    return PerRow() if q.block_size[0] == 1 else PerTensor()


@torch.no_grad()
def convert_to_int8(model: nn.Module) -> nn.Module:
    """Replace every fake-quantized layer of ``model`` (in place) by its int8 form; returns it."""
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup, quantize_

    layers = fake_quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no fake-quantized layer to convert; prepare it first")
    if is_static(model):
        raise ValueError("the model was prepared for runtime='onnxruntime'; convert it with to_runtime(model, example)")
    names = {id(m): n for n, m in model.named_modules()}
    for name, m in layers.items():
        fq = m.weight_fake_quantizer
        activations = getattr(m, "activation_fake_quantizer", None) is not None
        if isinstance(m, qconv.CONV_TYPES):
            bn = m.folded_bn
            new = qconv.conv_to_int8(
                m, lambda lin, _m, fq=fq, activations=activations: _int8_weight(lin, fq, activations)
            )
            if bn is not None:
                _set(model, names[id(bn)], nn.Identity())
        elif isinstance(m, (nn.Linear, TorchaoTransposedLinear)):  # a Conv1D becomes the nn.Linear it is
            new = _int8_weight(m.to_linear(), fq, activations)
        else:
            emb = m.to_embedding()
            gran = PerAxis(0) if fq.config.dtype == torch.int8 else PerGroup(fq.config.granularity.group_size)
            quantize_(
                emb,
                IntxWeightOnlyConfig(weight_dtype=fq.config.dtype, granularity=gran),
                filter_fn=lambda mod, _fqn: isinstance(mod, nn.Embedding),
            )
            new = emb
        new.eval()
        _set(model, name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save_int8(model: nn.Module, example_input, path: str | Path) -> Path:
    """Save an int8 model: an ``OrtModel`` as its ONNX file, a torchao model as a ``torch.export``
    program with a dynamic batch dimension. ``example_input``: a batch of ``forward(x)``'s input, or
    an :class:`~.export_call.ExportCall` (the program then takes the call's tensors, in its order)."""
    from lightning_slim.quantization.export_call import GraphCall, as_export_call, dynamic_shapes, two_rows

    if hasattr(model, "onnx_bytes"):
        return model.save(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    call = two_rows(as_export_call(example_input).head(8))
    module = GraphCall(copy.deepcopy(model).eval(), call)
    program = torch.export.export(module, call.tensors, dynamic_shapes=(dynamic_shapes(call, sequence=False),))
    torch.export.save(program, str(path))
    return path


def load_int8(path: str | Path) -> nn.Module:
    """Load what :func:`save_int8` wrote: a ``torch.export`` program (a zip: needs torch + torchao)
    or an ONNX file (an ``OrtModel``; the file itself needs only onnxruntime)."""
    import zipfile

    if zipfile.is_zipfile(path):
        return torch.export.load(str(path)).module()
    from lightning_slim.quantization.serving import OrtModel

    return OrtModel.load(path)


def int8_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The integer weights each quantized layer ships, by layer name, as (out, in) rows: read from
    the ONNX initializers of an ``OrtModel`` (int8, or MatMulNBits' packed 8/4-bit values unpacked),
    or ``qdata`` of torchao's tensors. For checks such as "pruned weights are exact int8 zeros"."""
    if not hasattr(model, "onnx_bytes"):
        found = {}
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if hasattr(w, "qdata"):
                parent = name.rpartition(".")[0]
                conv = isinstance(model.get_submodule(parent), qconv.Int8Conv) if parent else False
                found[parent if conv else name] = w.qdata.reshape(w.qdata.shape[0], -1)
        return found
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model.onnx_bytes).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    found = {  # int8 weight tables (``qweight`` of Linear / conv layers, ``weight`` of embeddings)
        n.rpartition(".")[0]: torch.from_numpy(a.copy()).reshape(a.shape[0], -1)
        for n, a in arrays.items()
        if n.endswith((".weight", ".qweight")) and a.dtype.name == "int8"
    }
    for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: a.i for a in node.attribute}
        packed = torch.from_numpy(arrays[node.input[1]].copy())
        u = packed if attrs["bits"] == 8 else torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)
        q = u.to(torch.int16).reshape(u.shape[0], -1)[:, : attrs["K"]] - 2 ** (attrs["bits"] - 1)
        found[node.input[1][: -len(".packed")]] = q.to(torch.int8)
    return found
