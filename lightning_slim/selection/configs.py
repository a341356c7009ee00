"""``OnlineDataSelection``'s options as validated dataclasses: the whole :class:`SelectionConfig` (torchao's
``quantize_(model, Config())`` style) and its groups, the window and the joint selection (YAML mappings in
LightningCLI, dicts or instances in Python). Every check that needs no model runs when a config is built.

>>> SelectionWindow(start_step=5, stop_step=5)
Traceback (most recent call last):
...
ValueError: stop_step=5 must be greater than start_step=5
>>> SelectionConfig(keep=0.25, joint=True).joint
JointSelection(pair_loss_fn=None, num_chunks=4)
>>> SelectionConfig(score="uniform", joint=True)
Traceback (most recent call last):
...
ValueError: joint=True needs a score other than 'uniform' (uniform has nothing to join)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_slim.core.arguments import as_config, check_choice, check_fraction, check_int, check_order, check_range
from lightning_slim.selection.functional import SCORES, SELECTIONS

OUTSIDE_WINDOW = ("uniform", "full")


@dataclass(frozen=True)
class SelectionWindow:
    """Select only for optimizer steps in ``[start_step, stop_step)`` (None: to the end). Outside,
    ``outside="uniform"`` trains on a random sub-batch of the same size (no scoring), ``"full"``
    on the whole super-batch."""

    start_step: int = 0
    stop_step: int | None = None
    outside: str = "uniform"

    def __post_init__(self):
        check_int("start_step", self.start_step, minimum=0)
        check_int("stop_step", self.stop_step, minimum=1, allow_none=True)
        check_order("start_step", self.start_step, "stop_step", self.stop_step)
        check_choice("outside", self.outside, OUTSIDE_WINDOW)

    def contains(self, step: int) -> bool:
        return step >= self.start_step and (self.stop_step is None or step < self.stop_step)


@dataclass(frozen=True)
class JointSelection:
    """JEST joint selection for batch-level losses: ``pair_loss_fn(model, batch) -> (B, B)`` pair
    losses (default: the module's ``per_pair_loss(batch)``), chosen in ``num_chunks`` chunks."""

    pair_loss_fn: Callable[[Any, Any], Any] | str | None = None
    num_chunks: int = 4

    def __post_init__(self):
        check_int("num_chunks", self.num_chunks, minimum=1)


@dataclass(frozen=True)
class SelectionConfig:
    """What to train on in each super-batch, scored how, against which reference.

    ``keep``: the fraction of each super-batch to train on, in (0, 1]; ``batch_size``: exactly this many
    examples per step instead (overrides ``keep``). ``score``: ``"learnability"`` (learner - reference
    loss), ``"hard"`` (learner loss), ``"easy_reference"`` (- reference loss), ``"uniform"`` (the control),
    or a function ``fn(learner_loss, reference_loss) -> scores`` (object or dotted path). ``selection``:
    ``"topk"`` or ``"sample"`` (without replacement from ``softmax(score / temperature)``).
    ``reference``: an ``nn.Module``; ``"teacher"`` (the teacher another callback provides, e.g.
    KnowledgeDistillation's); or ``{"class_path", "checkpoint" | "train_on_holdout", "init_args"}``.
    ``reference_losses``: precomputed reference losses by dataset index (a tensor or a ``torch.save``
    file, see ``compute_reference_losses``); every training index must be covered. ``cache_reference``:
    compute each example's reference loss once, the first time it is seen, and keep it (saved in
    checkpoints); both caches need batches that carry indices. ``reference_train_examples``: examples the
    reference was trained on (its cost, reported beside). ``loss_fn``: ``fn(model, batch) -> (B,)
    losses`` (object or dotted path); without it the module's ``per_sample_loss(batch)``, else
    cross-entropy on ``(x, y[, index])`` batches; an explicit ``loss_fn`` wins over the module's method.
    ``joint``: True or a :class:`JointSelection` (or its dict): JEST joint selection; held as a
    ``JointSelection`` or None. ``window``: a :class:`SelectionWindow` (or its dict): the steps to select
    in; held as a ``SelectionWindow``. ``selector``: ``fn(batch, rows) -> batch`` for batch types
    ``slice_batch`` cannot slice. ``histogram_every_n_steps``: how often score histograms go to W&B
    (0: never). ``seed``: of sampling / uniform choices (mixed with epoch, batch index and rank)."""

    keep: float = 0.1
    batch_size: int | None = None
    score: str | Callable[..., Any] = "learnability"
    selection: str = "topk"
    temperature: float = 1.0
    reference: Any = None
    reference_losses: Any = None  # a tensor or the path of a torch.save file
    cache_reference: bool = False
    reference_train_examples: int = 0
    loss_fn: str | Callable[..., Any] | None = None
    joint: bool | JointSelection | dict[str, Any] | None = False
    window: SelectionWindow | dict[str, Any] | None = None
    selector: str | Callable[..., Any] | None = None
    histogram_every_n_steps: int = 50
    seed: int = 0

    def __post_init__(self):
        check_fraction("keep", self.keep, low_open=True, high_closed=True)
        check_int("batch_size", self.batch_size, minimum=1, allow_none=True)
        if isinstance(self.score, str) and self.score not in SCORES and "." not in self.score:
            raise ValueError(f"score={self.score!r} is not one of {SCORES} or a dotted path to a function")
        check_choice("selection", self.selection, SELECTIONS)
        check_range("temperature", self.temperature, 0.0, low_open=True)
        check_int("reference_train_examples", self.reference_train_examples, minimum=0)
        check_int("histogram_every_n_steps", self.histogram_every_n_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)
        if isinstance(self.reference, str) and self.reference != "teacher":
            raise ValueError(
                f"reference={self.reference!r}: the only string allowed is 'teacher'; give a model "
                "or {'class_path', 'checkpoint', 'init_args'}"
            )
        if self.reference is not None and not isinstance(self.reference, (str, dict, nn.Module)):
            raise TypeError(
                f"reference must be an nn.Module, 'teacher' or a checkpoint dict; got {type(self.reference).__name__}"
            )
        if self.reference_losses is not None and self.reference is not None:
            raise ValueError("give either reference (a model) or reference_losses (a cache), not both")
        # the groups are held as their dataclasses (frozen: set once, here)
        joint = self.joint
        if isinstance(joint, bool):
            joint = JointSelection() if joint else None
        object.__setattr__(self, "joint", as_config(JointSelection, joint, "joint"))
        if self.joint is not None and self.score == "uniform":
            raise ValueError("joint=True needs a score other than 'uniform' (uniform has nothing to join)")
        object.__setattr__(self, "window", as_config(SelectionWindow, self.window, "window") or SelectionWindow())
