"""``LowRankFactorization``'s options as one validated dataclass (a YAML mapping in LightningCLI, a dict
or an instance in Python; torchao's ``quantize_(model, Config())`` style).

>>> FactorizationConfig(energy=0.9).rule
'energy=0.9'
>>> FactorizationConfig(rank=0.25, energy=0.9)
Traceback (most recent call last):
...
ValueError: give rank=0.25 or energy=0.9, not both: one rule chooses each layer's rank
>>> FactorizationConfig(rank=1.5)
Traceback (most recent call last):
...
ValueError: rank=1.5 must be a fraction in (0, 1] of each layer's full rank or a whole number of dimensions >= 1
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_slim.core.arguments import check_fraction, check_int
from lightning_slim.core.clock import Moment, check_unit

DEFAULT_RANK = 0.25  # Composer's default latent fraction


@dataclass(frozen=True)
class FactorizationConfig:
    """What to factorize, to which rank, and when.

    ``rank``: each layer's rank as a fraction in (0, 1] of its full rank ``min(out, in x kernel taps)``
    (at least 1), or an absolute number of dimensions (an integer >= 1). ``energy``: instead, the
    smallest rank whose squared singular values hold this fraction in (0, 1] of the total. Neither:
    ``rank=0.25``. A layer whose rank would not reduce its parameters (``r (out + fan_in) >= out fan_in``)
    or whose smaller side is below ``min_size`` stays dense (listed in the report).
    ``targets`` / ``exclude``: classes, module paths or ``re:`` regexes (``lightning_slim.targets``);
    default: every Linear, Conv1d and Conv2d. ``at`` / ``unit``: when, in epochs or optimizer steps
    (0: before training, in ``setup``)."""

    rank: float | int | None = None
    energy: float | None = None
    targets: list[str] | None = None
    exclude: list[str] | None = None
    min_size: int = 1
    at: int = 0
    unit: str = "epoch"

    def __post_init__(self):
        if self.rank is not None and self.energy is not None:
            raise ValueError(
                f"give rank={self.rank!r} or energy={self.energy!r}, not both: one rule chooses each layer's rank"
            )
        rank = self.rank
        fraction = isinstance(rank, float) and 0 < rank <= 1
        count = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
        if rank is not None and not (fraction or count):
            raise ValueError(
                f"rank={rank!r} must be a fraction in (0, 1] of each layer's full rank or a whole number of "
                "dimensions >= 1"
            )
        check_fraction("energy", self.energy, low_open=True, high_closed=True, allow_none=True)
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"{name}={value!r} must be a list of strings (classes, module paths or 're:<regex>')")
        check_int("min_size", self.min_size, minimum=1)
        check_int("at", self.at, minimum=0)
        check_unit(self.unit)

    @property
    def rule(self) -> str:
        if self.energy is not None:
            return f"energy={self.energy:g}"
        return f"rank={self.rank if self.rank is not None else DEFAULT_RANK!r}"

    @property
    def rank_or_default(self) -> float | int | None:
        return self.rank if self.rank is not None or self.energy is not None else DEFAULT_RANK

    @property
    def moment(self) -> Moment:
        return Moment(self.unit, self.at)
