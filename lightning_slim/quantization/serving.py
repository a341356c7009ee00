"""Serving with ONNX Runtime, measured honestly: sessions, side-by-side latency, artifact bytes,
what ORT fused, and the CPU's int8 capability.

Nothing here imports ``onnxruntime`` or ``onnx`` before it is needed (they are the optional
``lightning-slim[onnx]`` extra).

>>> cap = cpu_int8_capability()
>>> sorted(cap) == ["amx", "arm_dotprod", "avx2", "avx512_vnni", "avx_vnni", "model"]
True
"""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from lightning_slim.measure import compare_latency, cpu_int8_capability, interleaved_latency_ms

__all__ = [
    "OrtModel",
    "artifact_bytes",
    "compare_latency",
    "cpu_int8_capability",
    "fp32_onnx",
    "fused_ops",
    "interleaved_latency_ms",
    "session",
]


def artifact_bytes(path: str | Path) -> int:
    """Bytes of the file a user ships (an ONNX model, a ``.pt2`` program): what ``size`` should mean."""
    return os.path.getsize(path)


def session(model: str | Path | bytes, threads: int = 1, optimized_path: str | Path | None = None):
    """An ``onnxruntime.InferenceSession`` on CPU with a fixed intra-op thread count (1 by default:
    fair, repeatable timing on shared machines). ``optimized_path`` saves the graph ORT runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # the warning about saving a hardware-specific optimized graph
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def fused_ops(model: str | Path | bytes) -> dict[str, int]:
    """Operator counts of the graph ORT actually runs (after its QDQ fusions), e.g.
    ``{"QLinearConv": 3, "QGemm": 1, ...}``: the evidence that int8 kernels are used."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(model, optimized_path=path)
        graph = onnx.load(str(path)).graph
    return dict(collections.Counter(n.op_type for n in graph.node))


class OrtModel(nn.Module):
    """An ONNX model served by ONNX Runtime, usable where a torch module is expected
    (``model(x)`` with a CPU tensor in, a tensor out). The file's bytes are a buffer, so the
    module pickles/deep-copies (the session is rebuilt on demand) and ``state_dict`` holds what
    is shipped. ``save(path)`` writes the ONNX file."""

    def __init__(self, onnx_bytes: bytes, threads: int = 1):
        super().__init__()
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(onnx_bytes), dtype=torch.uint8))
        self.threads = threads
        self._session = None

    @classmethod
    def load(cls, path: str | Path, threads: int = 1) -> OrtModel:
        return cls(Path(path).read_bytes(), threads)

    @property
    def onnx_bytes(self) -> bytes:
        return self.onnx_model.numpy().tobytes()

    def artifact_bytes(self) -> int:
        """Bytes of the ONNX file this model is (what ``save`` writes and a user ships)."""
        return self.onnx_model.numel()

    @property
    def session(self):
        if self._session is None:
            self._session = session(self.onnx_bytes, self.threads)
        return self._session

    def __getstate__(self):
        return {**self.__dict__, "_session": None}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_bytes)
        return path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.session
        out = s.run(None, {s.get_inputs()[0].name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def fp32_onnx(model: nn.Module, example: torch.Tensor, path: str | Path | None = None) -> OrtModel:
    """The float model in ONNX Runtime (same exporter, no quantization): the middle column of
    "fp32 eager / fp32 in the runtime / int8 in the runtime"."""
    from lightning_slim.quantization.onnx_export import to_onnx

    with tempfile.TemporaryDirectory() as tmp:
        written = to_onnx(model, example, path or Path(tmp) / "fp32.onnx", custom_ops=False)
        return OrtModel(written.read_bytes())
