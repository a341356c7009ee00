"""Online data selection on MNIST-1D with 30% corrupted labels (issues 6 and 13).

    flock /tmp/slim_bench.lock python benchmarks/selection.py --out benchmarks/results/selection.json

The seeds run in ``--workers`` processes (3: one per seed, 18 minutes on 2 cores).

Classification, DESIGN.md's setting: MNIST-1D, 55,000 examples: 11,000 test, 4,000 clean validation
(carved first: the target was fixed on it by the pilot, see below; nothing else was searched), 12,000 clean holdout
and 28,000 training examples with 30% of their labels corrupted. Per seed (paired: the same split,
noise, initial weights and super-batch stream for every arm) a reference CNN is trained on the clean
holdout and its losses are cached per training index (computed once per example, the first time it is
seen); the arms train the same 64-channel CNN for the same number of steps (batch 32, Adam, cosine):
``uniform``; ``hard`` and ``learnability`` (the top ``KEEP`` of each super-batch of 32 / KEEP, scored
without gradients in eval mode); ``uniform_train_plus_holdout`` (uniform over train + holdout: the
data the reference saw, the honest baseline). ``--search-keep`` adds learnability arms at other keeps.

Compute is counted in MACs: a trained example costs 3 forwards of the learner (forward + backward), a
scoring forward one learner forward, a reference forward one reference forward (so a reference k times
larger costs k times more); ``compute_to_target_with_reference`` adds the reference's training (3
reference forwards per example it trained on).

Contrastive (``jest``): two MLP towers match paired views of MNIST-1D signals with a SigLIP sigmoid
loss; 30% of training pairs are mismatched. Arms: uniform, independent learnability (JEST with one
chunk: each pair's own learner-minus-reference loss) and JEST (4 chunks, each conditioned on the
pairs already chosen). Metric: top-1 retrieval among groups of 100 clean pairs.

The arms run in a plain PyTorch loop over ``lightning_slim.selection.functional`` (27 trainings);
``callback_check`` runs learnability through the real ``OnlineDataSelection`` callback in a Trainer
for one seed. Every curve holds validation and test accuracy; steps and compute to target are
reported on test (``val`` beside them), with targets fixed from a pilot of the uniform arms on
validation (``--pilot``) before any selection arm was run.
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F
from common import ValidatedMNIST1D, accuracy, fair_cpu, parser, run_all, write
from torch import nn

from lightning_slim.demos.models import MNIST1DCNN
from lightning_slim.reporting.measure import count_macs
from lightning_slim.selection.functional import (
    example_scores,
    jest_select,
    scoring_mode,
    select_topk,
    sigmoid_pair_losses,
)

NUM_SAMPLES, VAL, HOLDOUT = 55000, 4000, 0.3
NOISE, KEEP, BATCH, CHANNELS, LR = 0.3, 0.25, 32, 64, 1e-2
STEPS, EVAL_EVERY, REF_EPOCHS, REF_CHANNELS = 6000, 100, 12, 64
# Fixed from the pilot (`--pilot`, uniform arms only, validation split, seeds 1-3, before any selection arm
# was run): the median seed's final validation accuracy of uniform training, rounded down to 0.005
# (classification: 0.9645, 0.966, 0.955 -> 0.96; contrastive retrieval: 0.790, 0.798, 0.761 -> 0.785).
TARGET_ACC = 0.96
JEST_STEPS, JEST_TARGET = 2000, 0.785
SPLITS = ("val", "test")


def data(seed: int) -> ValidatedMNIST1D:
    dm = ValidatedMNIST1D(
        num_samples=NUM_SAMPLES, val_examples=VAL, seed=seed, holdout_fraction=HOLDOUT, label_noise=NOISE
    )
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
        out, self.order = self.order[: self.size], self.order[self.size :]
        return out


def optimizer(params, steps: int):
    opt = torch.optim.Adam(params, lr=LR)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def macs(channels: int) -> int:
    """MACs of one example's forward through ``MNIST1DCNN(channels)``."""
    return count_macs(MNIST1DCNN(channels=channels).net, torch.zeros(1, 1, 40))


