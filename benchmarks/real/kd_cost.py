"""What knowledge distillation costs on SmolLM2-135M-Instruct, in the user-style ``demos.modules.CausalLM``
(no ``forward``; ``training_step`` calls ``self.model(input_ids=..., attention_mask=..., labels=...)``):

- the check before training (``KnowledgeDistillation.validate``: the user's ``training_step`` and the
  teacher run once on 2 training windows, no gradients);
- the time of a training step of a student (SmolLM2 cut to every other layer, 15 of 30) trained
  alone, with KD whose top-k teacher cache is cold (a new callback: the teacher runs on every window,
  as in the first epoch) and warm (a callback whose cache already holds every window, as in later
  epochs), side by side in one process, ``ROUNDS`` interleaved rounds, the first step of each fit
  dropped, medians;
- the cache's bytes per window against full float32 logits.

Data: the first ``STEPS * BATCH`` 128-token training windows, one epoch of ``STEPS`` steps, the
loader's seed 0 in every fit. KD: ``alpha=0.5, temperature=1.0, cache_teacher={"top_k": 32}``.

    python benchmarks/real_models.py --arms kd_cost            # about 6 minutes on 2 quiet cores
    python benchmarks/real_models.py --arms kd_cost --smoke    # the plumbing, about a minute
"""

from __future__ import annotations

import copy
import statistics
import time

from common import step_timer

from lightning_slim import KnowledgeDistillation
from lightning_slim.demos.modules import CausalLM
from lightning_slim.distillation.topk import cache_bytes_per_position
from lightning_slim.pruning.depth import keep_layers
from real.common import SEQ_LEN, lm_data, smol, trainer

STEPS, BATCH, TOP_K, ROUNDS = 6, 4, 32, 2
KD = {"alpha": 0.5, "temperature": 1.0, "cache_teacher": {"top_k": TOP_K}}


class TimedCheck:
    """Wraps a callback's ``validate`` (the check before training) and keeps its wall times."""

    def __init__(self, kd: KnowledgeDistillation):
        self.kd, self.validate, self.times = kd, kd.validate, []
        kd.validate = self

    def __call__(self, *args):
        t = time.perf_counter()
        self.validate(*args)
        self.times.append(time.perf_counter() - t)


def run(args) -> dict:
    import torch

    steps, rounds = (2, 1) if args.smoke else (STEPS, ROUNDS)
    teacher = smol()
    student = copy.deepcopy(teacher)
    keep_layers(student, range(0, 30, 2))
    data = lambda: lm_data(batch_size=BATCH, seed=0, limit={"train": steps * BATCH, "val": 1, "test": 1})

    def fit(callbacks) -> list[float]:
        timer = step_timer(skip_first=1)
        trainer(max_steps=steps, callbacks=[*callbacks, timer]).fit(CausalLM(copy.deepcopy(student)), datamodule=data())
        return timer.times

    warm = KnowledgeDistillation(teacher=teacher, **KD)
    fit([warm])  # fills the cache with every window: later fits with this callback only look it up
    assert warm.counts["teacher_examples"] == steps * BATCH
    times: dict[str, list[float]] = {"plain": [], "kd_cold": [], "kd_warm": []}
    checks = []
    for _ in range(rounds):
        times["plain"] += fit([])
        cold = KnowledgeDistillation(teacher=teacher, **KD)
        checks.append(TimedCheck(cold))
        times["kd_cold"] += fit([cold])
        times["kd_warm"] += fit([warm])
    step_s = {k: statistics.median(v) for k, v in times.items()}
    vocab = teacher.config.vocab_size
    return {
        "check_s": statistics.median(t for c in checks for t in c.times),
        "step_s": step_s,
        "step_ratio": {k: step_s[k] / step_s["plain"] for k in ("kd_cold", "kd_warm")},
        "steps_timed": {k: len(v) for k, v in times.items()},
        "cache_bytes_per_window": cache_bytes_per_position(TOP_K, vocab, torch.float16) * SEQ_LEN,
        "full_logits_bytes_per_window": vocab * SEQ_LEN * 4,
        "student_layers": 15,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "top_k": TOP_K,
    }
