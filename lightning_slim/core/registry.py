"""The techniques this package ships, found from its folders: nothing lists them by hand.

A technique is a subpackage of ``lightning_slim`` with a method card (``README.md``) and a
``callback.py`` that defines a :class:`~lightning_slim.core.callback.SlimCallback` subclass. Adding one
is adding such a folder (plus its test case in ``tests/cases/``): the package's public names, the
docs site's method cards and API page, the README's table and the packaging test all read this
registry. Discovery parses the files (``ast``) instead of importing them, so ``import
lightning_slim`` stays lean; a folder that breaks the convention is an error naming it.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # lightning_slim/, where the technique folders live
BASE_CLASS = "SlimCallback"


@dataclass(frozen=True)
class TechniqueEntry:
    folder: str  # the subpackage's name: "pruning"
    callback: str  # its SlimCallback subclass: "IterativeMagnitudePruning"
    config: str | None = None  # its options' dataclass, from ``self.config: PruningConfig = ...``: "PruningConfig"

    @property
    def module(self) -> str:
        return f"lightning_slim.{self.folder}"

    @property
    def card(self) -> Path:
        return PACKAGE / self.folder / "README.md"


@functools.cache
def techniques() -> tuple[TechniqueEntry, ...]:
    """Every technique folder, in alphabetical order of folder names."""
    found = []
    for card in sorted(PACKAGE.glob("*/README.md")):
        folder = card.parent
        if not (folder / "callback.py").is_file() or not (folder / "__init__.py").is_file():
            continue
        callbacks = _callback_classes(folder / "callback.py")
        if len(callbacks) != 1:
            raise RuntimeError(
                f"lightning_slim/{folder.name}/callback.py defines {callbacks or 'no'} {BASE_CLASS} subclasses: "
                "a technique folder defines exactly one"
            )
        found.append(TechniqueEntry(folder.name, callbacks[0], _config_class(folder / "callback.py")))
    return tuple(found)


def callbacks() -> dict[str, str]:
    """``{public name: module that exports it}``: every technique's callback and its config."""
    names = {t.callback: t.module for t in techniques()}
    return names | {t.config: t.module for t in techniques() if t.config}


README_BEGIN, README_END = "| folder | callback |\n|---|---|\n", "<!-- /techniques -->"


def readme_rows() -> str:
    """The rows of README.md's table of techniques (absolute links: the package index shows README.md)."""
    blob = "https://github.com/lightning-slim/lightning-slim/blob/main/lightning_slim"
    return "".join(
        f"| `lightning_slim/{t.folder}/` | `{t.callback}` ([method card]({blob}/{t.folder}/README.md)) |\n"
        for t in techniques()
    )


def with_readme_rows(readme: str) -> str:
    """``readme`` with its table of techniques rewritten from the registry (``make readme``)."""
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    return readme[:start] + readme_rows() + readme[end:]


def _callback_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(getattr(base, "id", getattr(base, "attr", None)) == BASE_CLASS for base in node.bases)
    ]


def _config_class(path: Path) -> str | None:
    """The annotation of the callback's ``self.config: X = ...`` (its options' dataclass), if any."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        target = getattr(node, "target", None)
        if isinstance(node, ast.AnnAssign) and isinstance(target, ast.Attribute) and target.attr == "config":
            return getattr(node.annotation, "id", None)
    return None


def write_readme(path: Path = PACKAGE.parent / "README.md") -> None:
    """Rewrite README.md's table of techniques from the registry (``make readme``)."""
    path.write_text(with_readme_rows(path.read_text(encoding="utf-8")), encoding="utf-8")
