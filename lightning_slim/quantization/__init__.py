"""Quantization-aware training with a real int8 export (see README.md, the method card)."""
from lightning_slim.quantization.callback import QuantizationAwareTraining
from lightning_slim.quantization.export import convert_to_int8, load_int8, save_int8
from lightning_slim.quantization.functional import (QuantSpec, freeze_batchnorm, freeze_ranges, prepare_qat,
                                                    quantization_error, select_layers, set_fake_quant, set_ranges,
                                                    unprepare)

__all__ = ["QuantizationAwareTraining", "QuantSpec", "select_layers", "prepare_qat", "set_fake_quant",
           "freeze_ranges", "set_ranges", "freeze_batchnorm", "quantization_error", "unprepare",
           "convert_to_int8", "save_int8", "load_int8"]
