"""Pruning schedules as data: each compiles to a list of events ``(time, target sparsity)``.

Time is counted in ``unit``: completed epochs (``"epoch"``, the default of every kind) or optimizer
steps (``"step"``).
An event at time ``t`` fires before training continues from ``t``; the target sparsity is
the fraction of pruned-layer weights (or channels, structurally) that must be gone after it.

A schedule is a dict that YAML can write (``kind`` picks the class) or one of the classes:

>>> parse_schedule({"kind": "imp", "rounds": 3, "rate": 0.5, "every": 2}).events()
[(2, 0.5), (4, 0.75), (6, 0.875)]
>>> [round(s, 3) for _, s in GradualSchedule(final_sparsity=0.9, start=0, end=30, every=10).events()]
[0.0, 0.633, 0.867, 0.9]
>>> OneShotSchedule(sparsity=0.5, at=0, unit="step").events()
[(0, 0.5)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_slim.core.arguments import check_fraction, check_int
from lightning_slim.core.clock import check_unit


@dataclass(frozen=True)
class IMPSchedule:
    """Iterative magnitude pruning (Frankle & Carbin 2019): every ``every`` units, for ``rounds``
    rounds, prune ``rate`` of the weights that remain. Give ``final_sparsity`` instead of ``rate``
    to derive the rate: ``1 - (1 - final_sparsity) ** (1 / rounds)``. Train ``every`` more units
    after the last round (``max_epochs = (rounds + 1) * every`` with ``start=0``)."""

    rounds: int = 5
    rate: float | None = 0.2
    final_sparsity: float | None = None
    every: int = 1
    start: int = 0
    unit: str = "epoch"
    kind: str = "imp"

    def __post_init__(self):
        check_unit(self.unit)
        check_int("rounds", self.rounds, minimum=1)
        check_int("every", self.every, minimum=1)
        check_int("start", self.start, minimum=0)
        if self.final_sparsity is not None:
            check_fraction("final_sparsity", self.final_sparsity)
        elif self.rate is None:
            raise ValueError("IMP schedule needs rate (pruned per round) or final_sparsity")
        else:
            check_fraction("rate", self.rate)

    def per_round_rate(self) -> float:
        if self.final_sparsity is not None:
            return 1.0 - (1.0 - self.final_sparsity) ** (1.0 / self.rounds)
        return float(self.rate)

    def events(self) -> list[tuple[int, float]]:
        keep = 1.0 - self.per_round_rate()
        return [(self.start + r * self.every, 1.0 - keep**r) for r in range(1, self.rounds + 1)]


@dataclass(frozen=True)
class GradualSchedule:
    """Zhu & Gupta (2017) gradual pruning: every ``every`` units from ``start`` to ``end`` the target
    sparsity follows ``s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3``."""

    final_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    start: int = 0
    end: int = 10
    every: int = 1
    unit: str = "epoch"
    kind: str = "gradual"

    def __post_init__(self):
        check_unit(self.unit)
        check_fraction("final_sparsity", self.final_sparsity)
        check_fraction("initial_sparsity", self.initial_sparsity)
        check_int("start", self.start, minimum=0)
        check_int("every", self.every, minimum=1)
        if not isinstance(self.end, int) or self.end <= self.start:
            raise ValueError(f"end={self.end!r} must be an integer after start={self.start}")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity={self.initial_sparsity} exceeds final_sparsity={self.final_sparsity}")

    def events(self) -> list[tuple[int, float]]:
        span = self.end - self.start
        times = [*list(range(self.start, self.end, self.every)), self.end]
        si, sf = self.initial_sparsity, self.final_sparsity
        return [(t, sf + (si - sf) * (1 - (t - self.start) / span) ** 3) for t in times]


@dataclass(frozen=True)
class OneShotSchedule:
    """Prune once, to ``sparsity``, at time ``at`` (0: before training starts)."""

    sparsity: float = 0.5
    at: int = 0
    unit: str = "epoch"
    kind: str = "one_shot"

    def __post_init__(self):
        check_unit(self.unit)
        check_fraction("sparsity", self.sparsity)
        check_int("at", self.at, minimum=0)

    def events(self) -> list[tuple[int, float]]:
        return [(self.at, float(self.sparsity))]


Schedule = IMPSchedule | GradualSchedule | OneShotSchedule
KINDS: dict[str, type] = {"imp": IMPSchedule, "gradual": GradualSchedule, "one_shot": OneShotSchedule}


def parse_schedule(spec: Mapping[str, Any] | Schedule) -> Schedule:
    """A schedule from a YAML-style dict (``{"kind": "imp", ...}``) or a schedule object."""
    if isinstance(spec, tuple(KINDS.values())):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"schedule={spec!r} must be a dict with a 'kind' in {sorted(KINDS)} or a schedule object")
    spec = dict(spec)
    kind = spec.pop("kind", "imp")
    if kind not in KINDS:
        raise ValueError(f"schedule kind={kind!r} is not one of {sorted(KINDS)}")
    cls = KINDS[kind]
    allowed = {f.name for f in dataclasses.fields(cls)} - {"kind"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"unknown {kind} schedule keys {unknown}; allowed are {sorted(allowed)}")
    return cls(**spec)


def as_dict(schedule: Schedule) -> dict[str, Any]:
    return dataclasses.asdict(schedule)


def over_in_first_epoch(
    schedule: Schedule, events: list[tuple[int, float]], steps_per_epoch: int, total_steps: int | None
) -> str | None:
    """The problem with a schedule of several events counted in steps that is over within the first
    epoch of a longer training (``"end": 6`` meant as epochs), or None. A single event (one-shot)
    at a step is taken as meant.

    >>> gradual = GradualSchedule(final_sparsity=0.8, start=0, end=6, every=1, unit="step")
    >>> print(over_in_first_epoch(gradual, gradual.events(), steps_per_epoch=50, total_steps=500))
    ... # doctest: +ELLIPSIS
    its 7 events (steps 0 to 6) all come in the first epoch (50 steps) of a 500-step training; ...
    >>> over_in_first_epoch(gradual, gradual.events(), steps_per_epoch=50, total_steps=50) is None
    True
    """
    last = events[-1][0]
    if schedule.unit != "step" or len(events) < 2 or not total_steps or not last < steps_per_epoch < total_steps:
        return None
    return (
        f"its {len(events)} events (steps {events[0][0]} to {last}) all come in the first epoch "
        f"({steps_per_epoch} steps) of a {total_steps}-step training; times are counted in "
        "unit='step': if you meant epochs, set 'unit': 'epoch' (the default)"
    )


def timing(
    schedule: Schedule,
    done: int,
    steps_per_epoch: int,
    total_steps: float,
    max_epochs: int | None,
    rewind_step: int | None = None,
) -> tuple[str | None, str | None]:
    """``(warning, info)`` about when the events after the first ``done`` come in a training of
    ``total_steps`` optimizer steps (``inf``: unknown), ``steps_per_epoch`` each: the warning of
    :func:`over_in_first_epoch`; the info that epoch events at or after ``max_epochs`` are never
    trained. Rewinding to a ``rewind_step`` after the first epoch event is a ``ValueError`` (step
    schedules are checked at construction)."""
    events = schedule.events()
    name = f"IterativeMagnitudePruning: the schedule {as_dict(schedule)}"
    total = int(total_steps) if math.isfinite(total_steps) else None
    problem = over_in_first_epoch(schedule, events, steps_per_epoch, total)
    late = [
        t for t, _ in events[done:] if schedule.unit == "epoch" and max_epochs not in (None, -1) and t >= max_epochs
    ]
    info = f"{name}: events at epochs {late} come at or after max_epochs={max_epochs}; those rounds will not be trained"
    first = events[0][0] * steps_per_epoch
    if rewind_step is not None and schedule.unit == "epoch" and rewind_step > first:
        raise ValueError(
            f"rewind_step={rewind_step} is later than the first pruning at epoch {events[0][0]} (step {first})"
        )
    return (f"{name}: {problem}" if problem else None), (info if late else None)
