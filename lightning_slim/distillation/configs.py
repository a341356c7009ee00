"""The groups of ``KnowledgeDistillation``'s options, as small validated dataclasses (torchao-style
configs). Each is YAML-expressible (LightningCLI builds it from a mapping) and also accepted as
a plain dict in Python.

>>> DistillationSchedule(start_step=10, stop_step=5)
Traceback (most recent call last):
...
ValueError: stop_step=5 must be greater than start_step=10
>>> FeatureDistillation(pairs={"net.5": "net.8"}).loss
'mse'
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from lightning_slim.arguments import check_choice, check_int, check_order, check_range

FEATURE_LOSSES = ("mse", "cosine")
CONVENTIONS = ("weighted", "additive")


@dataclass(frozen=True)
class DistillationSchedule:
    """Distil for ``start_step <= step < stop_step`` (None: to the end); anneal ``alpha`` /
    ``temperature`` linearly to ``alpha_final`` / ``temperature_final`` over ``anneal_steps``
    optimizer steps from ``start_step`` (default: to ``stop_step`` or the end of training)."""

    start_step: int = 0
    stop_step: int | None = None
    alpha_final: float | None = None
    temperature_final: float | None = None
    anneal_steps: int | None = None

    def __post_init__(self):
        check_int("start_step", self.start_step, minimum=0)
        check_int("stop_step", self.stop_step, minimum=1, allow_none=True)
        check_order("start_step", self.start_step, "stop_step", self.stop_step)
        check_range("alpha_final", self.alpha_final, 0.0, 1.0, allow_none=True)
        check_range("temperature_final", self.temperature_final, 0.0, low_open=True, allow_none=True)
        check_int("anneal_steps", self.anneal_steps, minimum=1, allow_none=True)


@dataclass(frozen=True)
class FeatureDistillation:
    """Feature KD: ``weight * loss(proj(student feature), teacher feature)`` for each
    ``{student module: teacher module}`` pair; a learned projection (in the student's optimizer
    and checkpoint, removed at export) maps the student's width in dimension ``dim`` to the
    teacher's when they differ."""

    pairs: dict[str, str] = field(default_factory=dict)
    loss: str = "mse"
    weight: float = 1.0
    dim: int = 1

    def __post_init__(self):
        if not isinstance(self.pairs, Mapping) or not self.pairs:
            raise ValueError(f"pairs={self.pairs!r} must be a non-empty dict {{student module: teacher module}}")
        check_choice("loss", self.loss, FEATURE_LOSSES)
        check_range("weight", self.weight, 0.0)


@dataclass(frozen=True)
class LogitsSource:
    """Where the logits are: the output of a submodule (``student_module`` / ``teacher_module``,
    default the whole module), read by ``output_fn`` / ``teacher_output_fn`` (default: a tensor,
    ``.logits`` or the first tensor of the output; a callable or a dotted path)."""

    student_module: str | None = None
    teacher_module: str | None = None
    output_fn: Callable[[Any], Any] | str | None = None
    teacher_output_fn: Callable[[Any], Any] | str | None = None


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Store teacher outputs by example index (``index_fn(batch)``, default the batch's
    ``index``) so the teacher runs once per example; needs a deterministic input per index (no
    random augmentation). ``checkpoint=False`` rebuilds the cache after a resume instead of
    saving it."""

    checkpoint: bool = True
    index_fn: Callable[[Any], Any] | str | None = None
