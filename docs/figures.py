"""Draw the pictures of docs/own-model.md from real short runs on examples/quickstart.py's own module.

python docs/figures.py      (about a minute on one CPU thread; writes docs/images/*.png and prints what it drew)

- accuracy_vs_sparsity.png: lottery-ticket IMP (6 rounds of 40%, rewinding to the end of epoch 1) on
  the digits CNN, validation accuracy at each round's sparsity, as IterativeMagnitudePruning records it
  (`slim/pruning/accuracy_vs_sparsity` in W&B).
- report_table.png: what CompressionReport prints at the end of examples/quickstart.py's run, as a
  terminal shows it.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
sys.path.insert(0, str(ROOT / "examples"))
from quickstart import DigitsClassifier, DigitsData, main  # noqa: E402

from lightning_slim import IterativeMagnitudePruning  # noqa: E402


def accuracy_vs_sparsity(out: Path) -> list[tuple[float, float]]:
    pl.seed_everything(0)
    data = DigitsData()
    steps_per_epoch = 23  # 1,437 training images at batch 64
    imp = IterativeMagnitudePruning(
        {"kind": "imp", "rounds": 6, "rate": 0.4, "every": 3, "unit": "epoch"},
        rewind="step",
        rewind_step=steps_per_epoch,
        accuracy_metric="val_acc",
    )
    trainer = pl.Trainer(max_epochs=21, callbacks=[imp], logger=False, enable_checkpointing=False)
    trainer.fit(DigitsClassifier(), datamodule=data)
    # one row per round: the sparsity it trained at and its validation accuracy at the round's end
    points = [(float(s), float(a)) for _round, s, a, _step in imp.curve if a is not None]
    sparsity, accuracy = zip(*points)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([100 * s for s in sparsity], [100 * a for a in accuracy], "o-", color="#6b4fbb")
    ax.axhline(100 * accuracy[0], color="grey", lw=0.8, ls="--", label=f"dense: {100 * accuracy[0]:.1f}%")
    ax.set_xlabel("weights pruned (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("IMP with rewinding on the digits CNN (one seed)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return points


def report_table(out: Path, workdir: Path) -> str:
    import json
    import os

    from rich.console import Console

    from lightning_slim.reporting.console import render

    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)  # quickstart writes its ONNX file and JSON into the working folder
    main()
    path = workdir / "compression_report.json"
    console = Console(record=True, width=110, file=open(os.devnull, "w"))
    console.print(render(json.loads(path.read_text()), path))  # the table the run printed, from its JSON
    text = console.export_text()
    # long lines wrapped as a 110-column terminal would show them
    lines = [part for line in text.splitlines() for part in textwrap.wrap(line, 110, subsequent_indent="  ") or [""]]
    text = "\n".join(lines)
    fig = plt.figure(figsize=(0.082 * max(map(len, lines)) + 0.4, 0.145 * len(lines) + 0.3), dpi=120)
    fig.patch.set_facecolor("#1e1e1e")
    fig.text(0.01, 0.98, text, family="monospace", fontsize=8.5, color="#e6e6e6", va="top", ha="left")
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)
    return text


if __name__ == "__main__":
    import tempfile

    IMAGES.mkdir(parents=True, exist_ok=True)
    for s, a in accuracy_vs_sparsity(IMAGES / "accuracy_vs_sparsity.png"):
        print(f"sparsity {s:.3f}  val_acc {a:.4f}")
    print(report_table(IMAGES / "report_table.png", Path(tempfile.mkdtemp())))
