"""Online data selection on MNIST-1D with 30% corrupted labels (issue 6).

    python benchmarks/selection.py --out benchmarks/results/selection.json   # ~6-8 min on 2 cores

Classification: per seed (paired: the same split, noise, initial weights and super-batch stream for
every arm) a reference CNN is trained on the clean holdout, its losses are cached lazily per
training index, and four arms train the same CNN for the same step budget: ``uniform`` (batch 32),
``hard`` and ``learnability`` (top 25% of a 128-example super-batch, scored without gradients in
eval mode) and ``uniform_train_plus_holdout`` (uniform over train + holdout: the data the
reference saw). Compute units: a trained example 3, a scoring forward 1 (the learner's, and the
reference's cache misses); ``compute_to_target_with_reference`` adds the reference's training.

Contrastive (``jest``): two MLP towers match paired views of MNIST-1D signals with a SigLIP sigmoid
loss; 30% of training pairs are mismatched. Arms: uniform, independent learnability (JEST with one
chunk: each pair's own learner-minus-reference loss) and JEST (4 chunks, each conditioned on the
pairs already chosen). Metric: top-1 retrieval among 100 clean test pairs.

The arms run in a plain PyTorch loop over ``lightning_slim.selection.functional`` (Lightning's
per-step overhead would not fit 10 minutes); ``callback_check`` runs learnability through the real
``OnlineDataSelection`` callback in a Trainer for one seed. Targets are fixed below from a pilot of
the uniform arms only (``--pilot``) before any selection result was seen; see the method card.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.data import MNIST1DDataModule
from lightning_slim.models import MNIST1DCNN
from lightning_slim.selection.functional import (
    FORWARD_UNITS, TRAIN_UNITS, example_scores, jest_select, scoring_mode, select_topk, sigmoid_pair_losses)

SEEDS = (1, 2, 3)
NOISE, KEEP, BATCH, CHANNELS, LR = 0.3, 0.25, 32, 32, 1e-2
STEPS, EVAL_EVERY, REF_EPOCHS, REF_CHANNELS = 3000, 50, 12, 64
# Fixed from the pilot (`--pilot --seeds 1`, uniform arms only, before any selection run): uniform's
# test accuracy first reached 0.90 at step 1850 of 3000 (62%) and retrieval 0.70 at step 1200 of 2000 (60%).
TARGET_ACC = 0.90
JEST_STEPS, JEST_TARGET = 2000, 0.70
SUPER = round(BATCH / KEEP)


def data(seed: int) -> MNIST1DDataModule:
    dm = MNIST1DDataModule(num_samples=20000, seed=seed, holdout_fraction=0.3, label_noise=NOISE)
    dm.setup()
    return dm


class Stream:
    """Super-batches of indices: a fresh seeded permutation every epoch (the same for every arm)."""

    def __init__(self, n: int, size: int, seed: int):
        self.n, self.size, self.g = n, size, torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if len(self.order) < self.size:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.g)])
        out, self.order = self.order[: self.size], self.order[self.size:]
        return out


def optimizer(params, steps: int):
    opt = torch.optim.Adam(params, lr=LR)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


@torch.no_grad()
def accuracy(net, x, y) -> float:
    with scoring_mode(net):
        return float((net(x).argmax(-1) == y).float().mean())


def train_reference(dm, seed: int):
    torch.manual_seed(seed + 100)
    net = MNIST1DCNN(channels=REF_CHANNELS).net
    steps = REF_EPOCHS * (len(dm.y_holdout) // BATCH)
    opt, sched = optimizer(net.parameters(), steps)
    stream = Stream(len(dm.y_holdout), BATCH, seed + 100)
    for _ in range(steps):
        i = stream.next()
        loss = F.cross_entropy(net(dm.x_holdout[i]), dm.y_holdout[i])
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return net, steps * BATCH, accuracy(net, dm.x_test, dm.y_test)


def classify_run(arm: str, dm, seed: int, steps: int, reference=None) -> dict:
    x, y, noisy = dm.x_train, dm.y_train, dm.noisy
    if arm == "uniform_train_plus_holdout":
        x, y = torch.cat([x, dm.x_holdout]), torch.cat([y, dm.y_holdout])
        noisy = torch.cat([noisy, torch.zeros(len(dm.y_holdout), dtype=torch.bool)])
    torch.manual_seed(seed)
    net = MNIST1DCNN(channels=CHANNELS).net
    opt, sched = optimizer(net.parameters(), steps)
    selecting = arm in ("hard", "learnability")
    stream = Stream(len(y), SUPER if selecting else BATCH, seed)
    cache = torch.full((len(y),), float("nan"))
    ref_forwards = learner_forwards = trained = noisy_trained = 0
    curve = []
    for step in range(1, steps + 1):
        i = stream.next()
        if selecting:
            with scoring_mode(net):
                learner = F.cross_entropy(net(x[i]), y[i], reduction="none")
            learner_forwards += len(i)
            ref = None
            if arm == "learnability":
                miss = i[torch.isnan(cache[i])]
                if len(miss):  # the reference scores each training example once (RHO-LOSS's cache)
                    with scoring_mode(reference):
                        cache[miss] = F.cross_entropy(reference(x[miss]), y[miss], reduction="none")
                    ref_forwards += len(miss)
                ref = cache[i]
            i = i[select_topk(example_scores(arm, learner, ref), BATCH)]
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        trained += len(i); noisy_trained += int(noisy[i].sum())
        if step % EVAL_EVERY == 0:
            units = TRAIN_UNITS * trained + FORWARD_UNITS * (learner_forwards + ref_forwards)
            curve.append((step, accuracy(net, dm.x_test, dm.y_test), units))
    return {"curve": curve, "noisy_fraction_selected": noisy_trained / trained}


def to_target(curve, target):
    """(steps, compute units) at the first evaluation reaching ``target``; None if never."""
    return next(((s, u) for s, a, u in curve if a >= target), (None, None))


# --- contrastive paired views (JEST) -------------------------------------------------------------------------
class Towers(nn.Module):
    def __init__(self, dim: int = 32, width: int = 64):
        super().__init__()
        mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(40, width), nn.ReLU(), nn.Linear(width, dim))
        self.fa, self.fb = mlp(), mlp()
        self.log_scale, self.bias = nn.Parameter(torch.tensor(math.log(10.0))), nn.Parameter(torch.tensor(-10.0))

    def logits(self, a, b):
        za, zb = F.normalize(self.fa(a), dim=-1), F.normalize(self.fb(b), dim=-1)
        return za @ zb.T * self.log_scale.exp() + self.bias

    def pair_losses(self, a, b):
        return sigmoid_pair_losses(self.logits(a, b))


def views(x: torch.Tensor, seed: int, mismatch: float):
    """View a: the signal plus noise; view b: the signal reversed, shifted and noised (30% mismatched)."""
    g = torch.Generator().manual_seed(seed)
    a = x + 0.2 * torch.randn(x.shape, generator=g)
    b = torch.flip(x, dims=[-1]) + 0.2 * torch.randn(x.shape, generator=g)
    shifts = torch.randint(-3, 4, (len(x),), generator=g)
    b = torch.stack([torch.roll(row, int(s), dims=-1) for row, s in zip(b, shifts)])
    wrong = torch.rand(len(x), generator=g) < mismatch
    b[wrong] = b[torch.randint(0, len(x), (int(wrong.sum()),), generator=g)]
    return a, b, wrong


@torch.no_grad()
def retrieval(model, a, b, group: int = 100) -> float:
    hits = 0
    for s in range(0, len(a) - group + 1, group):
        hits += int((model.logits(a[s:s + group], b[s:s + group]).argmax(-1) == torch.arange(group)).sum())
    return hits / (len(a) // group * group)


def contrastive_train(arm: str, a, b, test, seed: int, steps: int, reference=None, chunks: int = 4):
    torch.manual_seed(seed)
    model = Towers()
    opt, sched = optimizer(model.parameters(), steps)
    stream = Stream(len(a), BATCH if arm == "uniform" else SUPER, seed)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        i = stream.next()
        if arm != "uniform":
            with scoring_mode(model), scoring_mode(reference):
                m = model.pair_losses(a[i], b[i]) - reference.pair_losses(a[i], b[i])
            i = i[jest_select(m, BATCH, 1 if arm == "learnability" else chunks, g, method="sample")]
        loss = model.pair_losses(a[i], b[i]).sum() / len(i)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        if step % EVAL_EVERY == 0:
            curve.append((step, retrieval(model, *test), 0))
    return model, curve


def jest_seed(dm, seed: int, steps: int, arms=("uniform", "learnability", "jest")) -> dict:
    a, b, _ = views(dm.x_train, seed, NOISE)
    test = views(dm.x_test, seed + 2, 0.0)[:2]
    out = {}
    if set(arms) - {"uniform"}:  # the reference: the same towers trained on clean holdout pairs
        ha, hb, _ = views(dm.x_holdout, seed + 1, 0.0)
        reference, curve = contrastive_train("uniform", ha, hb, test, seed + 100, steps)
        out["reference_retrieval"] = curve[-1][1]
    for arm in arms:
        out[arm] = contrastive_train(arm, a, b, test, seed, steps, reference if arm != "uniform" else None)[1]
    return out


def mean_curve(curves):
    return [(c[0][0], sum(p[1] for p in c) / len(c)) for c in zip(*curves)]


def pilot(seeds) -> None:
    """Uniform arms only: print the mean accuracy curves the targets are fixed from."""
    cls, con = [], []
    for seed in seeds:
        dm = data(seed)
        cls.append(classify_run("uniform", dm, seed, STEPS)["curve"])
        con.append(jest_seed(dm, seed, JEST_STEPS, arms=("uniform",))["uniform"])
    for name, curves in (("classification", cls), ("contrastive", con)):
        print(name, [(s, round(a, 4)) for s, a in mean_curve(curves)])


def callback_check(seed: int, reference: nn.Module, steps: int) -> dict:
    """The learnability arm of ``seed`` again, through the real OnlineDataSelection callback in a
    Lightning Trainer: the same reference, initial weights, model, optimizer and schedule (only the
    super-batch order differs: the data module's sampler instead of ``Stream``)."""
    import lightning.pytorch as pl

    from lightning_slim.selection import OnlineDataSelection

    class Curve(pl.Callback):
        def __init__(self):
            self.points = []

        def on_validation_end(self, trainer, module):
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val/acc"]), 0))

    dm = MNIST1DDataModule(num_samples=20000, seed=seed, holdout_fraction=0.3, label_noise=NOISE,
                           with_index=True, batch_size=SUPER, eval_batch_size=4000)
    cb = OnlineDataSelection(keep=KEEP, score="learnability", reference=reference, cache_reference=True,
                             seed=seed, histogram_every_n_steps=0,
                             reference_train_examples=REF_EPOCHS * (len(data(seed).y_holdout) // BATCH) * BATCH)
    curve = Curve()
    torch.manual_seed(seed)
    module = MNIST1DCNN(channels=CHANNELS, lr=LR, lr_schedule="cosine")
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[cb, curve],
                         val_check_interval=EVAL_EVERY, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    hit = to_target(curve.points, TARGET_ACC)[0]
    return {"seed": seed, "steps": steps, "final_acc": curve.points[-1][1], "steps_to_target": hit,
            "seconds": round(time.perf_counter() - start, 1), **cb.report_rows()}


def summarize(runs: list[dict], target: float) -> dict:
    """Medians over seeds (steps/compute to target: None if the median seed missed the target)."""
    def med(values):  # a seed that never reached the target counts as infinitely slow
        values = sorted(math.inf if v is None else v for v in values)
        half = len(values) // 2
        m = values[half] if len(values) % 2 else (values[half - 1] + values[half]) / 2
        return None if math.isinf(m) else m
    hits = [to_target(r["curve"], target) for r in runs]
    return {"final_acc": med([r["curve"][-1][1] for r in runs]),
            "steps_to_target": med([h[0] for h in hits]), "compute_to_target": med([h[1] for h in hits]),
            "noisy_fraction_selected": med([r["noisy_fraction_selected"] for r in runs]),
            "per_seed": [{"final_acc": r["curve"][-1][1], "steps_to_target": h[0], "compute_to_target": h[1],
                          "noisy_fraction_selected": r["noisy_fraction_selected"]} for r, h in zip(runs, hits)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/selection.json")
    parser.add_argument("--pilot", action="store_true", help="uniform arms only, to fix the targets")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--callback-steps", type=int, default=STEPS)
    parser.add_argument("--raw", help="also write every accuracy curve to this file")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # small models: one thread is fastest and steadiest on a shared 2-core machine
    start = time.perf_counter()
    if args.pilot:
        pilot(args.seeds)
        print(f"{time.perf_counter() - start:.0f} s")
        return
    arms = ("uniform", "hard", "learnability", "uniform_train_plus_holdout")
    runs = {arm: [] for arm in arms}
    refs, jest_runs = [], []
    for seed in args.seeds:
        dm = data(seed)
        reference, ref_examples, ref_acc = train_reference(dm, seed)
        refs.append((ref_examples, ref_acc))
        if seed == args.seeds[0]:
            first_reference = reference
        for arm in arms:  # interleaved per seed: drift on the shared machine hits every arm alike
            runs[arm].append(classify_run(arm, dm, seed, STEPS, reference if arm == "learnability" else None))
        jest_runs.append(jest_seed(dm, seed, JEST_STEPS))
        print(f"seed {seed} done at {time.perf_counter() - start:.0f} s", flush=True)
    if args.raw:  # every accuracy curve, written before any summary
        with open(args.raw, "w") as f:
            json.dump({"runs": runs, "references": refs, "jest": jest_runs}, f)
    result = {"target_acc": TARGET_ACC, "noise": NOISE, "keep": KEEP, "seeds": args.seeds,
              "setup": {"num_samples": 20000, "train": len(dm.y_train), "holdout": len(dm.y_holdout),
                        "test": len(dm.y_test), "model": f"MNIST1DCNN(channels={CHANNELS})", "batch": BATCH,
                        "super_batch": SUPER, "steps": STEPS, "eval_every": EVAL_EVERY, "optimizer": "adam",
                        "lr": LR, "schedule": "cosine", "reference": f"MNIST1DCNN(channels={REF_CHANNELS}), "
                        f"{REF_EPOCHS} epochs on the clean holdout", "units": {"train_example": TRAIN_UNITS,
                                                                              "scoring_forward": FORWARD_UNITS}}}
    for arm in arms:
        result[arm] = summarize(runs[arm], TARGET_ACC)
    ref_units = [TRAIN_UNITS * n for n, _ in refs]
    learn = result["learnability"]
    learn["reference_acc"] = sorted(a for _, a in refs)[len(refs) // 2]
    learn["reference_train_units"] = ref_units[0]
    per_seed = [h["compute_to_target"] + u if h["compute_to_target"] is not None else None
                for h, u in zip(learn["per_seed"], ref_units)]
    learn["compute_to_target_with_reference"] = None if None in per_seed else sorted(per_seed)[len(per_seed) // 2]
    jest = {}
    for arm in ("uniform", "learnability", "jest"):
        jest[arm] = summarize([{"curve": r[arm], "noisy_fraction_selected": None} for r in jest_runs], JEST_TARGET)
        for key in ("compute_to_target", "noisy_fraction_selected"):
            jest[arm].pop(key)
            for p in jest[arm]["per_seed"]:
                p.pop(key)
    jest.update(target_retrieval=JEST_TARGET, metric="top-1 retrieval among 100 clean test pairs",
                mismatched=NOISE, steps=JEST_STEPS,
                reference_retrieval=sorted(r["reference_retrieval"] for r in jest_runs)[len(jest_runs) // 2])
    result["jest"] = jest
    u = result["uniform"]
    result["ratios"] = {
        "learnability_steps_speedup": u["steps_to_target"] / learn["steps_to_target"]
        if u["steps_to_target"] and learn["steps_to_target"] else None,
        "learnability_compute_vs_uniform": learn["compute_to_target"] / u["compute_to_target"]
        if u["compute_to_target"] and learn["compute_to_target"] else None,
        "jest_steps_speedup": jest["uniform"]["steps_to_target"] / jest["jest"]["steps_to_target"]
        if jest["uniform"]["steps_to_target"] and jest["jest"]["steps_to_target"] else None,
    }
    result["callback_check"] = callback_check(args.seeds[0], first_reference, args.callback_steps)
    result["callback_check"]["plain_loop_same_seed"] = result["learnability"]["per_seed"][0]
    result["seconds"] = round(time.perf_counter() - start, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "setup"}, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
