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

from lightning_slim.reporting.measure import Artifact, compare_latency, cpu_int8_capability, interleaved_latency_ms

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


FULL_RANGE_KEY = "lightning_slim.int8_weights"  # ONNX metadata: "full_range" when weights use all of [-127, 127]


def saturating_cpu(capability: dict | None = None) -> bool:
    """An x86 CPU whose u8 x s8 kernel adds pairs of products in int16 (AVX2 without AVX512-VNNI,
    AVX-VNNI or AMX): full-range int8 weights beside uint8 activations can saturate there."""
    cap = capability or cpu_int8_capability()
    return cap["avx2"] and not (cap["avx512_vnni"] or cap["avx_vnni"] or cap["amx"])


def session(
    model: str | Path | bytes, threads: int = 1, optimized_path: str | Path | None = None, full_range: bool = False
):
    """An ``onnxruntime.InferenceSession`` on CPU with a fixed intra-op thread count (1 by default:
    fair, repeatable timing on shared machines). ``optimized_path`` saves the graph ORT runs.

    ``full_range``: the model's int8 weights use all of [-127, 127] (``reduce_range=False``); on a
    :func:`saturating_cpu` the session then sets ORT's ``session.x64quantprecision`` (weights moved
    to uint8 at load, exact u8 x u8 kernels, slower). Elsewhere the fast u8 x s8 kernels are exact,
    and the option would only slow them (ORT applies it on every x86 CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # the warning about saving a hardware-specific optimized graph
    if full_range and saturating_cpu():
        options.add_session_config_entry("session.x64quantprecision", "1")
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


class OrtModel(Artifact):
    """An ONNX model served by ONNX Runtime, usable where a torch module is expected: CPU tensors
    in (positionally in the graph's input order, or by the graph's input names, e.g.
    ``model(input_ids=..., attention_mask=...)``), a tensor out. ``forward``'s signature names the
    graph's inputs, so code that calls a model with the batch entries its ``forward`` names does
    the right thing. The file's bytes are a buffer, so the module pickles/deep-copies (the session
    is rebuilt on demand) and ``state_dict`` holds what is shipped. ``save(path)`` writes the file."""

    IGNORED = ("use_cache",)  # Hugging Face call options that have no input in a graph without a cache

    def __init__(
        self,
        onnx_bytes: bytes,
        threads: int = 1,
        input_names: tuple[str, ...] | None = None,
        full_range: bool | None = None,
    ):
        super().__init__()
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(onnx_bytes), dtype=torch.uint8))
        self.threads = threads
        self._session = None
        if input_names is None or full_range is None:  # read from the file (the exporter passes both)
            input_names, full_range = _graph_inputs(onnx_bytes)
        self.input_names, self.full_range = tuple(input_names), full_range
        self._bind()

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
            self._session = session(self.onnx_bytes, self.threads, full_range=self.full_range)
        return self._session

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "forward"} | {"_session": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._bind()

    def _bind(self) -> None:
        """``forward`` as an instance function whose signature is the graph's inputs."""
        import inspect

        def forward(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
            return self.run(*args, **kwargs)

        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        forward.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in self.input_names])
        self.forward = forward

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_bytes)
        return path

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:  # (bound per instance)
        return self.run(*args, **kwargs)

    def run(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """The graph's first output for these inputs (every graph input must be given)."""
        if len(args) > len(self.input_names):
            raise TypeError(f"the graph takes {len(self.input_names)} inputs {self.input_names}, got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name in self.IGNORED:
                continue
            if name not in self.input_names or name in feeds:
                raise TypeError(f"unexpected or repeated input {name!r}; the graph's inputs are {self.input_names}")
            feeds[name] = value
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise TypeError(f"missing graph inputs {missing} (the graph's inputs are {self.input_names})")
        arrays = {n: v.detach().cpu().contiguous().numpy() for n, v in feeds.items()}
        return torch.from_numpy(self.session.run(None, arrays)[0])


def _graph_inputs(onnx_bytes: bytes) -> tuple[tuple[str, ...], bool]:
    """The graph's input names, and whether its int8 weights are full range (the file's metadata)."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    constants = {t.name for t in model.graph.initializer}
    full_range = any(p.key == FULL_RANGE_KEY and p.value == "full_range" for p in model.metadata_props)
    return tuple(i.name for i in model.graph.input if i.name not in constants), full_range


def fp32_onnx(model: nn.Module, example, path: str | Path | None = None) -> OrtModel:
    """The float model in ONNX Runtime (same exporter, no quantization): the middle column of
    "fp32 eager / fp32 in the runtime / int8 in the runtime". ``example``: a tensor (``forward(x)``)
    or an :class:`~.export_call.ExportCall` (which submodule, which named inputs)."""
    from lightning_slim.quantization.export_call import as_export_call
    from lightning_slim.quantization.onnx_export import to_onnx

    call = as_export_call(example)
    with tempfile.TemporaryDirectory() as tmp:
        written = to_onnx(model, call, path or Path(tmp) / "fp32.onnx", custom_ops=False)
        return OrtModel(written.read_bytes(), input_names=call.names, full_range=False)
