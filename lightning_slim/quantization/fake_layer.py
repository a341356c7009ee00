"""What the shared quantization code asks of a layer this package fake-quantizes itself (the onnxruntime
backend's static / dynamic layers, the unfolded convolutions, transformers' ``Conv1D``): the weight its
quantizer sees and the way back to the user's plain layer. torchao's own ``FakeQuantizedLinear`` /
``FakeQuantizedEmbedding`` keep torchao's interface (``to_linear`` / ``to_embedding``)."""

from __future__ import annotations

import sys

import torch
from torch import nn


class FakeQuantizedLayer:
    """A fake-quantized layer of this package, holding the user's Parameter objects. A plain base class,
    not an ``abc.ABC``: FSDP2's ``fully_shard`` swaps a module's ``__class__`` for a subclass, which
    ``ABCMeta``'s layout refuses."""

    def quant_weight(self) -> torch.Tensor:
        """The weight the weight quantizer sees (a BatchNorm folded in, ``Conv1D`` transposed, convs as rows)."""
        raise NotImplementedError

    def to_float(self) -> nn.Module:
        """The user's plain layer again, sharing this module's parameters."""
        raise NotImplementedError


def torchao_layers() -> tuple[type, ...]:
    """torchao's fake-quantized Linear and Embedding classes, if torchao's QAT is loaded (else none can exist)."""
    if "torchao.quantization.qat.linear" not in sys.modules:
        return ()
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return FakeQuantizedLinear, FakeQuantizedEmbedding
