"""What a compressed model costs: parameters, non-zeros, bytes as saved, MACs, CPU latency, and for
language models generation speed.

Inputs (``example_input``) may be a tensor (``model(x)``; token ids too), a dict of keyword
arguments (``model(**x)``, e.g. ``{"input_ids", "attention_mask"}``), or a call ``(args, kwargs)``.
A LightningModule without its own ``forward`` (``training_step`` calls ``self.model(...)``) is
measured through the module it calls (:func:`~lightning_slim.modules.forward_target`). Models whose
``forward`` takes ``use_cache`` are run with ``use_cache=False`` (a Hugging Face ``DynamicCache``
would only cost time and memory here).

>>> from torch import nn
>>> embed = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
>>> count_macs(embed, torch.tensor([[1, 2, 3]])), token_count(torch.tensor([[1, 2, 3]]))
(39, 3)
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_slim.modules import forward_target, named_arguments, output_tensor, without_cache


def _dense(t: torch.Tensor) -> torch.Tensor:
    # quantized tensor subclasses (torchao) may not support count_nonzero directly
    try:
        return t.dequantize() if hasattr(t, "dequantize") else t
    except Exception:
        return t


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(_dense(p.detach()))) for p in model.parameters())


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size a user's checkpoint file has."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@runtime_checkable
class Artifact(Protocol):
    """A deployable model that is a file of its own (e.g. an ONNX model served by ONNX Runtime)."""

    def artifact_bytes(self) -> int: ...


def shipped_bytes(model: nn.Module) -> int:
    """Bytes of what a user ships: the model's own file when it is one (:class:`Artifact`), else
    ``torch.save`` of its state dict."""
    return model.artifact_bytes() if isinstance(model, Artifact) else serialized_bytes(model)


def as_call(example: Any) -> tuple[tuple, dict]:
    """``example_input`` (a tensor, a dict of keyword arguments, a tuple of positional ones, or a
    call ``(args, kwargs)``) as ``(args, kwargs)``."""
    if (
        isinstance(example, tuple)
        and len(example) == 2
        and isinstance(example[0], tuple)
        and isinstance(example[1], Mapping)
    ):
        return example[0], dict(example[1])
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def _prepared(model: nn.Module, example: Any) -> tuple[nn.Module, tuple, dict]:
    _, target = forward_target(model)
    args, kwargs = as_call(example)
    return target, args, without_cache(target, kwargs)


def token_count(example: Any) -> int:
    """Tokens in an input of token ids (``input_ids``, or the first integer ``(B, T)`` tensor), else 0."""
    args, kwargs = as_call(example)
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    ok = isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()
    return int(ids.numel()) if ok else 0


def _conv1d_hook(module, inputs, output):
    # transformers' Conv1D is a Linear with a transposed (in, out) weight; torch-pruning does not know it
    x = inputs[0]
    module.__flops__ += int(x.numel() // x.shape[-1] * module.weight.numel())


def _custom_counters() -> dict:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return {}
    return {Conv1D: _conv1d_hook}


def macs_of(model: nn.Module, run: Callable[[nn.Module], Any]) -> int:
    """Multiply-accumulates of everything ``run(model)`` computes, counted once on a deep copy by
    torch-pruning's counter (convolutions, linear layers and ``nn.MultiheadAttention``; transformers'
    ``Conv1D`` as the linear layer it is; attention products that Hugging Face attention modules
    compute functionally are not counted). ``run`` may call the model any way (a ``loss_fn``)."""
    from torch_pruning.utils import op_counter

    op_counter.CUSTOM_MODULES_MAPPING = _custom_counters()  # before: it gives Conv1D its __flops__ counter
    counted = op_counter.add_flops_counting_methods(copy.deepcopy(model).eval())
    counted.start_flops_count(ost=io.StringIO(), verbose=False, ignore_list=[])
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # it prints notes about batch sizes
            run(counted)
        counted.__batch_counter__ = 1  # the total of this run (its counter would divide by a guessed batch)
        return int(counted.compute_average_flops_cost()[0])
    finally:
        counted.stop_flops_count()
        op_counter.CUSTOM_MODULES_MAPPING = {}


def count_macs(model: nn.Module, example_input: Any) -> int:
    """MACs of one forward pass per example of ``example_input`` (:func:`macs_of`)."""
    from lightning_slim.batches import example_count

    target, args, kwargs = _prepared(model, example_input)
    return macs_of(target, lambda m: m(*args, **kwargs)) // max(1, example_count((args, kwargs)))


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, example_input: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of a forward pass on CPU in milliseconds (after ``warmup`` passes)."""
    target, args, kwargs = _prepared(model, example_input)
    was_training = target.training
    target.eval()
    from lightning_slim.batches import move_to

    args, kwargs = move_to(args, "cpu"), move_to(kwargs, "cpu")
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        target(*args, **kwargs)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    target.train(was_training)
    return 1000 * statistics.median(times)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model's position embeddings allow (from its config), if it says."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@torch.inference_mode()
