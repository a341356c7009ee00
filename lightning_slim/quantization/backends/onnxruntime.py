"""ONNX Runtime (``runtime="onnxruntime"``, the default): the layers of :mod:`..static` simulate ORT's
int8 kernels (uint8 activations with one observed range per tensor, or per token at run time with
``activation_mode="dynamic"``; int8 per-channel weights, 7-bit with ``reduce_range``; weight-only
Linears as MatMulNBits' 8/4-bit groups), and the export is an ONNX file served by ORT
(:class:`~..serving.OrtModel`, see :mod:`..onnx_export`), loadable with ``onnxruntime`` alone.

>>> import torch
>>> from torch import nn
>>> from lightning_slim.quantization.config import QuantizationConfig
>>> layer = OnnxRuntimeBackend().fake_quantize(nn.Linear(4, 2), QuantizationConfig(), None)
>>> type(layer).__name__, type(layer.activation_fake_quantizer).__name__
('StaticLinear', 'ActivationObserver')
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_slim.quantization import conv
from lightning_slim.quantization.backends import Backend
from lightning_slim.quantization.layers import check_whole_groups, is_hf_conv1d

if TYPE_CHECKING:
    from lightning_slim.quantization.config import QuantizationConfig
    from lightning_slim.quantization.export_call import ExportCall


class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    packages: ClassVar[tuple[str, ...]] = ("onnx", "onnxscript", "onnxruntime")
    extra: ClassVar[str] = "onnx"
    default_activation_mode: ClassVar[str] = "static"
    reuse_exports: ClassVar[bool] = True  # an ONNX export of a 135M model takes minutes

    def check_config(self, config: QuantizationConfig) -> None:
        if config.weight_bits == 4 and config.activation_bits is not None:
            raise ValueError(
                "weight_bits=4 with runtime='onnxruntime' is weight-only (MatMulNBits): set "
                "activation_bits=None, or runtime='torchao' for int8 dynamic activations with int4 "
                "weights"
            )
        size = config.group_size
        if config.activation_bits is None and (size < 16 or size & (size - 1)):
            raise ValueError(
                f"group_size={size} must be a power of two >= 16 for weight-only layers on "
                "onnxruntime (MatMulNBits blocks)"
            )

    def check_layer(self, name: str, module: nn.Module, config: QuantizationConfig) -> None:
        if isinstance(module, conv.CONV_TYPES):
            if module.padding_mode != "zeros":
                raise ValueError(
                    f"layer {name!r}: padding_mode={module.padding_mode!r} is not supported ('zeros' only); "
                    "add it to `exclude`"
                )
            if config.activation_bits is None:
                raise ValueError(
                    f"layer {name!r}: onnxruntime has no weight-only int8 convolution; use "
                    "activation_bits=8 or exclude the layer"
                )
            if config.dynamic:
                raise ValueError(
                    f"layer {name!r}: activation_mode='dynamic' quantizes Linear layers (per-token ranges); "
                    "exclude the convolutions or use activation_mode='static'"
                )
        elif isinstance(module, nn.Embedding):  # ORT's GatherBlockQuantized takes whole groups only
            check_whole_groups(name, module, config)  # (a weight-only Linear pads its last one, as MatMulNBits)

    def fake_quantize(self, module: nn.Module, config: QuantizationConfig, bn: nn.Module | None) -> nn.Module:
        from lightning_slim.quantization.static import fake_quantize_static

        weights, activations = _weight_quantizer(module, config), _activation_quantizer(module, config)
        if is_hf_conv1d(module):
            from lightning_slim.quantization.transposed import StaticTransposedLinear

            return StaticTransposedLinear(module, weights, activations)
        return fake_quantize_static(module, weights, activations, bn)

    def prepared(self, model: nn.Module) -> bool:
        from lightning_slim.quantization.functional import fake_quantized_layers
        from lightning_slim.quantization.static import WeightQuantizer

        layers = fake_quantized_layers(model).values()
        return any(isinstance(m.weight_fake_quantizer, WeightQuantizer) for m in layers)

    def export_call(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: QuantizationConfig
    ) -> ExportCall | None:
        from lightning_slim.quantization.preflight import sampled_export_call

        return sampled_export_call(trainer, pl_module, config.export_module, config.export_inputs)

    def observe(self, target: nn.Module, call: ExportCall) -> None:
        with torch.no_grad():
            call.call(target.train())  # the observers' first range (outside a Trainer: train mode records)
            target.eval()

    def deployable_in_torch(self, target: nn.Module) -> nn.Module:
        from lightning_slim.quantization.onnx_export import deploy_module

        return deploy_module(target)

    def convert(self, model: nn.Module, example: ExportCall | None) -> nn.Module:
        if example is None:
            raise ValueError("exporting to onnxruntime needs an example input (a CPU batch of the model's inputs)")
        from lightning_slim.quantization.export_call import as_export_call
        from lightning_slim.quantization.functional import full_range_weights
        from lightning_slim.quantization.onnx_export import export_onnx
        from lightning_slim.quantization.serving import OrtModel

        call = as_export_call(example)
        with tempfile.TemporaryDirectory() as tmp:
            written = export_onnx(model, call, Path(tmp) / "int8.onnx")
            return OrtModel(written.read_bytes(), input_names=call.names, full_range=full_range_weights(model))

    def float_in_runtime(self, model: nn.Module, example: ExportCall) -> nn.Module:
        from lightning_slim.quantization.serving import fp32_onnx

        return fp32_onnx(model, example)

    def save(self, model: nn.Module, example: ExportCall, path: str | Path) -> Path:
        from lightning_slim.quantization.serving import OrtModel

        if not isinstance(model, OrtModel):
            raise TypeError(f"onnxruntime saves an OrtModel (what convert() returns), not a {type(model).__name__}")
        return model.save(path)

    def int8_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Read from the ONNX initializers: int8 tables, or MatMulNBits' packed 8/4-bit values unpacked."""
        import onnx
        from onnx import numpy_helper

        from lightning_slim.quantization.serving import OrtModel

        if not isinstance(model, OrtModel):
            raise TypeError(f"onnxruntime's int8 model is an OrtModel, not a {type(model).__name__}")
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

    def record_when(self, layers: dict[str, nn.Module], recording: Callable[[], bool]) -> None:
        from lightning_slim.quantization.static import record_when

        record_when(layers, recording)

    def observed_ranges(self, layers: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
        from lightning_slim.quantization.static import observer_state

        return observer_state(layers)

    def load_observed_ranges(self, layers: dict[str, nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
        from lightning_slim.quantization.static import load_observer_state

        load_observer_state(layers, state)

    def sync_ranks(self, layers: dict[str, nn.Module], reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        from lightning_slim.quantization.static import average_observers

        average_observers(layers, reduce_mean)  # every rank keeps the same activation ranges


def _activation_quantizer(module: nn.Module, config: QuantizationConfig) -> nn.Module | None:
    """A static range observer, a per-token quantizer, or None (weight-only layers and embeddings)."""
    from lightning_slim.quantization.dynamic import TokenQuantizer
    from lightning_slim.quantization.static import ActivationObserver

    if config.activation_bits is None or isinstance(module, nn.Embedding):
        return None
    return TokenQuantizer() if config.dynamic else ActivationObserver()


def _weight_quantizer(module: nn.Module, config: QuantizationConfig) -> nn.Module:
    from lightning_slim.quantization.static import WeightQuantizer

    if isinstance(module, nn.Embedding):  # int8 rows, or int4 groups (ORT's GatherBlockQuantized)
        if config.weight_bits == 4:
            return WeightQuantizer(4, group_size=config.group_size)
        return WeightQuantizer(8, reduce_range=False)
    if config.activation_bits is None:
        return WeightQuantizer(config.weight_bits, group_size=config.group_size)
    return WeightQuantizer(8, reduce_range=config.reduce_range)
