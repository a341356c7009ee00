"""The checks on ``PruningConfig``'s options that need more than one of them, and the coverage
warning: kept here so the callback stays a thin shell. Each raises a ``ValueError`` naming the value
and what is allowed, when the config is built."""

from __future__ import annotations

from collections.abc import Mapping

from lightning_slim.core.arguments import check_choice
from lightning_slim.pruning.importance import IMPORTANCES
from lightning_slim.pruning.patterns import SCOPES, Pattern
from lightning_slim.pruning.rewind import REWINDS, rewinds_weights
from lightning_slim.pruning.schedules import Schedule
from lightning_slim.pruning.tensors import TIED_HEAD


class PruningCoverageWarning(UserWarning):
    """Weight matrices the targets select by kind but pruning leaves dense, or prunes through a tie."""


class PruningScheduleWarning(UserWarning):
    """A schedule whose times probably do not mean what was intended (steps read as epochs)."""


def check_options(
    pattern: Pattern,
    importance: str,
    scope: str | None,
    rewind: str,
    rewind_step: int,
    schedule: Schedule,
) -> None:
    events = schedule.events()
    check_choice("importance", importance, IMPORTANCES)
    check_choice("rewind", rewind, REWINDS)
    if scope is not None:
        check_choice("scope", scope, SCOPES)
    structured = pattern.kind == "channels"
    if structured and scope == "row":
        raise ValueError(
            "scope='row' ranks weights within each output row; structural pruning removes whole rows: "
            "use scope='layer' or 'global'"
        )
    if structured and importance != "magnitude":
        raise ValueError(
            f"importance={importance!r} applies to unstructured and N:M patterns; structural pruning "
            "ranks channels by magnitude"
        )
    if rewind == "init" and rewind_step:
        raise ValueError(f"rewind='init' rewinds to step 0; use rewind='step' for rewind_step={rewind_step}")
    if structured and rewinds_weights(rewind):
        raise ValueError(
            f"rewind={rewind!r} is not supported with pattern='channels' (the snapshot has "
            "the unpruned shapes); use rewind='none' or 'lr'"
        )
    if schedule.kind == "gradual" and rewind != "none":
        raise ValueError(
            f"rewind={rewind!r} with a gradual schedule would rewind at every small step; "
            "gradual pruning fine-tunes (rewind='none')"
        )
    if schedule.unit == "step" and rewind != "none" and rewind_step > events[0][0]:
        raise ValueError(f"rewind_step={rewind_step} is later than the first pruning at step {events[0][0]}")
    if pattern.kind == "N:M":
        limit, final = pattern.sparsity, events[-1][1]
        if abs(final - limit) > 1e-6 or any(s > limit + 1e-6 for _, s in events):
            raise ValueError(
                f"pattern={str(pattern)!r} is {limit:g} sparse: the schedule must end at sparsity "
                f"{limit:g} and never exceed it; its events are {[(t, round(x, 4)) for t, x in events]} "
                f"(e.g. {{'kind': 'one_shot', 'sparsity': {limit:g}}})"
            )
    if importance == "wanda" and events[0][0] < 1:
        raise ValueError(
            "importance='wanda' scores weights by the inputs seen in training steps: the first pruning "
            f"event must come after at least one {schedule.unit}, not at {events[0][0]} "
            "(set the schedule's 'at' or 'start' to 1 or more)"
        )


def is_expected(why: str) -> bool:
    """Is a weight left dense for a reason the user chose or expects (said in an info line, not warned)?"""
    return why in ("excluded", "embedding", "not a target") or why.startswith(TIED_HEAD)


def tied_heads_line(untouched: Mapping[str, str]) -> str | None:
    """The info line for the tied output heads left out (None: none)."""
    heads = {n: why.removeprefix(TIED_HEAD).strip() for n, why in untouched.items() if why.startswith(TIED_HEAD)}
    if not heads:
        return None
    said = "; ".join(f"{head} shares its weight with {table}" for table, head in heads.items())
    return (
        f"IterativeMagnitudePruning: {said}, so it is the input embedding and stays dense (not a target by "
        f"default). To prune it anyway, name it in targets, e.g. targets=[..., {next(iter(heads.values()))!r}]"
    )


def coverage_warning(untouched: Mapping[str, str], tied: Mapping[str, list[str]], fallback=()) -> str | None:
    """The warning text for weight matrices the user would expect pruned and that are not (None: none)."""
    lines = [f"{n} ({why})" for n, why in untouched.items() if not is_expected(why)]
    lines += [f"{n} is shared with {', '.join(others)}: those are pruned with it" for n, others in tied.items()]
    lines += [
        f"{n} is scored by magnitude: its module was never called in a training step, so Wanda saw no "
        "input (e.g. nn.MultiheadAttention's out_proj, used by weight only)"
        for n in fallback
    ]
    if not lines:
        return None
    return (
        "IterativeMagnitudePruning: " + "; ".join(lines) + ". Unsupported tensors stay dense and are listed "
        "in report_rows()['untouched']; target them by their parameter name if they are plain weight matrices, "
        "or exclude the module to silence this."
    )


def sharded_refusal(pattern: Pattern) -> str | None:
    """Why pruning so configured cannot run on FSDP2-sharded parameters (and resume there)."""
    if pattern.kind == "channels":
        return (
            "IterativeMagnitudePruning(pattern='channels') changes parameter shapes, which FSDP2 fixed when "
            "configure_model sharded them: prune channels unsharded (single device or DDP), then shard"
        )
    return None
