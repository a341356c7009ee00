"""SmolLM2-135M pruned 2:4 with Wanda, then recovered with knowledge distillation from the dense model
against plain fine-tuning, at equal tokens; beside it, the dense model fine-tuned on the same tokens
(in-domain fine-tuning lowers the dense perplexity too: that is the honest baseline).

Every arm is a Lightning ``Trainer`` fit of ``demos.modules.CausalLM`` (the user's module) with the
callbacks: ``IterativeMagnitudePruning(pattern="2:4", importance="wanda")`` prunes once, after
``CALIBRATION_STEPS`` dense steps whose inputs are Wanda's calibration data (the tied ``lm_head`` is
left out by default, so the embedding stays dense), and ``KnowledgeDistillation`` with the dense
model as teacher and its top-k cached outputs adds the soft-target term in the KD arm. All arms see
the same windows in the same order (``lm_data(seed=0)``) for ``steps`` optimizer steps, so the
same tokens. Settings were chosen on the validation split (``SWEEP`` below, ``--sweep``); numbers
are reported on the test split: perplexity = exp(mean next-token nats over every test window).

    python benchmarks/real_models.py --arms smol_2of4
    python benchmarks/real/smol_2of4.py --sweep      # the validation sweep behind SETTINGS
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

if __name__ == "__main__":  # run as a script (--sweep): the benchmarks folder holds `common` and `real`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_slim import KnowledgeDistillation
from lightning_slim.demos.modules import CausalLM
from lightning_slim.pruning import IterativeMagnitudePruning
from real.common import SEQ_LEN, lm_data, lm_loss, ppl, smol, trainer, windows

# The budget (batch x steps, fixed first: the arm fits ~15 min on 2 cores) and each arm's peak learning
# rate and the KD settings, chosen on the validation split by `--sweep` (benchmarks/results/smol_2of4_sweep.json)
SETTINGS = dict(
    batch=4,
    steps=32,
    calibration_steps=2,  # dense steps whose inputs Wanda scores by; the cut comes at the start of step 2
    lr={"dense_ft": 3e-4, "plain": 3e-4, "kd": 3e-4},
    alpha=0.5,
    temperature=1.0,
    top_k=64,
)
SMOKE = dict(SETTINGS, batch=2, steps=2, top_k=8, calibration_steps=1)
SWEEP_LRS = (1e-4, 3e-4)  # stage 1: every arm at each; stage 2: KD's alpha and temperature at its best lr
SWEEP_KD = (dict(alpha=0.5), dict(temperature=2.0))


class AfterPruning(pl.Callback):
    """Evaluates the student in the step of the pruning event, before its optimizer step: the pruned
    model before any recovery. (Pruning's event runs at the batch's start, after every callback's
    batch-start hook, so this looks later in the same step: just before backward.)"""

    def __init__(self, pruning: IterativeMagnitudePruning, ids: torch.Tensor):
        self.pruning, self.ids, self.loss = pruning, ids, None

    @torch.no_grad()
    def on_before_backward(self, trainer, pl_module, loss):
        if self.pruning.round == 1 and self.loss is None:
            self.loss = lm_loss(pl_module.model, self.ids)


def pruning(s: dict) -> IterativeMagnitudePruning:
    return IterativeMagnitudePruning(
        {"kind": "one_shot", "sparsity": 0.5, "at": s["calibration_steps"], "unit": "step"},
        pattern="2:4",
        importance="wanda",
        accuracy_metric=None,
    )


def fit(dense: torch.nn.Module, callbacks, s: dict, arm: str, limit: dict | None) -> torch.nn.Module:
    """A copy of ``dense`` fine-tuned for ``s["steps"]`` steps at ``arm``'s peak learning rate with
    ``callbacks`` (seed 0: every arm sees the same windows in the same order)."""
    pl.seed_everything(0, verbose=False)
    module = CausalLM(copy.deepcopy(dense), lr=s["lr"][arm], warmup=max(1, s["steps"] // 8))
    trainer(s["steps"], callbacks).fit(module, datamodule=lm_data(s["batch"], seed=0, limit=limit))
    return module.model


def arms(dense, s: dict, eval_ids, limit: dict | None, which=("dense_ft", "plain", "kd")) -> dict:
    """The trainings at settings ``s``, each judged on ``eval_ids``: mean next-token nats."""
    out, t = {}, time.time()
    if "dense_ft" in which:
        out["dense_finetuned_loss"] = lm_loss(fit(dense, [], s, "dense_ft", limit), eval_ids)
        out["dense_ft_s"], t = round(time.time() - t, 1), time.time()
    if "plain" in which:
        probe = AfterPruning(cb := pruning(s), eval_ids)
        out["plain_loss"] = lm_loss(fit(dense, [cb, probe], s, "plain", limit), eval_ids)
        out["pruned_loss"] = probe.loss
        out["plain_pruning"] = {k: v for k, v in cb.report_rows().items() if k in ("sparsity", "untouched")}
        out["plain_s"], t = round(time.time() - t, 1), time.time()
    if "kd" in which:  # the teacher is the dense model itself (frozen, kept on the callback)
        cache = {"top_k": s["top_k"]}
        teacher = copy.deepcopy(dense)  # KD freezes its teacher in place: the students are copies of `dense`
        kd = KnowledgeDistillation(teacher=teacher, alpha=s["alpha"], temperature=s["temperature"], cache_teacher=cache)
        out["kd_loss"] = lm_loss(fit(dense, [pruning(s), kd], s, "kd", limit), eval_ids)
        out["kd_s"] = round(time.time() - t, 1)
    return out


def run(args) -> dict:
    started = time.time()
    s = dict(SMOKE if args.smoke else SETTINGS)
    limit = {"train": s["steps"] * s["batch"], "val": 2, "test": 2} if args.smoke else None
    test = windows("test")[: limit["test"]] if limit else windows("test")
    dense = smol()
    result = {"dense_loss": lm_loss(dense, test), **arms(dense, s, test, limit)}
    losses = {k: result[k] for k in ("dense_loss", "dense_finetuned_loss", "pruned_loss", "plain_loss", "kd_loss")}
    out = {k.replace("_loss", "_ppl"): round(ppl(v), 3) for k, v in losses.items()}
    out |= {"losses": {k: round(v, 4) for k, v in losses.items()}}
    out |= {
        "tokens": s["steps"] * s["batch"] * SEQ_LEN,
        "settings": s,
        "kd_within_25pct_of_dense_finetuned": out["kd_ppl"] <= 1.25 * out["dense_finetuned_ppl"],
        "kd_better_than_plain": out["kd_ppl"] < out["plain_ppl"],
        "pruning": result["plain_pruning"],
        "phase_s": {k: result[k] for k in ("dense_ft_s", "plain_s", "kd_s")},
        "split": "test",
        "arm_s": round(time.time() - started, 1),
    }
    return out


def sweep(args) -> dict:
    """The settings, on the validation split at SETTINGS' budget: stage 1 runs every arm at each of
    SWEEP_LRS; stage 2 varies KD's alpha and temperature at its best lr. Each arm keeps its best."""
    val, dense = windows("val"), smol()
    rows = []

    def point(s: dict, which: tuple[str, ...]) -> dict:
        t = time.time()
        got = arms(dense, s, val, None, which)
        rows.append(
            {"settings": s, **{k[:-5] + "_ppl": round(ppl(v), 3) for k, v in got.items() if k.endswith("_loss")}}
        )
        rows[-1]["wall_s"] = round(time.time() - t, 1)
        print(json.dumps(rows[-1]), flush=True)
        return got

    for lr in SWEEP_LRS:
        point({**SETTINGS, "lr": dict.fromkeys(("dense_ft", "plain", "kd"), lr)}, ("dense_ft", "plain", "kd"))
    best = {
        arm: min((r for r in rows if key in r), key=lambda r: r[key])["settings"]["lr"][arm]
        for arm, key in (("dense_ft", "dense_finetuned_ppl"), ("plain", "plain_ppl"), ("kd", "kd_ppl"))
    }
    for change in SWEEP_KD:
        point({**SETTINGS, "lr": best, **change}, ("kd",))
    kd_best = min((r for r in rows if "kd_ppl" in r), key=lambda r: r["kd_ppl"])["settings"]
    chosen = {**SETTINGS, "lr": best, "alpha": kd_best["alpha"], "temperature": kd_best["temperature"]}
    result = {"split": "val", "rows": rows, "chosen": chosen}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/smol_2of4_sweep.json")
    a = p.parse_args()
    from common import fair_cpu, steady_allocator

    fair_cpu(a.threads)
    steady_allocator()
    print(json.dumps(sweep(a) if a.sweep else run(argparse.Namespace(smoke=False)), indent=2))
