"""The documentation site builds with ``mkdocs build --strict`` and shows what it promises: the README,
every technique's method card (found by the registry), the architecture page, the API reference of every
public name, the changelog."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_slim
from lightning_slim.core import registry

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = [t.folder for t in registry.techniques()]  # every technique folder, found by the registry


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
    for technique in TECHNIQUES:  # README's table of folders links every card (test_readme_lists_every_technique)
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
    missing = [name for name in lightning_slim.__all__ if not any(i.endswith(f".{name}") for i in ids)]
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


# --- what a new user reads first: README.md, shown on the package index too ---------------------------
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "lightning_slim").glob("*/README.md"))]


def project_table() -> str:
    return (ROOT / "pyproject.toml").read_text().split("\n[project]\n", 1)[1].split("\n[tool.", 1)[0]


def repository_url() -> str:
    return re.search(r'^Repository = "([^"]+)"$', project_table(), re.M).group(1)


def section(markdown: str, heading: str) -> str:
    return markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def fenced_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\b[^\n]*\n(.*?)^```$", markdown, re.M | re.S)


def test_readme_starts_with_the_pip_line_then_a_short_quick_start_then_the_contributor_commands():
    text = README.read_text()
    first_block = re.search(r"^```(\w+)[^\n]*\n(.*?)^```$", text, re.M | re.S)
    assert first_block.group(1) == "bash" and first_block.group(2).strip() == "pip install lightning-slim"
    assert text.index(first_block.group(0)) < text.index("\n## ")  # above every section
    quick = fenced_blocks(section(text, "Quick start"), "python")[0]
    assert len(quick.strip().splitlines()) <= 15, quick
    assert "MyModel()" in quick and "trainer.fit(" in quick  # on the reader's own module and data
    assert text.index("## Quick start") < text.index("## For contributors")
    contributors = section(text, "For contributors")
    assert "make demo" in contributors and "make test" in contributors


def test_readme_links_work_off_the_repository():
    """README.md is the package index's project page too: a relative link would break there."""
    blob = repository_url() + "/blob/main/"
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    assert targets
    for target in targets:
        assert re.match(r"^https?://|^#", target), f"relative link {target!r} breaks on the package index"
        if target.startswith(repository_url()):
            assert target.startswith(blob), target
            path = target.removeprefix(blob).split("#")[0]
            assert (ROOT / path).exists(), f"{target} points at {path}, which is not in the repository"


def test_project_urls_name_one_repository():
    urls = dict(re.findall(r'^(\w+) = "(https://[^"]+)"$', project_table().split("[project.urls]", 1)[1], re.M))
    assert {"Homepage", "Documentation", "Repository", "Changelog", "Issues"} <= set(urls), urls
    repo = urls["Repository"]
    assert urls["Issues"] == repo + "/issues" and urls["Changelog"].startswith(repo + "/blob/main/")
    assert (ROOT / urls["Changelog"].removeprefix(repo + "/blob/main/")).is_file()
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert f"repo_url: {repo}\n" in mkdocs and f"site_url: {urls['Documentation']}\n" in mkdocs


def test_python_classifiers_match_requires_python():
    table = project_table()
    floor = tuple(map(int, re.search(r'^requires-python = ">=(\d+)\.(\d+)"$', table, re.M).groups()))
    versions = [tuple(map(int, v)) for v in re.findall(r'"Programming Language :: Python :: (\d+)\.(\d+)"', table)]
    assert versions and min(versions) == floor, (floor, versions)
    assert sys.version_info[:2] in versions, "the Python the suite runs on is listed"


def test_compatibility_floors_are_those_of_pyproject():
    from packaging.requirements import Requirement

    table = project_table()
    declared = {}
    for line in re.findall(r'"([A-Za-z][^"\s]*>=[^"]*)"', table):  # dependencies and extras
        req = Requirement(line)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if floors and req.name != "lightning-slim":
            declared.setdefault(req.name, floors[0])
    compat = section(README.read_text(), "Compatibility")
    stated = dict(re.findall(r"([A-Za-z][\w.-]*) >= (\d[\w.]*\w)", compat))
    python = re.search(r'^requires-python = ">=([\d.]+)"$', table, re.M).group(1)
    assert stated.pop("Python") == python
    assert stated, compat
    for name, version in stated.items():
        assert declared.get(name) == version, f"README says {name} >= {version}, pyproject.toml {declared.get(name)}"
    core = [
        Requirement(r).name
        for r in re.findall(r'^    "([^"]+)",$', table.split("dependencies = [", 1)[1].split("]\n", 1)[0], re.M)
    ]
    assert set(core) <= set(stated) and {"torchao", "wandb"} <= set(stated), (core, stated)


def test_every_python_block_of_the_docs_is_collected_as_a_test():
    """pytest-markdown-docs runs each ```python block of README.md, docs/ and the method cards: none is
    left out (a `notest` option or a lost plugin would show here)."""
    expected = sum(len(fenced_blocks(p.read_text(), "(?:python|py)")) for p in MARKDOWN)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *map(str, MARKDOWN)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    collected = [line for line in result.stdout.splitlines() if "[CodeFence#" in line]
    assert len(collected) == expected >= 10, f"{len(collected)} collected of {expected}:\n{result.stdout[-2000:]}"


def test_code_blocks_shown_without_their_test_options(site):
    home = article(site, "")
    assert "fixture:" not in visible(home) and "MyModel()" in visible(home)
    assert '<span class="n">MyModel</span>' in home  # rendered as highlighted Python, not as a paragraph


def test_own_model_page_shows_its_pictures(site):
    page = article(site, "own-model")
    for image in ("accuracy_vs_sparsity.png", "report_table.png"):
        assert f'src="../images/{image}"' in page, image
        assert (site / "images" / image).stat().st_size > 10_000  # a drawn picture, not an empty file
    install = visible(article(site, "install"))
    assert "pip install lightning-slim" in install and "torchao" in install


def test_the_docs_cite_only_files_a_reader_of_the_repository_has():
    """A measurement cited from a design note outside the repository cannot be checked by a reader:
    it goes into the card, or into the benchmark it came from."""
    for path in MARKDOWN:
        for name in set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", path.read_text())):
            places = (ROOT, ROOT / "docs", path.parent)  # not a glob over the tree: a clone holds .venv too
            assert any((place / name).is_file() for place in places), f"{path.relative_to(ROOT)} cites {name}"
