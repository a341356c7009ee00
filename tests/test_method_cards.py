"""Every argument name in a method card's knob table is one the callback really takes.

A knob table is a Markdown table whose first header cell is ``argument``; each backticked name in its
first column must be a parameter of the constructor of the callback the card is about (named in the
card's title), or a field of a dataclass config that constructor takes written with its parameter
(``features.pooling``: the field ``pooling`` of the config the parameter ``features`` takes), or a
field of a dataclass the row itself names (``IMPSchedule``). Following a card must never end in
``TypeError: unexpected keyword argument``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import types
import typing
from pathlib import Path

import pytest

import lightning_slim

ROOT = Path(__file__).resolve().parents[1]
CARDS = sorted(ROOT.glob("lightning_slim/*/README.md"))


def knob_rows(text: str) -> list[list[str]]:
    """The rows (as cells) of every table whose first header cell is ``argument``."""
    rows, in_table = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not in_table:
            in_table = cells[0].lower() == "argument"
            header = True
            continue
        if header:  # the |---| line under the header
            header = False
            continue
        rows.append(cells)
    return rows


def dataclasses_in(annotation) -> list[type]:
    """The dataclass types an annotation mentions (``Config | dict | None``, ``list[Config]``...)."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return [annotation]
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is not None:
        return [c for arg in typing.get_args(annotation) for c in dataclasses_in(arg)]
    return []


def technique_dataclass(technique: str, name: str) -> type | None:
    """A dataclass the technique's own package defines (or re-exports) under ``name``."""
    folder = ROOT / "lightning_slim" / technique
    modules = [importlib.import_module(f"lightning_slim.{technique}")] + [
        importlib.import_module(f"lightning_slim.{technique}.{p.stem}")
        for p in folder.glob("*.py")
        if p.stem != "__init__"
    ]
    for module in modules:
        found = getattr(module, name, None)
        if isinstance(found, type) and dataclasses.is_dataclass(found):
            return found
    return None


def accepted(cls: type) -> tuple[set[str], dict[str, set[str]]]:
    """(constructor parameters, {parameter: fields of the dataclass configs it takes})."""
    hints = typing.get_type_hints(cls.__init__)
    params = {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    configs = {
        name: {f.name for c in dataclasses_in(hints.get(name)) for f in dataclasses.fields(c)} for name in params
    }
    return params, configs


def bad_names(text: str, technique: str) -> tuple[str, list[str], int]:
    """(the card's class, the knob names it does not take, how many names were checked)."""
    title = next(line for line in text.splitlines() if line.startswith("# "))
    classes = [c for w in re.findall(r"\w+", title) if isinstance(c := getattr(lightning_slim, w, None), type)]
    assert classes, f"the {technique} card's title {title!r} names no public class of lightning_slim"
    cls = classes[0]
    params, configs = accepted(cls)
    rows = knob_rows(text)
    bad, checked = [], 0
    for cells in rows:
        named = {f.name for n in re.findall(r"`(\w+)`", " ".join(cells)) if (dc := technique_dataclass(technique, n))
                 for f in dataclasses.fields(dc)}  # fmt: skip
        for name in re.findall(r"`([\w.]+)`", cells[0]):
            checked += 1
            head, _, field = name.partition(".")
            if field:
                ok = head in params and field in configs[head]
            else:
                ok = name in params or name in named
            if not ok:
                bad.append(name)
    return cls.__name__, bad, checked


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.parent.name)
def test_every_knob_is_a_real_argument(card):
    cls, bad, checked = bad_names(card.read_text(), card.parent.name)
    assert checked >= 5, f"{card}: found only {checked} knob names; is its knob table headed 'argument'?"
    assert not bad, f"{card.parent.name}/README.md names {bad}, which {cls}'s constructor does not take"


def test_the_check_catches_names_the_constructor_does_not_take():
    card = (ROOT / "lightning_slim" / "distillation" / "README.md").read_text()
    wrong = card.replace(
        "| `seed` |", "| `seed`, `student_logits_module`, `features.stride`, `cache_teacher.top_k` |", 1
    )
    assert wrong != card
    assert bad_names(wrong, "distillation")[1] == ["student_logits_module", "features.stride"]
    # a config's field without its parameter is not a constructor argument either
    bare = card.replace("| `seed` |", "| `seed`, `start_step` |", 1)
    assert bad_names(bare, "distillation")[1] == ["start_step"]
