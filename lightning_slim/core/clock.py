"""The training clock every schedule is written in: completed epochs or optimizer steps.

A :class:`Moment` is a point on that clock (``Moment("epoch", 3)``). Techniques schedule
their phases with moments, and :mod:`lightning_slim.core.compose` compares moments that two
techniques declare (they must be in the same unit to be ordered).

>>> m = Moment("epoch", 2)
>>> m.before(Moment("epoch", 3)), m.before(Moment("step", 900))
(True, None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_slim.core.arguments import check_choice, check_int

UNITS = ("epoch", "step")


def check_unit(unit: str, name: str = "unit") -> str:
    return check_choice(name, unit, UNITS)


def now(trainer: Any, unit: str) -> int:
    """Where training is, in ``unit``: ``trainer.current_epoch`` or ``trainer.global_step``."""
    return trainer.current_epoch if unit == "epoch" else trainer.global_step


@dataclass(frozen=True)
class Moment:
    unit: str
    value: int

    def __post_init__(self):
        check_unit(self.unit)
        check_int("moment", self.value, minimum=0)

    def reached(self, trainer: Any) -> bool:
        return now(trainer, self.unit) >= self.value

    def before(self, other: Moment) -> bool | None:
        """Strictly earlier than ``other``; None when the units differ (they cannot be ordered)."""
        return self.value < other.value if self.unit == other.unit else None

    def __str__(self) -> str:
        return f"{self.unit} {self.value}"
