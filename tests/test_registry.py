"""The registry finds every technique from its folder: a new technique (low-rank factorization was the
first) joins the package's public names, the docs site, the README's table and the packaging checks
with no edit to a shared module."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

import lightning_slim
from lightning_slim.core import registry
from lightning_slim.core.callback import SlimCallback

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"distillation", "factorization", "pruning", "quantization", "selection"}


def test_every_technique_folder_is_found_with_its_callback():
    found = {t.folder: t.callback for t in registry.techniques()}
    assert set(found) == SHIPPED, found
    for t in registry.techniques():
        callback = getattr(lightning_slim, t.callback)  # the public import resolves through the registry
        assert issubclass(callback, SlimCallback) and callback.__module__.startswith(t.module)
        assert t.callback in lightning_slim.__all__ and t.card.is_file()
        assert hasattr(importlib.import_module(f"{t.module}.functional"), "__doc__")  # the Lightning-free core
        assert (ROOT / "tests" / "cases" / f"{t.folder}.py").is_file(), f"{t.folder} has no case in the generic suite"


def test_every_technique_config_is_public_and_is_the_callbacks():
    """``from lightning_slim import PruningConfig`` works for each technique, and it is the class the
    callback builds its ``config`` from (torchao's style: ``Callback(config=Config(...))``)."""
    for t in registry.techniques():
        assert t.config is not None, f"{t.callback} declares no `self.config: <Config> = ...`"
        config = getattr(lightning_slim, t.config)
        assert dataclasses.is_dataclass(config) and t.config in lightning_slim.__all__
        required = {"teacher": torch.nn.Linear(1, 1)} if t.folder == "distillation" else {}  # its one required field
        callback = getattr(lightning_slim, t.callback)(config=config(**required))
        assert type(callback.config) is config


def test_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert registry.with_readme_rows(readme) == readme, "README.md's table of techniques is stale: run `make readme`"
    for t in registry.techniques():
        assert f"`{t.callback}`" in readme


def test_no_shared_module_names_the_factorization_technique():
    """The proof the issue asks for: the fifth technique lives in its folder alone."""
    package = ROOT / "lightning_slim"
    outside = [
        p.relative_to(ROOT).as_posix()
        for p in package.rglob("*.py")
        if "factorization" not in p.parts and "LowRankFactorization" in p.read_text()
    ]
    assert not outside, outside


def test_a_folder_with_two_callbacks_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "twice"
    folder.mkdir()
    (folder / "__init__.py").write_text('"""Two callbacks."""\n')
    (folder / "README.md").write_text("# Twice\n")
    (folder / "callback.py").write_text("class A(SlimCallback):\n    pass\n\n\nclass B(SlimCallback):\n    pass\n")
    monkeypatch.setattr(registry, "PACKAGE", tmp_path)
    registry.techniques.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"twice/callback.py defines \['A', 'B'\]"):
            registry.techniques()
    finally:
        monkeypatch.undo()
        registry.techniques.cache_clear()
