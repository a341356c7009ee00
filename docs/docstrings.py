"""Griffe extension: render our docstrings as the Markdown mkdocstrings expects, without editing them.

The docstrings are Google style with two reStructuredText habits that Markdown shows badly:
- bare doctest examples (``>>> ...`` outside an ``Examples:`` section) would become nested block
  quotes: they are fenced as ``pycon`` code blocks;
- Sphinx roles (``:class:`~.configs.X```) would show the role name: they become code spans
  (``~`` keeps only the last name, as in Sphinx).
The doctests themselves still run from the source, under pytest's ``--doctest-modules``.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)\.?([\w.]+)`")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_docstring(text: str) -> str:
    """Fence bare doctest blocks and turn Sphinx roles into code spans (tested in tests/test_docs.py)."""
    text = ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    out: list[str] = []
    in_fence, doctest_indent = False, None
    for line in text.split("\n"):
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if doctest_indent is not None and not stripped:  # a blank line ends a doctest block
            out.append(f"{doctest_indent}```")
            doctest_indent = None
        elif doctest_indent is None and not in_fence and stripped.startswith(">>>"):
            out.append(f"{indent}```pycon")
            doctest_indent = indent
        elif doctest_indent is None and FENCE.match(line):
            in_fence = not in_fence
        out.append(line)
    if doctest_indent is not None:
        out.append(f"{doctest_indent}```")
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
