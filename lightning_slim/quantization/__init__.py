"""Quantization-aware training with a real int8 export (see README.md, the method card).

``QuantizationAwareTraining`` is the Lightning callback, configured by a ``QuantizationConfig``; the
runtime that serves the model is a :class:`~.backends.Backend` (``backends.onnxruntime``,
``backends.torchao``). Importing this package imports neither torchao nor onnx/onnxruntime; they load
when used.
"""

from lightning_slim.quantization.backends import Backend, backend
from lightning_slim.quantization.backends.torchao import convert_to_int8
from lightning_slim.quantization.callback import QuantizationAwareTraining
from lightning_slim.quantization.config import QuantizationConfig
from lightning_slim.quantization.export import int8_weights, load_int8, save_int8, to_runtime
from lightning_slim.quantization.functional import (
    freeze_batchnorm,
    freeze_ranges,
    prepare_qat,
    quantization_error,
    set_fake_quant,
    set_ranges,
    unprepare,
)
from lightning_slim.quantization.layers import select_layers
from lightning_slim.quantization.serving import (
    OrtModel,
    artifact_bytes,
    compare_latency,
    cpu_int8_capability,
    fp32_onnx,
    fused_ops,
    interleaved_latency_ms,
    session,
)

__all__ = [
    "Backend",
    "OrtModel",
    "QuantizationAwareTraining",
    "QuantizationConfig",
    "artifact_bytes",
    "backend",
    "compare_latency",
    "convert_to_int8",
    "cpu_int8_capability",
    "fp32_onnx",
    "freeze_batchnorm",
    "freeze_ranges",
    "fused_ops",
    "int8_weights",
    "interleaved_latency_ms",
    "load_int8",
    "prepare_qat",
    "quantization_error",
    "save_int8",
    "select_layers",
    "session",
    "set_fake_quant",
    "set_ranges",
    "to_runtime",
    "unprepare",
]
