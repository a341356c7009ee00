"""``IterativeMagnitudePruning``'s options as one validated dataclass (a YAML mapping in LightningCLI, a
dict or an instance in Python; torchao's ``quantize_(model, Config())`` style). Every check that needs
more than one option runs here, when the config is built: before any Trainer exists.

>>> config = PruningConfig(schedule={"kind": "one_shot", "sparsity": 0.5, "at": 1}, pattern="2:4")
>>> config.events, str(config.parsed_pattern), config.structured
([(1, 0.5)], '2:4', False)
>>> PruningConfig(rewind="init", rewind_step=5)
Traceback (most recent call last):
...
ValueError: rewind='init' rewinds to step 0; use rewind='step' for rewind_step=5
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from lightning_slim.core.arguments import check_choice, check_int
from lightning_slim.pruning.options import check_options
from lightning_slim.pruning.patterns import Pattern, parse_pattern
from lightning_slim.pruning.schedules import GradualSchedule, IMPSchedule, OneShotSchedule, Schedule, parse_schedule

DEFAULT_SCHEDULE = {"kind": "imp", "rounds": 5, "rate": 0.2, "every": 1, "unit": "epoch"}
INPUT_DTYPES = ("auto", "float32", "int64")


@dataclass(frozen=True)
class PruningConfig:
    """What to prune, how, and when (also the arguments of ``IterativeMagnitudePruning``).

    schedule: when and how much to prune, as data: ``{"kind": "imp", "rounds", "rate" or
        "final_sparsity", "every", "start", "unit": "epoch"|"step"}``, ``{"kind": "gradual",
        "final_sparsity", "initial_sparsity", "start", "end", "every", "unit"}`` (Zhu & Gupta) or
        ``{"kind": "one_shot", "sparsity", "at", "unit"}``. Every kind counts in epochs unless
        ``"unit": "step"``. Sparsities are fractions of the target tensors' weights (of their output
        channels / heads with ``pattern="channels"``). A schedule object works too; the config holds
        the parsed object. Default: 5 IMP rounds of 20%, one per epoch.
    targets: what to prune: class names (``"Conv1d"``, ``"torch.nn.Linear"``), module paths
        (``"net.0"``), ``"re:<regex>"`` on paths, or full parameter names
        (``"layers.0.self_attn.in_proj_weight"``). Default: every Linear, Conv, MultiheadAttention
        (``in_proj_weight``) and transformers ``Conv1D`` weight, except a tied output head (an
        ``lm_head`` whose weight is the input embedding: named by its path it is pruned, embedding
        and all); for structural pruning of a transformer, its MLP channels and attention heads.
    exclude: the same kind of specs, removed from ``targets``.
    exclude_classifier: leave the final classifier (the last Linear/Conv layer, or ``classifier``) dense.
        It still counts in the reported sparsity, which is over every target tensor.
    classifier: the classifier's module path, when it is not the last Linear/Conv (or ``classifier``).
    scope: ``"global"`` ranks all target weights together, ``"layer"`` each tensor, ``"row"`` each
        output row. Default: ``"row"`` for Wanda (its comparison group), ``"layer"`` for structural
        pruning of transformers, ``"global"`` otherwise.
    rewind: at each pruning event, ``"none"`` (fine-tune), ``"init"`` (lottery ticket),
        ``"step"`` (to ``rewind_step``, Frankle et al. 2020) or ``"lr"`` (learning-rate rewinding,
        Renda et al. 2020, to ``rewind_step``). Weights and optimizer/scheduler state go back together.
    rewind_step: the optimizer step to snapshot for ``"step"`` and ``"lr"``.
    accuracy_metric: logged metric recorded at each round for the accuracy-vs-sparsity curve (warned
        once if it is never logged; None: no accuracy).
    example_input_shape: input shape for torch-pruning's tracing when the module has no
        ``example_input_array`` (structural only); ``example_input_dtype``: ``"auto"`` (int64 token
        ids when the model has an ``nn.Embedding``), ``"float32"`` or ``"int64"``.
    pattern: ``"unstructured"`` (default), ``"N:M"`` semi-structured (``"2:4"``: 2 of every 4
        consecutive inputs of a row stay; the schedule must end at ``1 - N/M``) or ``"channels"``
        (structural, a smaller, faster model; transformer blocks are sliced directly, other models
        traced with torch-pruning; use ``strategy="ddp"``, not ``ddp_spawn``).
    importance: ``"magnitude"`` (``|W|``) or ``"wanda"`` (``|W|`` times the input channel's norm,
        collected by forward hooks over the training steps since the previous pruning event).
    heads: with ``pattern="channels"`` on a transformer, remove whole attention heads as well as MLP
        channels (``False``: MLP channels only).
    """

    schedule: IMPSchedule | GradualSchedule | OneShotSchedule | dict[str, Any] | None = None
    pattern: str = "unstructured"
    importance: str = "magnitude"
    scope: str | None = None
    targets: list[str] | None = None
    exclude: list[str] | None = None
    exclude_classifier: bool = False
    classifier: str | None = None
    heads: bool = True
    rewind: str = "none"
    rewind_step: int = 0
    accuracy_metric: str | None = "val/acc"
    example_input_shape: list[int] | None = None
    example_input_dtype: str = "auto"

    def __post_init__(self):
        # the schedule is held parsed (frozen: set once, here), so a dict and its object compare equal
        object.__setattr__(
            self, "schedule", parse_schedule(DEFAULT_SCHEDULE if self.schedule is None else self.schedule)
        )
        check_int("rewind_step", self.rewind_step, minimum=0)
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(
                    f"{name}={value!r} must be a list of strings (classes, module paths, 're:<regex>' or "
                    "parameter names)"
                )
        check_choice("example_input_dtype", self.example_input_dtype, INPUT_DTYPES)
        schedule: Schedule = self.schedule  # type: ignore[assignment] - parsed above
        check_options(self.parsed_pattern, self.importance, self.scope, self.rewind, self.rewind_step, schedule)

    @functools.cached_property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def structured(self) -> bool:
        """Structural pruning (``pattern="channels"``): the model's shapes change."""
        return self.parsed_pattern.kind == "channels"

    @property
    def events(self) -> list[tuple[int, float]]:
        """``(time, target sparsity)`` of every pruning event, in the schedule's unit."""
        return self.schedule.events()  # type: ignore[union-attr] - parsed in __post_init__