def train_reference(dm, seed: int):
    torch.manual_seed(seed + 100)
    net = MNIST1DCNN(channels=REF_CHANNELS).net
    steps = REF_EPOCHS * (len(dm.y_holdout) // BATCH)
    opt, sched = optimizer(net.parameters(), steps)
    stream = Stream(len(dm.y_holdout), BATCH, seed + 100)
    for _ in range(steps):
        i = stream.next()
        loss = F.cross_entropy(net(dm.x_holdout[i]), dm.y_holdout[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net, steps * BATCH, {s: accuracy(net, *dm.split(s)) for s in SPLITS}


def classify_run(arm: str, dm, seed: int, steps: int, reference=None, keep: float = KEEP) -> dict:
    """One arm; its curve holds (step, val acc, test acc, MACs so far) every EVAL_EVERY steps."""
    x, y, noisy = dm.x_train, dm.y_train, dm.noisy
    if arm == "uniform_train_plus_holdout":
        x, y = torch.cat([x, dm.x_holdout]), torch.cat([y, dm.y_holdout])
        noisy = torch.cat([noisy, torch.zeros(len(dm.y_holdout), dtype=torch.bool)])
    torch.manual_seed(seed)
    net = MNIST1DCNN(channels=CHANNELS).net
    opt, sched = optimizer(net.parameters(), steps)
    selecting = arm in ("hard", "learnability")
    stream = Stream(len(y), round(BATCH / keep) if selecting else BATCH, seed)
    cache = torch.full((len(y),), float("nan"))
    learner_macs, reference_macs = macs(CHANNELS), macs(REF_CHANNELS)
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
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        trained += len(i)
        noisy_trained += int(noisy[i].sum())
        if step % EVAL_EVERY == 0:
            compute = learner_macs * (3 * trained + learner_forwards) + reference_macs * ref_forwards
            curve.append((step, *(accuracy(net, *dm.split(s)) for s in SPLITS), compute))
    return {"curve": curve, "noisy_fraction_selected": noisy_trained / trained, "keep": keep if selecting else 1.0}


def to_target(curve, target: float, split: str = "test"):
    """(steps, compute) at the first evaluation whose ``split`` accuracy reaches ``target``; None if never."""
    col = 1 + SPLITS.index(split)
    return next(((p[0], p[-1]) for p in curve if p[col] >= target), (None, None))


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
        hits += int((model.logits(a[s : s + group], b[s : s + group]).argmax(-1) == torch.arange(group)).sum())
    return hits / (len(a) // group * group)


def contrastive_train(arm: str, a, b, evals, seed: int, steps: int, reference=None, chunks: int = 4):
    torch.manual_seed(seed)
    model = Towers()
    opt, sched = optimizer(model.parameters(), steps)
    stream = Stream(len(a), BATCH if arm == "uniform" else round(BATCH / KEEP), seed)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        i = stream.next()
        if arm != "uniform":
            with scoring_mode(model), scoring_mode(reference):
                m = model.pair_losses(a[i], b[i]) - reference.pair_losses(a[i], b[i])
            i = i[jest_select(m, BATCH, 1 if arm == "learnability" else chunks, g, method="sample")]
        loss = model.pair_losses(a[i], b[i]).sum() / len(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % EVAL_EVERY == 0:
            curve.append((step, *(retrieval(model, *evals[s]) for s in SPLITS), 0))
    return model, curve


def jest_seed(dm, seed: int, steps: int, arms=("uniform", "learnability", "jest")) -> dict:
    a, b, _ = views(dm.x_train, seed, NOISE)
    evals = {"val": views(dm.x_val, seed + 3, 0.0)[:2], "test": views(dm.x_test, seed + 2, 0.0)[:2]}
    out = {}
    if set(arms) - {"uniform"}:  # the reference: the same towers trained on clean holdout pairs
        ha, hb, _ = views(dm.x_holdout, seed + 1, 0.0)
        reference, curve = contrastive_train("uniform", ha, hb, evals, seed + 100, steps)
        out["reference_retrieval"] = curve[-1][2]
    for arm in arms:
        out[arm] = contrastive_train(arm, a, b, evals, seed, steps, reference if arm != "uniform" else None)[1]
    return out


def pilot(seeds) -> None:
    """Uniform arms only: print the validation curves the targets are fixed from."""
    for seed in seeds:
        dm = data(seed)
        cls = classify_run("uniform", dm, seed, STEPS)["curve"]
        con = jest_seed(dm, seed, JEST_STEPS, arms=("uniform",))["uniform"]
        for name, curve in (("classification", cls), ("contrastive", con)):
            print(seed, name, [(p[0], round(p[1], 4)) for p in curve], flush=True)


def callback_check(seed: int, reference: nn.Module, reference_examples: int, steps: int) -> dict:
    """The learnability arm of ``seed`` again, through the real OnlineDataSelection callback in a
    Lightning Trainer: the same reference, initial weights, model, optimizer and schedule (only the
    super-batch order differs: the data module's sampler instead of ``Stream``)."""
    import lightning.pytorch as pl
    from common import quiet_trainer

    from lightning_slim.selection import OnlineDataSelection

    class Curve(pl.Callback):
        def __init__(self, dm):
            self.dm, self.points = dm, []

        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step % EVAL_EVERY == 0:
                self.points.append((trainer.global_step, *(accuracy(module, *self.dm.split(s)) for s in SPLITS), 0))

    dm = ValidatedMNIST1D(
        num_samples=NUM_SAMPLES,
        val_examples=VAL,
        seed=seed,
        holdout_fraction=HOLDOUT,
        label_noise=NOISE,
        with_index=True,
        batch_size=round(BATCH / KEEP),
    )
    cb = OnlineDataSelection(
        keep=KEEP,
        score="learnability",
        reference=reference,
        cache_reference=True,
        seed=seed,
        histogram_every_n_steps=0,
        reference_train_examples=reference_examples,
    )
    curve = Curve(dm)
    torch.manual_seed(seed)
    module = MNIST1DCNN(channels=CHANNELS, lr=LR, lr_schedule="cosine")
    start = time.perf_counter()
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[cb, curve]).fit(module, datamodule=dm)
    return {
        "seed": seed,
        "steps": steps,
        "final_acc": curve.points[-1][2],
        "steps_to_target": to_target(curve.points, TARGET_ACC)[0],
        "seconds": round(time.perf_counter() - start, 1),
        **cb.report_rows(),
    }


def median(values):
    """The median seed; a seed that never reached the target counts as infinitely slow (None)."""
    values = sorted(math.inf if v is None else v for v in values)
    half = len(values) // 2
    m = values[half] if len(values) % 2 else (values[half - 1] + values[half]) / 2
    return None if math.isinf(m) else m


def summarize(runs: list[dict], target: float) -> dict:
    """Medians over seeds, on test (``val_*``: the same on validation)."""
    hits = {s: [to_target(r["curve"], target, s) for r in runs] for s in SPLITS}
    out = {
        "final_acc": median([r["curve"][-1][2] for r in runs]),
        "steps_to_target": median([h[0] for h in hits["test"]]),
        "compute_to_target": median([h[1] for h in hits["test"]]),
        "val_final_acc": median([r["curve"][-1][1] for r in runs]),
        "val_steps_to_target": median([h[0] for h in hits["val"]]),
        "val_compute_to_target": median([h[1] for h in hits["val"]]),
        "noisy_fraction_selected": median([r["noisy_fraction_selected"] for r in runs]),
        "per_seed": [
            {
                "final_acc": r["curve"][-1][2],
                "steps_to_target": h[0],
                "compute_to_target": h[1],
                "val_steps_to_target": v[0],
                "noisy_fraction_selected": r["noisy_fraction_selected"],
            }
            for r, h, v in zip(runs, hits["test"], hits["val"])
        ],
    }
    if "keep" in runs[0]:
        out["keep"] = runs[0]["keep"]
    return out


def ratio(a, b):
    return a / b if a and b else None


def seed_run(seed: int, arms: list[str]) -> dict:
    """Every arm of one seed (run in its own process; the arms interleaved so drift hits them alike)."""
    dm = data(seed)
    reference, ref_examples, ref_acc = train_reference(dm, seed)
    runs = {}
    for arm in arms:
        base, _, keep = arm.partition("_keep")
        learnability = base == "learnability"
        runs[arm] = classify_run(
            base, dm, seed, STEPS, reference if learnability else None, float(keep) if keep else KEEP
        )
    jest = jest_seed(dm, seed, JEST_STEPS)
    print(f"seed {seed} done", flush=True)
    return {
        "runs": runs,
        "reference": reference,
        "reference_examples": ref_examples,
        "reference_acc": ref_acc,
        "jest": jest,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/selection.json")
    p.set_defaults(seeds=[1, 2, 3], threads=1)  # small models: one thread is fastest and steadiest here
    p.add_argument("--workers", type=int, default=3, help="seeds run in parallel processes")
    p.add_argument("--pilot", action="store_true", help="uniform arms only, to fix the targets")
    p.add_argument("--search-keep", type=float, nargs="*", default=[], help="extra learnability arms")
    p.add_argument("--callback-steps", type=int, default=STEPS, help="0: skip the Trainer run")
    p.add_argument("--raw", help="also write every accuracy curve to this file")
    args = p.parse_args()
    fair_cpu(args.threads)
    start = time.time()
    if args.pilot:
        pilot(args.seeds)
        print(f"{time.time() - start:.0f} s")
        return
    arms = ["uniform", "hard", "learnability", "uniform_train_plus_holdout"]
    arms += [f"learnability_keep{k}" for k in args.search_keep]
    per_seed = run_all([(seed_run, (seed, arms)) for seed in args.seeds], args.workers, args.threads)
    runs = {arm: [out["runs"][arm] for out in per_seed] for arm in arms}
    refs = [(out["reference_examples"], out["reference_acc"]) for out in per_seed]
    jest_runs = [out["jest"] for out in per_seed]
    first_reference, dm = per_seed[0]["reference"], data(args.seeds[0])
    print(f"{len(args.seeds)} seeds done at {time.time() - start:.0f} s", flush=True)
    if args.raw:  # every accuracy curve, written before any summary
        with open(args.raw, "w") as f:
            json.dump({"runs": runs, "references": refs, "jest": jest_runs}, f)
    learner_macs, reference_macs = macs(CHANNELS), macs(REF_CHANNELS)
    result = {
        "target_acc": TARGET_ACC,
        "noise": NOISE,
        "keep": KEEP,
        "seeds": args.seeds,
        "setup": {
            "num_samples": NUM_SAMPLES,
            "train": len(dm.y_train),
            "holdout": len(dm.y_holdout),
            "val": len(dm.y_val),
            "test": len(dm.y_test),
            "model": f"MNIST1DCNN(channels={CHANNELS})",
            "batch": BATCH,
            "super_batch": round(BATCH / KEEP),
            "steps": STEPS,
            "eval_every": EVAL_EVERY,
            "processes": args.workers,
            "optimizer": "adam",
            "lr": LR,
            "schedule": "cosine",
            "reference": f"MNIST1DCNN(channels={REF_CHANNELS}), {REF_EPOCHS} epochs on the clean holdout",
            "compute_units": "MACs: learner forward = learner_macs, trained example = 3 learner forwards, "
            "reference forward = reference_macs",
            "learner_macs": learner_macs,
            "reference_macs": reference_macs,
        },
    }
    for arm in arms:
        result[arm] = summarize(runs[arm], TARGET_ACC)
    ref_units = [3 * reference_macs * n for n, _ in refs]
    for arm in [a for a in arms if a.startswith("learnability")]:
        learn = result[arm]
        learn["reference_acc"] = median([a["test"] for _, a in refs])
        learn["reference_train_compute"] = ref_units[0]
        learn["compute_to_target_with_reference"] = median(
            [
                h["compute_to_target"] + u if h["compute_to_target"] is not None else None
                for h, u in zip(learn["per_seed"], ref_units)
            ]
        )
    jest = {}
    for arm in ("uniform", "learnability", "jest"):
        jest[arm] = summarize([{"curve": r[arm], "noisy_fraction_selected": None} for r in jest_runs], JEST_TARGET)
        for key in ("compute_to_target", "val_compute_to_target", "noisy_fraction_selected"):
            jest[arm].pop(key)
            for p in jest[arm]["per_seed"]:
                p.pop(key, None)
    jest.update(
        target_retrieval=JEST_TARGET,
        metric="top-1 retrieval among groups of 100 clean test pairs",
        mismatched=NOISE,
        steps=JEST_STEPS,
        reference_retrieval=median([r["reference_retrieval"] for r in jest_runs]),
    )
    result["jest"] = jest
    u, learn, both = result["uniform"], result["learnability"], result["uniform_train_plus_holdout"]
    result["ratios"] = {
        "learnability_steps_speedup": ratio(u["steps_to_target"], learn["steps_to_target"]),
        "learnability_compute_vs_uniform": ratio(learn["compute_to_target"], u["compute_to_target"]),
        "learnability_compute_with_reference_vs_uniform": ratio(
            learn["compute_to_target_with_reference"], u["compute_to_target"]
        ),
        "train_plus_holdout_compute_vs_uniform": ratio(both["compute_to_target"], u["compute_to_target"]),
        "jest_steps_speedup": ratio(jest["uniform"]["steps_to_target"], jest["jest"]["steps_to_target"]),
        **{
            f"{a}_val_steps_speedup": ratio(u["val_steps_to_target"], result[a]["val_steps_to_target"])
            for a in arms
            if a.startswith("learnability")
        },
        **{
            f"{a}_val_compute_vs_uniform": ratio(result[a]["val_compute_to_target"], u["val_compute_to_target"])
            for a in arms
            if a.startswith("learnability")
        },
    }
    if args.callback_steps:
        result["callback_check"] = callback_check(args.seeds[0], first_reference, refs[0][0], args.callback_steps)
        result["callback_check"]["plain_loop_same_seed"] = learn["per_seed"][0]
    write(args.out, result, start)


if __name__ == "__main__":
    main()
