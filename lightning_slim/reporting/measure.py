"""What a compressed model costs: parameters, non-zeros, bytes as saved, MACs and CPU latency
(median and interquartile range, models timed side by side). Generation speed is in
:mod:`lightning_slim.reporting.generation`.

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

import abc
import contextlib
import copy
import functools
import inspect
import io
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_slim.modules import call_arguments, evaluating, forward_target, without_cache


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


class Artifact(nn.Module, abc.ABC):
    """A deployable model that is a file of its own (e.g. an ONNX model served by ONNX Runtime): measured
    by that file's bytes and its latency (no parameters, no graph to count), saved as that file."""

    @abc.abstractmethod
    def artifact_bytes(self) -> int:
        """Bytes of the file a user ships (what :meth:`save` writes)."""

    @abc.abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the file; returns its path."""


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


def bound_call(model: nn.Module, example: Any) -> tuple[nn.Module, tuple, dict]:
    """``(target, args, kwargs)``: what measuring ``model`` on ``example`` calls. ``target`` is the
    module :func:`~lightning_slim.modules.forward_target` finds; a keyword example (``input_ids``,
    ``attention_mask``...) is bound to the names its ``forward`` takes, so the same example drives
    the user's Hugging Face model and a deployed file whose ``forward`` names fewer inputs or takes
    them positionally (:func:`~lightning_slim.modules.call_arguments`: the named ones, else the
    main input, ``input_ids``)."""
    _, target = forward_target(model)
    args, kwargs = as_call(example)
    if kwargs and not args and not _takes_any_keyword(target):
        args, kwargs = call_arguments(target, kwargs, drop=())
    return target, args, without_cache(target, kwargs)


def _takes_any_keyword(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD for p in params)


def main_input(example: Any) -> torch.Tensor | None:
    """The main input tensor of an example: its first positional argument, else the keyword input
    a batch names as its inputs (``input_ids``, ``x``...), else its first tensor."""
    from lightning_slim.batches import BatchFormatError, batch_inputs

    args, kwargs = as_call(example)
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    try:
        return batch_inputs(kwargs)
    except BatchFormatError:
        return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def first_rows(example: Any, rows: int) -> tuple[tuple, dict]:
    """The first ``rows`` examples of ``example`` as a call ``(args, kwargs)``."""
    from lightning_slim.batches import example_count, slice_batch

    call = as_call(example)
    return slice_batch(call, torch.arange(rows), size=example_count(call))


def _tensors(output: Any):
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


@torch.inference_mode()
def output_bytes(model: nn.Module, example: Any) -> int:
    """Bytes of the tensors one call of ``model`` on ``example`` returns (logits, hidden states...):
    what each timed call allocates at least (a language model's logits grow with batch x
    sequence x vocabulary)."""
    from lightning_slim.batches import move_to

    target, args, kwargs = bound_call(model, example)
    device = next(target.parameters(), torch.empty(0)).device
    with evaluating(target):
        out = target(*move_to(args, device), **move_to(kwargs, device))
    return sum(t.numel() * t.element_size() for t in _tensors(out))


def token_count(example: Any) -> int:
    """Tokens in an input of token ids (``input_ids``, or the first integer ``(B, T)`` tensor), else 0."""
    args, kwargs = as_call(example)
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    ok = isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()
    return int(ids.numel()) if ok else 0


def real_tokens(batch: Any) -> int:
    """Real tokens of a language-model batch: the attention mask's ones, else every token id
    (``input_ids`` or the inputs, when they are ``(B, T)`` integers), else 0."""
    from lightning_slim.batches import BatchFormatError, batch_inputs

    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    try:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) and "input_ids" in batch else batch_inputs(batch)
    except BatchFormatError:
        return 0
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

    target, args, kwargs = bound_call(model, example_input)
    return macs_of(target, lambda m: m(*args, **kwargs)) // max(1, example_count((args, kwargs)))


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the interquartile range (q3 - q1) of ``samples`` calls."""

    median_ms: float
    iqr_ms: float
    samples: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        ms = [1000 * s for s in seconds]
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
        return cls(statistics.median(ms), q3 - q1, len(ms))


