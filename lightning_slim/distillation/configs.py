"""``KnowledgeDistillation``'s options as validated dataclasses: the whole :class:`DistillationConfig`
(torchao's ``quantize_(model, Config())`` style) and its groups (schedule, features, logits, tokens, the
teacher cache). Each is YAML-expressible (LightningCLI builds it from a mapping) and also accepted as a
plain dict in Python; every check that needs no model runs when a config is built.

>>> DistillationSchedule(start_step=10, stop_step=5)
Traceback (most recent call last):
...
ValueError: stop_step=5 must be greater than start_step=10
>>> FeatureDistillation(pairs={"net.5": "net.8"}).loss
'mse'
>>> DistillationConfig(teacher_class="my.Teacher", teacher_checkpoint="t.ckpt", cache_teacher=True).cache_teacher
TeacherCacheConfig(checkpoint=True, index_fn=None, key='auto', top_k=None, dtype=None)
>>> DistillationConfig(teacher_class="my.Teacher", teacher_checkpoint="t.ckpt", convention="sum")
Traceback (most recent call last):
...
ValueError: convention='sum' is not one of ('weighted', 'additive')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_slim.core.arguments import as_config, check_choice, check_int, check_order, check_range
from lightning_slim.tokens import IGNORE_INDEX, SHIFTS

FEATURE_LOSSES = ("mse", "cosine")
FEATURE_POOLINGS = ("none", "mean", "token")
CACHE_KEYS = ("auto", "index", "content")
CONVENTIONS = ("weighted", "additive")
CACHE_DTYPES = (None, "float32", "float16", "bfloat16")
TEACHER_SHARDINGS = ("replicate", "shard")


@dataclass(frozen=True)
class DistillationSchedule:
    """Distil for ``start_step <= step < stop_step`` (None: to the end); anneal ``alpha`` /
    ``temperature`` linearly to ``alpha_final`` / ``temperature_final`` over ``anneal_steps``
    optimizer steps from ``start_step`` (default: to ``stop_step`` or the end of training)."""

    start_step: int = 0
    stop_step: int | None = None
    alpha_final: float | None = None
    temperature_final: float | None = None
    anneal_steps: int | None = None

    def __post_init__(self):
        check_int("start_step", self.start_step, minimum=0)
        check_int("stop_step", self.stop_step, minimum=1, allow_none=True)
        check_order("start_step", self.start_step, "stop_step", self.stop_step)
        check_range("alpha_final", self.alpha_final, 0.0, 1.0, allow_none=True)
        check_range("temperature_final", self.temperature_final, 0.0, low_open=True, allow_none=True)
        check_int("anneal_steps", self.anneal_steps, minimum=1, allow_none=True)

    def anneal_stop(self, total_steps: float) -> int | None:
        """The step annealing ends at, given the fit's length (``inf`` when it has none)."""
        if self.anneal_steps:
            return self.start_step + self.anneal_steps
        if self.stop_step is not None:
            return self.stop_step
        if total_steps != float("inf"):
            return int(total_steps)
        if self.alpha_final is not None or self.temperature_final is not None:
            raise ValueError(
                "alpha_final / temperature_final need anneal_steps or stop_step when training has "
                "no fixed length (max_steps / max_epochs unset)"
            )
        return None


@dataclass(frozen=True)
class FeatureDistillation:
    """Feature KD: ``weight * loss(proj(student feature), teacher feature)`` for each
    ``{student module: teacher module}`` pair (``""`` names the teacher itself); a learned projection
    (in the student's optimizer and checkpoint, removed at export) maps the student's width in
    dimension ``dim`` to the teacher's when they differ.

    ``loss``: ``"mse"`` or ``"cosine"`` (one minus the cosine similarity). ``pooling`` says what is
    compared: ``"none"``, each example's whole feature (flattened for the cosine); for token features
    ``(B, T, H)`` (a transformer's hidden states, a sentence encoder's output) ``"mean"`` compares the
    mean over each sequence's real tokens (the ``attention_mask`` of the student's call; a sentence
    embedding) and ``"token"`` compares each real token's vector, averaged over real tokens. ``dim``
    defaults to 1 (channels of ``(N, C, ...)`` maps) with ``pooling="none"`` and to -1 (the hidden
    size) otherwise, where it must be the last dimension."""

    pairs: dict[str, str] = field(default_factory=dict)
    loss: str = "mse"
    weight: float = 1.0
    pooling: str = "none"
    dim: int | None = None

    def __post_init__(self):
        if not isinstance(self.pairs, Mapping) or not self.pairs:
            raise ValueError(f"pairs={self.pairs!r} must be a non-empty dict {{student module: teacher module}}")
        check_choice("loss", self.loss, FEATURE_LOSSES)
        check_range("weight", self.weight, 0.0)
        check_choice("pooling", self.pooling, FEATURE_POOLINGS)
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int)):
            raise ValueError(f"dim={self.dim!r} must be an integer (a dimension of the features) or None")

    @property
    def width_dim(self) -> int:
        """The dimension a projection maps (``dim``, or its default for ``pooling``)."""
        return self.dim if self.dim is not None else (1 if self.pooling == "none" else -1)