def generation_speed(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int = 256, window: int | None = None, warmup: int = 4
) -> dict[str, Any]:
    """Greedy generation at batch 1, the way a deployed LM is served: tokens per second for
    ``new_tokens`` tokens after ``prompt`` (``(1, P)`` token ids). A model whose ``forward`` takes a
    key/value cache (Hugging Face: ``cache`` or ``past_key_values``) decodes one token per forward
    with it; any other model re-reads the last ``window`` tokens (default ``P``) at every step. The
    number of new tokens is cut to what the model's position embeddings allow."""
    _, target = forward_target(model)
    was_training = target.training
    target.eval()
    names = named_arguments(target)
    cache_arg = next((n for n in ("cache", "past_key_values") if n in names), None)
    limit = max_positions(target)
    ids = prompt[:1].long().cpu()
    if limit is not None:
        ids = ids[:, : max(1, min(ids.shape[1], limit // 2))]
        new_tokens = max(1, min(new_tokens, limit - ids.shape[1]))
    window = window or ids.shape[1]
    try:
        if cache_arg and "use_cache" in names:
            step, used = _cached_steps(target, ids, cache_arg), True
        else:
            step, used = _window_steps(target, ids, window), False
        for _ in range(min(warmup, new_tokens)):  # first calls allocate; not timed
            next(step)
        step = _cached_steps(target, ids, cache_arg) if used else _window_steps(target, ids, window)
        start = time.perf_counter()
        for _ in range(new_tokens):
            next(step)
        seconds = time.perf_counter() - start
    finally:
        target.train(was_training)
    return {
        "generate_tokens_per_s": new_tokens / seconds,
        "generate_tokens": new_tokens,
        "generate_kv_cache": used,
        "generate_prompt_tokens": int(ids.shape[1]),
    }


def _cached_steps(target: nn.Module, ids: torch.Tensor, cache_arg: str):
    out = target(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise TypeError(f"{type(target).__name__} takes use_cache but returned no key/value cache")
    while True:
        token = output_tensor(out)[:, -1:].argmax(-1)
        yield token
        out = target(input_ids=token, use_cache=True, **{cache_arg: cache})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _window_steps(target: nn.Module, ids: torch.Tensor, window: int):
    kwargs = without_cache(target, {})
    while True:
        logits = output_tensor(target(ids[:, -window:], **kwargs))
        token = logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, token], dim=1)
        yield token


def measure(
    model: nn.Module, example_input: Any = None, latency: bool = True, warmup: int = 3, repeats: int = 10
) -> dict[str, Any]:
    """All of the above in one dict. MACs and latency need ``example_input`` (a CPU batch); what
    cannot be measured on this model is a ``macs_error`` / ``latency_error`` row saying why."""
    model = model.cpu() if next(model.parameters(), torch.empty(0)).device.type != "cpu" else model
    if isinstance(model, Artifact):  # a file: its bytes and its latency, no parameters or graph to count
        out: dict[str, Any] = {"size_bytes": shipped_bytes(model)}
        if example_input is not None and latency:
            try:
                out["latency_ms"] = cpu_latency_ms(model, example_input, warmup, repeats)
            except Exception as err:
                out["latency_error"] = f"not measurable: {type(err).__name__}: {err}"[:240]
        return out
    out = {
        "params": count_parameters(model),
        "nonzero_params": count_nonzero_parameters(model),
        "size_bytes": shipped_bytes(model),
    }
    if example_input is not None:
        from lightning_slim.batches import example_count, slice_batch

        args, kwargs = as_call(example_input)
        first = slice_batch((args, kwargs), torch.arange(1), size=example_count((args, kwargs)))
        try:
            out["macs"] = count_macs(model, first)
            tokens = token_count(first)
            if tokens:
                out["macs_per_token"] = out["macs"] / tokens
        except Exception as err:  # a model torch-pruning cannot trace still gets the rest measured
            out["macs_error"] = f"not measurable: {type(err).__name__}: {err}"[:240]
        if latency:
            try:
                out["latency_ms"] = cpu_latency_ms(model, (args, kwargs), warmup, repeats)
            except Exception as err:
                out["latency_error"] = f"not measurable: {type(err).__name__}: {err}"[:240]
    return out


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
