"""MkDocs hook: build pages from the files that already exist in the repository.

- ``<!-- include: PATH -->`` (a line of its own) is replaced by the file at PATH (relative to
  the repository root), so the README and the method cards are written once. Relative links in
  the included text are rewritten: to the page that includes the target, if one does; to plain
  text if the target exists but the site does not publish it; a target that does not exist is
  a warning (an error under ``--strict``).
  Absolute links into the repository (``repo_url`` + ``/blob/main/``, as README.md writes them so
  that they work on the package index too) are treated as the relative links they stand for.
- ``<!-- api: public -->`` is replaced by one mkdocstrings block per name that
  ``lightning_slim`` exports (its ``__all__``), so the reference follows the package.
- ``<!-- api: functional -->``: one section per technique with its ``functional`` module (the registry).
- The method cards are pages ``methods/<folder>.md`` generated from ``lightning_slim.core.registry``, and the
  nav's "Method cards" section lists them: a new technique folder appears without an edit here.
- Code fences lose the test options pytest-markdown-docs reads (``python fixture:model`` becomes
  ``python``): superfences would not recognise such a fence and show it as text.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r"^<!--\s*include:\s*(\S+)\s*-->\s*$", re.MULTILINE)
API_PUBLIC = re.compile(r"^<!--\s*api:\s*public\s*-->\s*$", re.MULTILINE)
API_FUNCTIONAL = re.compile(r"^<!--\s*api:\s*functional\s*-->\s*$", re.MULTILINE)
LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
# a fence's info string with pytest-markdown-docs options after the language (tests/snippet_fixtures.py)
TEST_OPTIONS = re.compile(r"^(\s*```\w+)((?:\s+(?:fixture|runner|retry):\S+|\s+notest|\s+continuation)+)\s*$", re.M)

METHOD_CARDS = "Method cards"  # the nav section filled from the registry
log = logging.getLogger("mkdocs.hooks.slim")
_pages: dict[str, str] = {}  # repository path -> docs page that shows it


def on_config(config):
    """The "Method cards" section of the nav: one page per technique of the registry."""
    for entry in config["nav"]:
        if isinstance(entry, dict) and METHOD_CARDS in entry:
            entry[METHOD_CARDS] = [{t.folder.capitalize(): f"methods/{t.folder}.md"} for t in _techniques()]
    return config


def on_files(files, config):
    """Add each technique's method-card page, then map every repository file the site shows to its
    page, before any page is rendered."""
    from mkdocs.structure.files import File

    for t in _techniques():
        files.append(
            File.generated(
                config, f"methods/{t.folder}.md", content=f"<!-- include: lightning_slim/{t.folder}/README.md -->\n"
            )
        )
    _pages.clear()
    docs_dir = Path(config["docs_dir"]).resolve()
    for f in files.documentation_pages():
        _pages[(docs_dir / f.src_uri).relative_to(ROOT).as_posix()] = f.src_uri
        for target in INCLUDE.findall(f.content_string):
            _pages[posixpath.normpath(target)] = f.src_uri
    return files


def _techniques():
    from lightning_slim.core import registry

    return registry.techniques()


def on_page_markdown(markdown, page, config, files):
    here = page.file.src_uri

    def include(match: re.Match) -> str:
        source = posixpath.normpath(match.group(1))
        path = ROOT / source
        if not path.is_file():
            log.warning("%s includes %s, which does not exist", here, source)
            return ""
        return _rewrite_links(path.read_text(encoding="utf-8"), posixpath.dirname(source), here, _blob_url(config))

    markdown = TEST_OPTIONS.sub(r"\1", INCLUDE.sub(include, markdown))
    markdown = API_FUNCTIONAL.sub(lambda _: _functional_api(), markdown)
    return API_PUBLIC.sub(lambda _: _public_api(), markdown)


def _blob_url(config) -> str | None:
    """``https://github.com/<org>/<repo>/blob/main/``: the prefix of absolute links into the repository."""
    return config["repo_url"].rstrip("/") + "/blob/main/" if config.get("repo_url") else None


def _rewrite_links(text: str, source_dir: str, page: str, blob_url: str | None = None) -> str:
    """Links relative to the included file become links relative to the page (code blocks untouched)."""

    def fix(match: re.Match) -> str:
        bang, label, target = match.groups()
        in_repository = blob_url is not None and target.startswith(blob_url)
        if in_repository:  # written absolute for the package index: the same file as a relative link
            target = target.removeprefix(blob_url)
        elif re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):  # URL, anchor or absolute: leave it
            return match.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join("" if in_repository else source_dir, path))
        if repo_path in _pages:
            url = posixpath.relpath(_pages[repo_path], posixpath.dirname(page) or ".")
            return f"{bang}[{label}]({url}{'#' + anchor if anchor else ''})"
        if not (ROOT / repo_path).exists():
            log.warning("%s links to %s, which does not exist", page, repo_path)
        elif in_repository and not bang:
            return match.group(0)  # an absolute link to the repository works from the site as well
        elif bang:
            log.warning("%s shows the image %s, which the site does not publish", page, repo_path)
        return label  # a file in the repository that the site does not publish: keep the words

    out, in_code = [], False
    for line in text.splitlines(keepends=True):
        if FENCE.match(line):
            in_code = not in_code
        out.append(line if in_code else LINK.sub(fix, line))
    return "".join(out)


def _functional_api() -> str:
    options = "    options:\n      show_root_heading: false\n      heading_level: 3\n"
    block = "## {title}\n\n::: lightning_slim.{folder}.functional\n" + options
    return "\n".join(block.format(title=t.folder.capitalize(), folder=t.folder) for t in _techniques())


def _public_api() -> str:
    import lightning_slim

    return "\n".join(f"::: {lightning_slim._PUBLIC[name]}.{name}\n" for name in lightning_slim.__all__)
