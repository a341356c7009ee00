"""From a fake-quantized model to a real int8 one, and to a file that loads without our code.

Each step asks the model's :class:`~.backends.Backend`: :func:`to_runtime` the backend whose layers
the model holds (ONNX Runtime: an :class:`~.serving.OrtModel`; torchao: int8 modules in place),
:func:`save_int8` and :func:`int8_weights` the backend that made the int8 model (an ONNX file is an
:class:`~lightning_slim.reporting.measure.Artifact`; torchao's model is torch modules). :func:`load_int8`
reads either file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_slim.quantization.backends import backend_of, backend_of_artifact
from lightning_slim.quantization.export_call import ExportCall, as_export_call


def to_runtime(model: nn.Module, example=None) -> nn.Module:
    """The deployable int8 model of a fake-quantized ``model``: an ``OrtModel`` (ONNX Runtime) for
    the onnxruntime layers, else torchao's int8 modules. ``example`` traces the ONNX graph: a CPU
    batch of ``forward(x)``'s input, or an :class:`~.export_call.ExportCall` (which submodule is
    served, with which named inputs: ``input_ids``, ``attention_mask``...)."""
    return backend_of(model).convert(model, as_export_call(example) if example is not None else None)


def save_int8(model: nn.Module, example_input: ExportCall | torch.Tensor, path: str | Path) -> Path:
    """Save an int8 model: an ``OrtModel`` as its ONNX file, a torchao model as a ``torch.export``
    program with a dynamic batch dimension. ``example_input``: a batch of ``forward(x)``'s input, or
    an :class:`~.export_call.ExportCall` (the program then takes the call's tensors, in its order)."""
    return backend_of_artifact(model).save(model, as_export_call(example_input), path)


def load_int8(path: str | Path) -> nn.Module:
    """Load what :func:`save_int8` wrote: a ``torch.export`` program (a zip: needs torch + torchao)
    or an ONNX file (an ``OrtModel``; the file itself needs only onnxruntime)."""
    import zipfile

    if zipfile.is_zipfile(path):
        return torch.export.load(str(path)).module()
    from lightning_slim.quantization.serving import OrtModel

    return OrtModel.load(path)


def int8_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The integer weights each quantized layer ships, by layer name, as (out, in) rows (read from the
    ONNX file, or torchao's tensors). For checks such as "pruned weights are exact int8 zeros"."""
    return backend_of_artifact(model).int8_weights(model)