@dataclass(frozen=True)
class LogitsSource:
    """Where the logits are, and so which call the teacher repeats.

    ``student_module``: the student's submodule whose output is the logits. Default: the module the
    user's ``training_step`` calls itself, found before training by running that ``training_step``
    once on a sample batch (``self(x)``: the LightningModule; ``self.model(input_ids=...,
    labels=...)``: ``model``), whatever ``forward`` the LightningModule defines. Every call of it
    inside ``training_step`` is distilled: its positional and keyword arguments are recorded and the
    teacher is called with exactly those (``labels`` left out, ``use_cache=False`` added where
    accepted), unless ``input_fn`` is given. ``teacher_module``: where the teacher's logits are
    (default: the module the teacher's call goes to: the teacher's submodule at the student's path
    when the teacher is a LightningModule that has one, else the teacher, or its one child when it
    is a LightningModule without ``forward``). ``output_fn`` / ``teacher_output_fn`` read the logits
    from the output (default: a tensor, ``.logits`` of a ``ModelOutput``, or its first tensor; a
    callable or a dotted path)."""

    student_module: str | None = None
    teacher_module: str | None = None
    output_fn: Callable[[Any], Any] | str | None = None
    teacher_output_fn: Callable[[Any], Any] | str | None = None


@dataclass(frozen=True)
class TokenMask:
    """Which positions of token logits ``(B, T, V)`` a KD term counts: positions whose target is
    ``ignore_index`` (in the call's or batch's ``labels``, or an ``(x, y)`` batch's ``y``), and,
    with ``padding``, positions the ``attention_mask`` marks 0, contribute nothing. ``shift``:
    ``"auto"`` shifts Hugging Face-style ``labels`` of a causal LM by one as its own loss does
    (position t is scored on ``labels[t + 1]``, the last position on nothing), ``"causal"`` /
    ``"none"`` force it. Logits without a token dimension are never masked."""

    ignore_index: int = IGNORE_INDEX
    shift: str = "auto"
    padding: bool = True

    def __post_init__(self):
        check_choice("shift", self.shift, SHIFTS)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index={self.ignore_index!r} must be an integer")


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Store teacher outputs per example so the teacher runs once per example. ``key`` says how an
    example is recognised: ``"index"``, by its dataset index (``index_fn(batch)``, default the
    batch's ``index``: ``(x, y, index)`` tuples or an ``'index'`` key; it assumes a fixed input per
    index, so no random augmentation); ``"content"``, by a digest of what the teacher is given for it
    (the bytes of each row of its call: correct whatever the data pipeline does, and an input
    augmented differently is simply a new entry); ``"auto"`` (default): the index when the batches
    carry one, else the content. ``checkpoint=False`` rebuilds the cache after a resume instead of
    saving it.

    ``top_k``: store only the teacher's ``top_k`` classes per position with the mass of the rest
    (:mod:`~lightning_slim.distillation.topk`), for language models whose full ``(T, V)`` logits
    cannot be kept for every example; it fixes the temperature (no ``temperature_final``).
    ``dtype``: the stored logits' / log-probabilities' type (``"float32"``, ``"float16"``,
    ``"bfloat16"``; default float32 for full logits, float16 for top-k)."""

    checkpoint: bool = True
    index_fn: Callable[[Any], Any] | str | None = None
    key: str = "auto"
    top_k: int | None = None
    dtype: str | None = None

    def __post_init__(self):
        check_int("top_k", self.top_k, minimum=1, allow_none=True)
        check_choice("dtype", self.dtype, CACHE_DTYPES)
        check_choice("key", self.key, CACHE_KEYS)
        if self.key == "content" and self.index_fn is not None:
            raise ValueError("index_fn names examples by index: it needs key='index' or 'auto', not 'content'")

    @property
    def storage_dtype(self):
        import torch

        return getattr(torch, self.dtype or ("float16" if self.top_k else "float32"))


@dataclass(frozen=True)
class DistillationConfig:
    """Everything ``KnowledgeDistillation`` does: the teacher, the soft-target term, and its groups.

    The teacher: ``teacher`` (an ``nn.Module``; with ``teacher_checkpoint``, its weights are loaded into
    it), or ``teacher_class`` (a class path, what YAML can say) + ``teacher_checkpoint`` (+
    ``teacher_init_args``, constructor arguments). ``alpha``: the KD weight in [0, 1] (0 with
    ``features``: feature distillation only); ``temperature`` > 0; ``convention``: ``"weighted"``
    trains on ``(1 - alpha) * loss + alpha * KD``, ``"additive"`` on ``loss + alpha * KD``. The groups,
    each its dataclass or its dict and held as the dataclass: ``schedule`` (:class:`DistillationSchedule`),
    ``features`` (:class:`FeatureDistillation`, None: logits only), ``logits`` (:class:`LogitsSource`),
    ``tokens`` (:class:`TokenMask`), ``cache_teacher`` (True or a :class:`TeacherCacheConfig`; held as
    one, or None for no cache). ``input_fn``: give the teacher ``input_fn(batch)`` instead of the
    student's recorded call (a callable or a dotted path). ``seed``: of the feature projections'
    initialisation (no global RNG is used). ``teacher_sharding``: under ``ModelParallelStrategy``,
    ``"replicate"`` keeps the whole teacher on every rank; ``"shard"`` shards it with FSDP2 over the
    data-parallel mesh (each of its transformer blocks, then the rest), so each rank holds its share and
    gathers a block only while it runs (docs/sharded.md); refused under any other strategy."""

    teacher: nn.Module | None = None
    teacher_checkpoint: str | None = None
    teacher_class: str | None = None
    teacher_init_args: dict[str, Any] | None = None
    alpha: float = 0.5
    temperature: float = 4.0
    convention: str = "weighted"
    schedule: DistillationSchedule | dict[str, Any] | None = None
    features: FeatureDistillation | dict[str, Any] | None = None
    logits: LogitsSource | dict[str, Any] | None = None
    tokens: TokenMask | dict[str, Any] | None = None
    input_fn: Callable[[Any], Any] | str | None = None
    cache_teacher: bool | TeacherCacheConfig | dict[str, Any] | None = False
    seed: int = 0
    teacher_sharding: str = "replicate"

    def __post_init__(self):
        self._check_teacher()
        check_choice("teacher_sharding", self.teacher_sharding, TEACHER_SHARDINGS)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("temperature", self.temperature, 0.0, low_open=True)
        check_choice("convention", self.convention, CONVENTIONS)
        check_int("seed", self.seed, minimum=0)
        # the groups are held as their dataclasses (frozen: set once, here), so a dict and its object are one config
        cache = self.cache_teacher
        if isinstance(cache, bool):
            cache = TeacherCacheConfig() if cache else None
        held = {
            "schedule": as_config(DistillationSchedule, self.schedule, "schedule") or DistillationSchedule(),
            "features": as_config(FeatureDistillation, self.features, "features"),
            "logits": as_config(LogitsSource, self.logits, "logits") or LogitsSource(),
            "tokens": as_config(TokenMask, self.tokens, "tokens") or TokenMask(),
            "cache_teacher": as_config(TeacherCacheConfig, cache, "cache_teacher"),
        }
        for name, value in held.items():
            object.__setattr__(self, name, value)
        if not self.uses_logits and self.features is None:
            raise ValueError("alpha=0 with no features distils nothing; set alpha in (0, 1] or features")
        if self.cache_teacher and self.cache_teacher.top_k and self.schedule.temperature_final is not None:
            raise ValueError(
                f"cache_teacher top_k={self.cache_teacher.top_k} stores the teacher's distribution at "
                f"temperature={self.temperature}; temperature_final={self.schedule.temperature_final} would "
                "need it at every temperature: drop temperature_final or top_k"
            )

    def _check_teacher(self) -> None:
        if self.teacher is not None and self.teacher_class is not None:
            raise ValueError("pass either teacher (a module) or teacher_class (a class path), not both")
        if self.teacher is None and (self.teacher_class is None or self.teacher_checkpoint is None):
            raise ValueError(
                "no teacher: pass teacher=<nn.Module>, or teacher_checkpoint=<path> with "
                "teacher_class=<'package.module.Class'>"
            )
        if self.teacher is not None and not isinstance(self.teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(self.teacher).__name__}")
        for name in ("teacher_checkpoint", "teacher_class"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string (a path), got {type(value).__name__}")
        if self.teacher_init_args is not None and not isinstance(self.teacher_init_args, Mapping):
            raise TypeError(
                f"teacher_init_args must be a dict of the teacher's constructor arguments, got "
                f"{type(self.teacher_init_args).__name__}"
            )

    @property
    def uses_logits(self) -> bool:
        """Logits are distilled unless alpha stays 0 (feature distillation only)."""
        return self.alpha > 0 or bool(self.schedule.alpha_final)

    @property
    def pairs(self) -> dict[str, str]:
        """The feature pairs ``{student module: teacher module}`` (none without ``features``)."""
        return dict(self.features.pairs) if self.features else {}
