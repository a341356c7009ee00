"""The compression report as people read it: rich tables printed through Lightning's own rich
console (so a live progress bar stays below it), from the report's dict (``CompressionReport.as_dict()``
or its JSON file).

- **Models**: one row per measurement, columns "at fit start" (the model as the user built it),
  "after fit" (the deployable model), the teacher when there is one, and the change: a ratio for
  costs (``4.85x fewer``, ``1.30x faster``; latency ratios inside the measured spread say so) and a
  difference for quality (``+0.085``).
- **Serving**: with a converting technique, the deployed model beside its float forms.
- **Techniques**: each technique's rows, one value per line, numbers rounded, empty values left out.
- Notes: what the columns are, how latency was timed, what could not be measured, the JSON's path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_slim.core.log import is_empty


@dataclass(frozen=True)
class Row:
    """One line of the models table: a value per column (None: not measured) and the change."""

    label: str
    before: float | None
    after: float | None
    teacher: float | None
    change: str
    spread: tuple[float | None, float | None, float | None] = (None, None, None)  # IQR per column


# (label, key at fit start, key after fit, key of the teacher, kind); kind: "fewer" / "smaller" /
# "faster" (a cost: the ratio), "time" (milliseconds with an IQR: the ratio, and whether it is inside
# the spread), "higher" / "lower" (quality: the difference), "" (none). Generation is shown in ms per
# token, with its spread; tokens per second (without one) are in the JSON and W&B.
COSTS = (
    ("parameters", "params", "params", "params", "fewer"),
    ("non-zero parameters", "nonzero_params", "nonzero_params", "nonzero_params", "fewer"),
    ("size, bytes", "size_bytes", "size_bytes", "size_bytes", "smaller"),
    ("MACs per example", "macs", "macs", "macs", "fewer"),
    ("MACs per token", "macs_per_token", "macs_per_token", "macs_per_token", "fewer"),
)
QUALITY = {
    "classification": (
        ("accuracy, validation", "accuracy", "export_accuracy", "accuracy", "higher"),
        ("loss, validation", "loss", "export_loss", "loss", "lower"),
        ("accuracy, as logged", None, "accuracy", None, ""),
        ("train examples/s", None, "train_examples_per_s", None, ""),
    ),
    "language_model": (
        ("loss/token, validation", "val_loss", "val_loss", "val_loss", "lower"),
        ("perplexity, validation", "perplexity", "perplexity", "perplexity", "lower"),
        ("loss, as logged", None, "logged_val_loss", None, ""),
        ("generate, ms/token", "generate_ms_per_token", "generate_ms_per_token", None, "time"),
        ("train tokens/s", None, "train_tokens_per_s", None, ""),
    ),
}
WORSE = {"fewer": "more", "smaller": "larger", "time": "slower"}


def _iqr_key(key: str) -> str:
    return key.replace("_ms", "_iqr_ms", 1)


def _change(kind: str, b: Any, a: Any, spread: tuple) -> str:
    if not (isinstance(b, (int, float)) and isinstance(a, (int, float))) or not kind:
        return ""
    if kind in ("higher", "lower"):
        return f"{a - b:+.4g}"
    if a == b:
        return "same"
    ratio = b / a if a else float("inf")
    word = ("faster" if kind == "time" else kind) if ratio >= 1 else WORSE[kind]
    if kind == "time" and None not in spread[:2] and abs(a - b) <= (spread[0] + spread[1]) / 2:
        return f"within noise ({ratio:.2f}x)"  # the medians differ by less than the quartiles' spread
    return f"{max(ratio, 1 / ratio):.2f}x {word}"


def _value(side: Mapping, key: str | None) -> Any:
    value = side.get(key) if key else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def rows(report: Mapping[str, Any]) -> list[Row]:
    """The models table of ``report`` (a ``CompressionReport.as_dict()``), rows that have a value."""
    before, after, teacher = report.get("before", {}), report.get("after", {}), report.get("teacher", {})
    batch = after.get("latency_batch") or before.get("latency_batch")
    one = "latency_ms_batch_1" in after or "latency_ms_batch_1" in before
    latency = [("latency ms, batch 1", "latency_ms_batch_1")] if one else []
    latency.append((f"latency ms, batch {batch}" if batch else "latency ms", "latency_ms"))
    specs = [
        *COSTS,
        *((label, key, key, key, "time") for label, key in latency),
        *QUALITY.get(report.get("task") or "", ()),
    ]
    out = []
    for label, kb, ka, kt, kind in specs:
        values = (_value(before, kb), _value(after, ka), _value(teacher, kt))
        if all(v is None for v in values):
            continue
        spread = tuple(
            _value(side, _iqr_key(key)) if kind == "time" and key else None
            for side, key in ((before, kb), (after, ka), (teacher, kt))
        )
        out.append(Row(label, *values, _change(kind, values[0], values[1], spread), spread))
    return out


def _number(value: Any, spread: float | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if spread is not None:  # milliseconds: 3 significant digits, the spread to 1 (no exponents)
            return f"{_digits(value, 3)} ±{_digits(spread / 2, 1)}"
        return _digits(value, 4)
    return str(value)


def _digits(value: float, significant: int) -> str:
    if abs(value) >= 10 ** (significant - 1):
        return f"{value:,.0f}"
    return f"{value:.{significant}g}"


def readable(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {readable(v)}" for k, v in value.items() if not is_empty(v))
    if isinstance(value, (list, tuple, set)):
        return ", ".join(readable(v) for v in value)
    return _number(value)


def _notes(report: Mapping[str, Any], path: Path | None) -> list[str]:
    notes = [report.get("baseline", "")]
    cpu = report.get("cpu")
    if cpu:
        samples = report["after"].get("latency_samples")
        units = [k for k in ("avx2", "avx512_vnni", "avx_vnni", "amx", "arm_dotprod") if cpu.get(k)]
        notes.append(
            f"latency: median ± half the interquartile range of {samples} calls per model, every model "
            f"timed side by side at the end of fit (interleaved), on {cpu['model']} "
            f"({', '.join(units) or 'no int8 dot-product units'}), {cpu.get('torch_threads')} torch thread(s)"
        )
    for side, name in (("before", "at fit start"), ("after", "after fit"), ("teacher", "teacher")):
        for key, value in report.get(side, {}).items():
            if key.endswith(("_error", "_note")) or key in ("export_refused", "counted_on"):
                notes.append(f"{name}: {key.replace('_', ' ')}: {value}")
    if report.get("task_note"):
        notes.append(f"task: {report['task_note']}")
    if path is not None:
        notes.append(f"JSON: {path}")
    return [n for n in notes if n]


def render(report: Mapping[str, Any], path: Path | None = None):
    """The report as one rich renderable."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def table(title: str, **kwargs: Any) -> Table:
        return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, **kwargs)

    parts: list[Any] = []
    main = table(f"lightning-slim compression report (task: {report.get('task')})")
    has_teacher = bool(report.get("teacher"))
    for name in ("metric", "at fit start", "after fit", *(("teacher",) if has_teacher else ()), "change"):
        main.add_column(name, justify="left" if name in ("metric", "change") else "right", no_wrap=name == "metric")
    for row in rows(report):
        cells = [_number(v, s) for v, s in zip((row.before, row.after, row.teacher), row.spread)]
        main.add_row(row.label, *(cells if has_teacher else cells[:2]), row.change)
    parts.append(main)
    serving = report.get("serving", {})
    batches = [k for k in serving if k.startswith("batch_")]
    if batches:
        names = [k.removesuffix("_ms") for k in serving[batches[0]] if k.endswith("_ms") and "_iqr" not in k]
        served = table("deployed model beside its float forms (ms per call)")
        for name in ("batch", *names, "deployed speed-up"):
            served.add_column(name, justify="left" if name in ("batch", "deployed speed-up") else "right")
        for key in batches:
            row = serving[key]
            ups = ", ".join(f"{row[f'speedup_vs_{n}']:.2f}x vs {n}" for n in names if f"speedup_vs_{n}" in row)
            cells = [_number(row[f"{n}_ms"], row.get(f"{n}_iqr_ms")) for n in names]
            served.add_row(key.removeprefix("batch_"), *cells, ups)
        parts.append(served)
    if report.get("techniques"):
        done = table("what each technique did", show_header=False)
        done.add_column("technique")
        done.add_column("item")
        done.add_column("value", overflow="fold")
        for technique, items in report["techniques"].items():
            shown = [(k, v) for k, v in items.items() if not is_empty(v)]
            for i, (key, value) in enumerate(shown):
                last = i == len(shown) - 1
                done.add_row(technique if i == 0 else "", key.replace("/", " "), readable(value), end_section=last)
        parts.append(done)
    parts.extend(Text(note, style="dim") for note in _notes(report, path))
    return Group(*parts)


def show(report: Mapping[str, Any], path: Path | None = None) -> None:
    """Print the report through rich's console (the one Lightning's progress bar and model summary
    use: a live progress bar is redrawn below it, not through it)."""
    from rich import get_console

    get_console().print(render(report, path))
