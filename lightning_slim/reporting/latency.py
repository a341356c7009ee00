"""The report's latency: at which batch to time (a rule that fits the task) and every model timed
side by side at the end of fit. Plain torch, no Lightning.

>>> from torch import nn
>>> import torch
>>> wide = nn.Linear(8, 2**20)  # 4 MiB of float32 output per row
>>> latency_rows(wide, ((torch.randn(100, 8),), {}), available=100, requested=None)
64
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.batches import example_count, move_to, slice_batch
from lightning_slim.modules import call_arguments, forward_target
from lightning_slim.reporting.generation import generation_speed
from lightning_slim.reporting.measure import (
    as_call,
    bound_call,
    cpu_int8_capability,
    first_rows,
    main_input,
    output_bytes,
    time_side_by_side,
)

OUTPUT_BUDGET_BYTES = 256 * 2**20  # what one timed call may return at the automatic latency batch
LATENCY_BUDGET_S = 2.0  # per batch size: rounds until this much time has passed (5 to 50 rounds)


def latency_rows(model: nn.Module, call: Any, available: int, requested: int | None) -> int:
    """Rows per timed call: ``requested`` when given; else the ``available`` rows of the first
    training batch (what the user's loader feeds), cut so that one call's output stays within
    :data:`OUTPUT_BUDGET_BYTES` (measured from one row's output: a language model's logits are
    batch x sequence x vocabulary)."""
    if requested is not None:
        return requested
    try:
        per_row = output_bytes(model, first_rows(call, 1))
    except Exception:  # a model that cannot run on one row: timing it will say why (latency_error)
        return available
    return max(1, min(available, OUTPUT_BUDGET_BYTES // max(per_row, 1)))


def measured_call(
    model: nn.Module, batch: Any, input_fn: Callable | None, requested: int | None, timed: bool = True
) -> Any:
    """What the report measures: ``model``'s own call on the first training batch, on CPU (a tensor,
    or an ``(args, kwargs)`` call), with :func:`latency_rows` rows when it will be ``timed``."""
    n = example_count(batch)
    if input_fn is not None:
        call: Any = ((input_fn(batch).detach().cpu(),), {})
    else:
        _, target = forward_target(model)
        call = move_to(tuple(call_arguments(target, batch)), "cpu")
    rows = latency_rows(model, call, n, requested) if timed else n
    call = slice_batch(call, torch.arange(rows) % n, size=n)
    return call[0][0] if len(call[0]) == 1 and not call[1] else call


def prompt_of(example: Any) -> torch.Tensor | None:
    """The first row of an example's token ids (its main input, when ``(B, T)`` integers), else None."""
    ids = main_input(example)
    ok = isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()
    return ids[:1] if ok else None


def time_models(
    models: Mapping[str, nn.Module],
    example: Any,
    prompt: torch.Tensor | None = None,
    generate_tokens: int = 0,
    generating: Collection[str] = (),
) -> dict[str, dict[str, Any]]:
    """Every model timed side by side on ``example`` at batch 1 and at its own batch (keys
    ``latency_ms_batch_1`` and ``latency_ms``, each with its ``latency_iqr_ms``), and, with a
    ``prompt``, the models named in ``generating`` generating ``generate_tokens`` tokens at batch 1
    side by side. A model that cannot run on the example gets a ``latency_error`` and the others
    are still timed; one whose ``forward`` takes fewer of the example's inputs (a deployed file
    without the attention mask) gets a ``latency_note`` naming what it was timed without."""
    times: dict[str, dict[str, Any]] = {name: {} for name in models}
    batch = example_count(as_call(example))
    for name, model in models.items():
        left_out = unused_inputs(model, example)
        if left_out:
            times[name]["latency_note"] = f"its forward does not take {', '.join(left_out)}: timed without"
    for rows in sorted({1, batch}):
        x = first_rows(example, rows)
        runnable = {}
        for name, model in models.items():  # one call each: it warms up, and says who cannot run
            try:
                time_side_by_side({name: model}, x, warmup=0, rounds=1)
                runnable[name] = model
            except Exception as err:
                times[name]["latency_error"] = f"not measurable: {type(err).__name__}: {err}"[:240]
        suffix = "_batch_1" if rows != batch else ""
        for name, t in time_side_by_side(runnable, x, warmup=0, budget_s=LATENCY_BUDGET_S).items():
            times[name] |= {f"latency_ms{suffix}": t.median_ms, f"latency_iqr_ms{suffix}": t.iqr_ms}
            times[name] |= {"latency_batch": batch, "latency_samples": t.samples}
    generators = {name: models[name] for name in generating if name in models}
    if prompt is not None and generate_tokens and generators:
        with torch.random.fork_rng(devices=[]):
            for name, speed in generation_speed(generators, prompt, generate_tokens).items():
                times[name] |= speed
    return times


def unused_inputs(model: nn.Module, example: Any) -> list[str]:
    """The example's keyword tensors that ``model``'s forward is not given (:func:`bound_call`)."""
    _, args, kwargs = bound_call(model, example)
    given = {k: v for k, v in as_call(example)[1].items() if isinstance(v, torch.Tensor)}
    return [k for k, v in given.items() if k not in kwargs and not any(v is a for a in args)]


def serving_rows(times: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int]) -> dict[str, Any]:
    """The deployed model beside a converting technique's float forms (``sizes``: bytes shipped per
    model; ``times``: :func:`time_models`): per batch, milliseconds, spread and the deployed
    model's speed-up over each, with the CPU's int8 capability."""
    names = [n for n in sizes if "latency_ms" in times.get(n, {})]
    out: dict[str, Any] = {"cpu": cpu_int8_capability()}
    out |= {f"{n}_bytes": b for n, b in sizes.items() if b is not None}
    batch = next((times[n]["latency_batch"] for n in names), None)
    for rows in sorted({1, batch} - {None}):
        suffix = "_batch_1" if rows != batch else ""
        row: dict[str, float] = {}
        for n in names:
            row |= {f"{n}_ms": times[n][f"latency_ms{suffix}"], f"{n}_iqr_ms": times[n][f"latency_iqr_ms{suffix}"]}
        if "deployed" in names:
            row |= {f"speedup_vs_{n}": row[f"{n}_ms"] / row["deployed_ms"] for n in names if n != "deployed"}
        out[f"batch_{rows}"] = row
    return out
