"""torchao (``runtime="torchao"``): torchao's QAT modules simulate its int8 kernels (symmetric int8
per-channel or int4 per-group weights, asymmetric int8 per-token activations computed at run time),
and :meth:`TorchaoBackend.convert` swaps every fake-quantized layer for its torchao int8 form with the
same numerics: Linear -> ``Int8DynamicActivationInt8WeightConfig``, int4 ->
``Int8DynamicActivationIntxWeightConfig`` (per group), Embedding -> ``IntxWeightOnlyConfig``, Conv ->
:class:`~..conv.Int8Conv` with the BatchNorm folded in. Frozen weight scales are used as they are;
exact zeros (pruned weights) quantize to exact zeros. The saved artifact is a ``torch.export``
program (``.pt2``), loadable with ``torch.export.load(path).module()`` by a process that has torch
and torchao but neither lightning-slim nor the user's model class.

>>> import copy, torch
>>> from torch import nn
>>> from lightning_slim.quantization.config import QuantizationConfig
>>> from lightning_slim.quantization.functional import prepare_qat
>>> model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(),
...                       nn.Linear(8 * 16, 4))
>>> prepare_qat(model, ["0", "4"], QuantizationConfig(runtime="torchao"))
{'0': '1'}
>>> int8 = convert_to_int8(copy.deepcopy(model).eval())
>>> int8(torch.randn(2, 1, 16)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_slim.quantization import conv
from lightning_slim.quantization.backends import Backend
from lightning_slim.quantization.functional import fake_quantized_layers, set_module
from lightning_slim.quantization.layers import check_whole_groups, is_hf_conv1d, is_linear
from lightning_slim.quantization.transposed import TorchaoTransposedLinear

if TYPE_CHECKING:
    from lightning_slim.quantization.config import QuantizationConfig
    from lightning_slim.quantization.export_call import ExportCall


class TorchaoBackend(Backend):
    name: ClassVar[str] = "torchao"
    packages: ClassVar[tuple[str, ...]] = ("torchao",)
    extra: ClassVar[str] = "torchao"
    default_activation_mode: ClassVar[str] = "dynamic"  # its only mode

    def check_config(self, config: QuantizationConfig) -> None:
        if config.activation_mode == "static":
            raise ValueError(
                "activation_mode='static' needs runtime='onnxruntime'; torchao's int8 kernels quantize "
                "activations per token at run time (activation_mode='dynamic' or None)"
            )
        if config.freeze_ranges_after is not None and config.weight_bits == 4:
            raise ValueError(
                "freeze_ranges_after with runtime='torchao' is supported for weight_bits=8 only "
                "(torchao recomputes int4 group scales at export)"
            )

    def check_layer(self, name: str, module: nn.Module, config: QuantizationConfig) -> None:
        if isinstance(module, conv.CONV_TYPES):
            conv.check_conv(name, module)
        elif is_linear(module) or isinstance(module, nn.Embedding):  # torchao's int4 layouts: whole groups
            check_whole_groups(name, module, config)

    def fake_quantize(self, module: nn.Module, config: QuantizationConfig, bn: nn.Module | None) -> nn.Module:
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
        from torchao.quantization.qat.linear import FakeQuantizedLinear

        if config.weight_bits == 8:
            weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
        else:
            weights = IntxFakeQuantizeConfig(torch.int4, group_size=config.group_size, is_symmetric=True)
        activations = (
            IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if config.activation_bits else None
        )
        if isinstance(module, conv.CONV_TYPES):
            return conv.fake_quantize_conv(module, activations, weights, bn)
        if is_hf_conv1d(module):
            return TorchaoTransposedLinear(module, activations, weights)
        if isinstance(module, nn.Linear):
            return FakeQuantizedLinear.from_linear(module, activations, weights)
        return FakeQuantizedEmbedding.from_embedding(module, weights)

    def prepared(self, model: nn.Module) -> bool:
        from lightning_slim.quantization.static import WeightQuantizer

        layers = fake_quantized_layers(model).values()
        return bool(layers) and not any(isinstance(m.weight_fake_quantizer, WeightQuantizer) for m in layers)

    def export_call(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: QuantizationConfig
    ) -> ExportCall | None:
        # int8 modules are swapped in place: checked on example_input_array when there is one
        from lightning_slim.quantization.export_call import as_export_call

        example = getattr(pl_module, "example_input_array", None)
        return as_export_call(example.cpu()) if isinstance(example, torch.Tensor) else None

    def observe(self, target: nn.Module, call: ExportCall) -> None:
        pass  # per-token activations: no range to observe

    def deployable_in_torch(self, target: nn.Module) -> nn.Module:
        return convert_to_int8(target)

    def convert(self, model: nn.Module, example: ExportCall | None) -> nn.Module:
        return convert_to_int8(model)

    def save(self, model: nn.Module, example: ExportCall, path: str | Path) -> Path:
        """A ``torch.export`` program with a dynamic batch dimension, taking the call's tensors in order."""
        from lightning_slim.quantization.export_call import GraphCall, as_export_call, dynamic_shapes, two_rows

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        call = two_rows(as_export_call(example).head(8))
        module = GraphCall(copy.deepcopy(model).eval(), call)
        program = torch.export.export(module, call.tensors, dynamic_shapes=(dynamic_shapes(call, sequence=False),))
        torch.export.save(program, str(path))
        return path

    def int8_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``qdata`` of torchao's int8 tensors (a conv's under the conv's own name)."""
        from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor

        found = {}
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, (Int8Tensor, IntxUnpackedToInt8Tensor)):
                parent = name.rpartition(".")[0]
                in_conv = isinstance(model.get_submodule(parent), conv.Int8Conv) if parent else False
                found[parent if in_conv else name] = w.qdata.reshape(w.qdata.shape[0], -1)
        return found

    def record_when(self, layers: dict[str, nn.Module], recording: Callable[[], bool]) -> None:
        pass  # per-token activations: nothing observed in training

    def observed_ranges(self, layers: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def load_observed_ranges(self, layers: dict[str, nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
        if state:
            raise ValueError(
                f"the checkpoint holds observed activation ranges for {sorted(state)} (a runtime='onnxruntime' run); "
                "runtime='torchao' quantizes activations per token and has none to load"
            )

    def sync_ranks(self, layers: dict[str, nn.Module], reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        pass  # no state besides the parameters, which DDP keeps equal


def _int8_weight(linear: nn.Linear, fq, activations: bool) -> nn.Linear:
    """``linear`` with a torchao int8 weight; ``fq`` (the layer's weight fake quantizer) gives the
    bit-width, group size and any frozen scale."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8Tensor,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerGroup,
        PerRow,
        PerTensor,
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
        q = linear.weight
        scale = fq.scale.detach().to(q.scale.dtype).reshape(q.scale.shape)
        frozen = Int8Tensor.from_hp(
            w,
            granularity=PerRow() if q.block_size[0] == 1 else PerTensor(),
            scale=scale,
            zero_point=torch.zeros_like(scale, dtype=torch.int8),
            act_quant_kwargs=q.act_quant_kwargs,
        )
        linear.weight = nn.Parameter(frozen, requires_grad=False)
    return linear


@torch.no_grad()
def convert_to_int8(model: nn.Module) -> nn.Module:
    """Replace every fake-quantized layer of ``model`` (in place) by its torchao int8 form; returns it."""
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup, quantize_

    if not TorchaoBackend().prepared(model):
        raise ValueError(
            f"{type(model).__name__} holds no layer fake-quantized for runtime='torchao'; prepare it with "
            "QuantizationConfig(runtime='torchao') (an onnxruntime model converts with to_runtime(model, example))"
        )
    names = {id(m): n for n, m in model.named_modules()}
    for name, m in fake_quantized_layers(model).items():
        fq = m.weight_fake_quantizer
        activations = getattr(m, "activation_fake_quantizer", None) is not None
        if isinstance(m, conv.CONV_TYPES):
            bn = m.folded_bn
            new = conv.conv_to_int8(
                m, lambda lin, _m, fq=fq, activations=activations: _int8_weight(lin, fq, activations)
            )
            if bn is not None:
                set_module(model, names[id(bn)], nn.Identity())
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
        set_module(model, name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
