"""The documentation site builds with ``mkdocs build --strict`` and shows what it promises: the README,
the four method cards, the architecture page, the API reference of every public name, the changelog."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_slim

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = ("pruning", "quantization", "distillation", "selection")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def article(site: Path, page: str) -> str:
    text = (site / page / "index.html").read_text(encoding="utf-8")
    return text[text.index("<article") : text.index("</article>")]


def first_heading(markdown: Path) -> str:
    return next(line[2:].strip() for line in markdown.read_text().splitlines() if line.startswith("# "))


def visible(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_home_is_the_readme_with_links_to_the_method_cards(site):
    home = article(site, "")
    assert "Quick start" in visible(home) and "make demo" in visible(home)
    for technique in TECHNIQUES:
        assert f'href="methods/{technique}/"' in home, f"README's link to the {technique} card was not rewritten"


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_method_card_is_included_whole(site, technique):
    card = ROOT / "lightning_slim" / technique / "README.md"
    page = visible(article(site, f"methods/{technique}"))
    headings = [line.lstrip("#").strip() for line in card.read_text().splitlines() if line.startswith("## ")]
    assert headings and all(h.replace("`", "") in page for h in headings), headings
    assert first_heading(card).replace("`", "") in page


def test_architecture_and_changelog_pages(site):
    assert first_heading(ROOT / "docs" / "architecture.md") in visible(article(site, "architecture"))
    changelog = visible(article(site, "changelog"))
    assert "Unreleased" in changelog and lightning_slim.__version__ in changelog


def test_api_reference_documents_every_public_name(site):
    api = article(site, "api")
    # mkdocstrings anchors an object at the module that defines it: look each name up by its heading id
    ids = set(re.findall(r'id="([\w.]+)"', api))
    missing = [name for name in lightning_slim._PUBLIC if not any(i.endswith(f".{name}") for i in ids)]
    assert not missing, f"not in the API reference: {missing}"
    functional = article(site, "api/functional")
    for technique in TECHNIQUES:
        assert f'id="lightning_slim.{technique}.functional.' in functional, technique


def test_docstrings_become_markdown():
    spec = importlib.util.spec_from_file_location("docstrings", ROOT / "docs" / "docstrings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "See :class:`~.configs.Window` and :func:`lightning_slim.targets.select`.\n\n    >>> 1 + 1\n    2\n\nDone."
    assert module.markdown_docstring(text) == (
        "See `Window` and `lightning_slim.targets.select`.\n\n    ```pycon\n    >>> 1 + 1\n    2\n    ```\n\nDone."
    )
    fenced = "```python\n>>> kept as it is\n```"
    assert module.markdown_docstring(fenced) == fenced
