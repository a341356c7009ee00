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
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def artifact_bytes(path: str | Path) -> int:
    """Bytes of the file a user ships (an ONNX model, a ``.pt2`` program): what ``size`` should mean."""
    return os.path.getsize(path)


def cpu_int8_capability(cpuinfo: str | None = None) -> dict:
    """Which int8 dot-product instructions this CPU has, from /proc/cpuinfo flags.

    AVX2 alone: u8 x s8 products are added in int16 (``vpmaddubsw``) and can saturate, which
    is why the onnxruntime export keeps weights 7-bit (``reduce_range``). AVX512-VNNI /
    AVX-VNNI (``vpdpbusd``) and AMX accumulate in int32; ARM ``asimddp`` (dotprod) likewise.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags, model = set(), "unknown"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags |= set(value.split())
        elif key in ("model name", "cpu model") and model == "unknown":
            model = value.strip()
    return {
        "model": model,
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx": bool({"amx_int8", "amx_tile"} & flags),
        "arm_dotprod": "asimddp" in flags,
    }


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


@torch.inference_mode()
def interleaved_latency_ms(
    fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3, rounds: int = 5
) -> dict[str, float]:
    """Median milliseconds per call of each zero-argument function, timed side by side: every round
    runs each function ``repeats`` times in turn, so drift on a shared machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def compare_latency(models: dict[str, nn.Module], x: torch.Tensor, **kwargs) -> dict[str, float]:
    """``interleaved_latency_ms`` of ``model(x)`` for each model (torch modules and ``OrtModel``s)."""
    for m in models.values():
        m.eval()
    return interleaved_latency_ms({name: (lambda m=m: m(x)) for name, m in models.items()}, **kwargs)
