"""The groups of ``OnlineDataSelection``'s options as small validated dataclasses (YAML mappings
in LightningCLI, dicts or instances in Python).

>>> SelectionWindow(start_step=5, stop_step=5)
Traceback (most recent call last):
...
ValueError: stop_step=5 must be greater than start_step=5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_slim.core.arguments import check_choice, check_int, check_order

OUTSIDE_WINDOW = ("uniform", "full")


@dataclass(frozen=True)
class SelectionWindow:
    """Select only for optimizer steps in ``[start_step, stop_step)`` (None: to the end). Outside,
    ``outside="uniform"`` trains on a random sub-batch of the same size (no scoring), ``"full"``
    on the whole super-batch."""

    start_step: int = 0
    stop_step: int | None = None
    outside: str = "uniform"

    def __post_init__(self):
        check_int("start_step", self.start_step, minimum=0)
        check_int("stop_step", self.stop_step, minimum=1, allow_none=True)
        check_order("start_step", self.start_step, "stop_step", self.stop_step)
        check_choice("outside", self.outside, OUTSIDE_WINDOW)

    def contains(self, step: int) -> bool:
        return step >= self.start_step and (self.stop_step is None or step < self.stop_step)


@dataclass(frozen=True)
class JointSelection:
    """JEST joint selection for batch-level losses: ``pair_loss_fn(model, batch) -> (B, B)`` pair
    losses (default: the module's ``per_pair_loss(batch)``), chosen in ``num_chunks`` chunks."""

    pair_loss_fn: Callable[[Any, Any], Any] | str | None = None
    num_chunks: int = 4

    def __post_init__(self):
        check_int("num_chunks", self.num_chunks, minimum=1)
