"""What ``KnowledgeDistillation`` logs on a step and puts in the compression report: the terms, the
teacher's size and extra compute, how many examples it ran on, and what the cache held."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_slim.batches import example_count, slice_batch
from lightning_slim.distillation.teacher import teacher_target

if TYPE_CHECKING:
    from lightning_slim.distillation.callback import KnowledgeDistillation
    from lightning_slim.distillation.term import StepTerm


def logged_values(kd: KnowledgeDistillation, term: StepTerm, alpha: float, temperature: float) -> dict[str, Any]:
    """The ``slim/distillation/*`` scalars of one step (None values left out)."""
    values = {**term.values, "task_loss": kd._task_loss}
    # an annealed weight is a metric; a constant one is run config (the callback logs it with log_config)
    values |= {"alpha": alpha} if kd.config.schedule.alpha_final is not None else {}
    values |= {"temperature": temperature} if kd.config.schedule.temperature_final is not None else {}
    values["teacher_examples"] = float(kd.counts["teacher_examples"])
    if term.positions[1]:
        values["token_fraction"] = term.positions[0] / term.positions[1]
    if kd.config.cache_teacher:
        values["cache_hit_rate"] = kd.counts["cache_hits"] / max(kd.counts["student_examples"], 1)
        values["cache_mb"] = kd.cache.nbytes / 2**20
    return {k: v for k, v in values.items() if v is not None}


def distillation_rows(kd: KnowledgeDistillation) -> dict[str, Any]:
    from lightning_slim.reporting.measure import count_macs, count_parameters, token_count

    rows: dict[str, Any] = {"teacher_params": count_parameters(kd.teacher), **kd.counts}
    if kd._positions[1]:
        rows["token_fraction_distilled"] = kd._positions[0] / kd._positions[1]
    if kd.config.cache_teacher:
        rows |= {
            "cache_examples": len(kd.cache),
            "cache_bytes": kd.cache.nbytes,
            "cache_dtype": str(kd.config.cache_teacher.storage_dtype).removeprefix("torch."),
            "cache_key": kd.cache_keys.keying,
        }
        if kd.config.cache_teacher.top_k:
            rows["cache_top_k"] = kd.config.cache_teacher.top_k
        stored = kd.cache.values.get("topk_index", kd.cache.values.get("logits"))
        if stored is not None and kd._vocab:  # what full float32 logits of the same examples would take
            rows["cache_bytes_full_logits"] = len(kd.cache) * stored[0].numel() // stored.shape[-1] * kd._vocab * 4
    teacher = kd.measurable_teacher
    if kd._sample is not None and teacher is None:  # sharded, not gathered: its forward would wait for the others
        rows["teacher_macs_error"] = "not measured: the teacher is sharded and was not gathered (teacher_sharding)"
    elif kd._sample is not None:
        one = slice_batch(kd._sample, torch.arange(1), size=example_count(kd._sample))
        try:
            macs = count_macs(teacher_target(teacher, kd.student_path), one)
            rows |= {"teacher_macs_per_example": macs, "teacher_macs_total": macs * kd.counts["teacher_examples"]}
            tokens = token_count(one)
            if tokens:
                rows["teacher_macs_per_token"] = macs / tokens
        except Exception as err:  # a teacher torch-pruning cannot trace still gets its counts reported
            rows["teacher_macs_error"] = f"{type(err).__name__}: {err}"[:200]
    return rows