def interleaved_timings(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 1,
    warmup: int = 1,
    rounds: int | None = None,
    budget_s: float = 2.0,
    min_rounds: int = 5,
    max_rounds: int = 50,
) -> dict[str, Timing]:
    """Each zero-argument function timed side by side: every round runs each of them ``repeats``
    times in turn (starting with a different one each round), so drift on a shared machine hits
    all of them alike and a ratio of medians compares like with like. ``rounds=None`` runs rounds
    until ``budget_s`` has passed (at least ``min_rounds``, at most ``max_rounds``). Returns the
    median and spread per function (:class:`Timing`)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):  # first calls allocate and pick kernels: not timed
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    begin, done = time.perf_counter(), 0
    while done < (max_rounds if rounds is None else rounds):
        for name in names[done % len(names) :] + names[: done % len(names)]:
            fn = fns[name]
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        done += 1
        if rounds is None and done >= min_rounds and time.perf_counter() - begin >= budget_s:
            break
    return {name: Timing.of(t) for name, t in times.items()}


@torch.inference_mode()
def time_side_by_side(models: Mapping[str, nn.Module], example: Any, **timing: Any) -> dict[str, Timing]:
    """:func:`interleaved_timings` of a forward of each model on ``example`` (bound to each one's
    ``forward``, :func:`bound_call`), in eval mode (each submodule's own mode comes back after)."""
    from lightning_slim.batches import move_to

    with contextlib.ExitStack() as modes:
        fns = {}
        for name, model in models.items():
            target, args, kwargs = bound_call(model, example)
            modes.enter_context(evaluating(target))
            fns[name] = functools.partial(target, *move_to(args, "cpu"), **move_to(kwargs, "cpu"))
        return interleaved_timings(fns, **timing)


def cpu_latency_ms(model: nn.Module, example_input: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of a forward pass on CPU in milliseconds (after ``warmup`` passes)."""
    return time_side_by_side({"model": model}, example_input, warmup=warmup, rounds=repeats)["model"].median_ms


def measure(
    model: nn.Module, example_input: Any = None, latency: bool = True, warmup: int = 3, repeats: int = 10
) -> dict[str, Any]:
    """All of the above in one dict. MACs and latency need ``example_input`` (a CPU batch); what
    cannot be measured on this model is a ``macs_error`` / ``latency_error`` row saying why. A
    deployed file (:class:`Artifact`) has its bytes and latency measured, no parameters or graph."""
    model = model.cpu() if next(model.parameters(), torch.empty(0)).device.type != "cpu" else model
    artifact = isinstance(model, Artifact)
    out: dict[str, Any] = {}
    if not artifact:
        out |= {"params": count_parameters(model), "nonzero_params": count_nonzero_parameters(model)}
    out["size_bytes"] = shipped_bytes(model)
    if example_input is None:
        return out
    if not artifact:
        first = first_rows(example_input, 1)
        try:
            out["macs"] = count_macs(model, first)
            tokens = token_count(first)
            if tokens:
                out["macs_per_token"] = out["macs"] / tokens
        except Exception as err:  # a model torch-pruning cannot trace still gets the rest measured
            out["macs_error"] = f"not measurable: {type(err).__name__}: {err}"[:240]
    if latency:
        try:
            timing = time_side_by_side({"model": model}, example_input, warmup=warmup, rounds=repeats)["model"]
            out |= {"latency_ms": timing.median_ms, "latency_iqr_ms": timing.iqr_ms}
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


def interleaved_latency_ms(
    fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3, rounds: int = 5
) -> dict[str, float]:
    """Median milliseconds per call of each zero-argument function, timed side by side
    (:func:`interleaved_timings`)."""
    with torch.inference_mode():
        timings = interleaved_timings(fns, repeats=repeats, warmup=warmup, rounds=rounds)
    return {name: t.median_ms for name, t in timings.items()}


def compare_latency(
    models: dict[str, nn.Module], x: Any, repeats: int = 20, warmup: int = 3, rounds: int = 5
) -> dict[str, float]:
    """Median milliseconds of a forward of each model (torch modules and ``OrtModel``s) on ``x``,
    timed side by side (:func:`time_side_by_side`)."""
    timings = time_side_by_side(models, x, repeats=repeats, warmup=warmup, rounds=rounds)
    return {name: t.median_ms for name, t in timings.items()}
