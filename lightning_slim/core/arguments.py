"""Argument validators every technique uses: each raises a ``ValueError`` that names the value
and what is allowed, before training starts.

>>> check_fraction("keep", 0.25, low_open=True, high_closed=True)
0.25
>>> check_int("rounds", 0, minimum=1)
Traceback (most recent call last):
...
ValueError: rounds=0 must be an integer >= 1
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def check_int(name: str, value: Any, minimum: int = 0, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}" + (" or None" if allow_none else ""))
    return value


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> Any:
    """``low <= value <= high`` (``<`` where open; ``high=None`` is unbounded)."""
    if value is None and allow_none:
        return value
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if (
        bad_type
        or (value <= low if low_open else value < low)
        or (high is not None and (value >= high if high_open else value > high))
    ):
        upper = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is outside the allowed range {'(' if low_open else '['}{low:g}, {upper}")
    return value


def check_fraction(
    name: str, value: Any, low_open: bool = False, high_closed: bool = False, allow_none: bool = False
) -> Any:
    """A fraction in [0, 1) by default; ``low_open`` / ``high_closed`` move the ends."""
    return check_range(name, value, 0.0, 1.0, low_open=low_open, high_open=not high_closed, allow_none=allow_none)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")
    return value


def check_order(first: str, a: int | None, second: str, b: int | None) -> None:
    """``a < b`` when both are set (a window such as ``start_step < stop_step``)."""
    if a is not None and b is not None and not a < b:
        raise ValueError(f"{second}={b!r} must be greater than {first}={a!r}")


def as_config(cls: type, value: Any, name: str) -> Any:
    """A dataclass config from ``value``: an instance of ``cls``, a dict of its fields, or None.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Window:
    ...     start: int = 0
    >>> as_config(Window, {"start": 3}, "window"), as_config(Window, {"stop": 3}, "window")
    Traceback (most recent call last):
    ...
    ValueError: window has no option 'stop'; its options are ['start']
    """
    import dataclasses

    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ValueError(f"{name} has no option {unknown[0]!r}; its options are {fields}")
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} or a dict of its options; got {type(value).__name__}")


def config_from(cls: type, config: Any, options: Mapping[str, Any], name: str = "config") -> Any:
    """A callback's whole config (torchao style): ``config`` (an instance of ``cls`` or a dict of its
    fields) or, without it, ``cls(**options)`` from the callback's keyword shortcuts; options that differ
    from their defaults beside a ``config`` are an error (one of them would be ignored). ``options`` may
    be the constructor's ``locals()``: only ``cls``'s fields are read from it.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Config:
    ...     rank: int = 4
    >>> config_from(Config, {"rank": 2}, {"rank": 4}), config_from(Config, None, {"rank": 8})
    (Config(rank=2), Config(rank=8))
    >>> config_from(Config, Config(), {"rank": 8})
    Traceback (most recent call last):
    ...
    ValueError: give the options either in config or as arguments, not both (also given: ['rank'])
    """
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    options = {k: v for k, v in options.items() if k in fields}
    if config is None:
        return cls(**options)
    defaults = {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }
    # equal and of the same type (a tensor or a model is never compared by value): left at its default
    same = {k: v is defaults[k] or (type(v) is type(defaults[k]) and v == defaults[k]) for k, v in options.items()}
    changed = sorted(k for k, kept in same.items() if not kept)
    if changed:
        raise ValueError(f"give the options either in {name} or as arguments, not both (also given: {changed})")
    return as_config(cls, config, name)
