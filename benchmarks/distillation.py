"""Knowledge distillation on MNIST-1D: how much of the teacher-student gap does KD close, and what
does a KD step cost with and without the teacher-output cache.

    flock /tmp/slim_bench.lock python benchmarks/distillation.py --out benchmarks/results/distillation.json

Workload: MNIST-1D, 25,000 examples: 5,000 test, 4,000 validation carved from the training examples
(for choosing the KD setting with ``--grid``; not yet run at these settings), and 4,000 training
examples (the MNIST-1D paper's training-set size): the data, not the student's capacity, limits the
student. Per seed (paired: the same data, student initialisation and batch order for every student
of a seed) the teacher (MNIST1DTeacherCNN, 106k params) is trained once; the student (the paper's
5.2k-param MNIST1DCNN, 1/20 of the teacher) is trained alone, with logit KD (Hinton: ``--alpha`` 0.9
and ``--temperature`` 8, fixed in advance, not yet searched on validation; weighted convention;
teacher outputs cached) and with feature KD alone (its last conv block regressed onto the teacher's
through a learned 1x1 projection, MSE, no soft targets). All: Adam lr 1e-2, cosine decay to zero,
batch 100. ``full_data`` repeats teacher / student / KD on all 16,000 training examples (the
data-rich reference row). ``--grid A:T ...`` adds KD students for each setting (the validation
search). Timing: median step time of plain / KD (no cache) / KD (warm cache), interleaved in one
process.
"""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
from common import ValidatedMNIST1D, accuracy, fair_cpu, mean, parser, quiet_trainer, run_all, step_timer, write

from lightning_slim import KnowledgeDistillation
from lightning_slim.demos.models import MNIST1DCNN, MNIST1DTeacherCNN
from lightning_slim.reporting.measure import count_parameters

REGIMES = {"data_limited": 4000, "full_data": None}  # training examples (None: all 16,000)


def data(args, seed: int, regime: str) -> ValidatedMNIST1D:
    return ValidatedMNIST1D(
        num_samples=args.num_samples,
        val_examples=args.val_examples,
        train_examples=REGIMES[regime],
        batch_size=100,
        seed=seed,
        with_index=True,
    )


def train(model, data, steps, callbacks=()):
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=list(callbacks)).fit(model, datamodule=data)
    return model


def accuracies(model, data) -> dict:
    return {split: accuracy(model, *data.split(split)) for split in ("val", "test")}


def student(seed: int) -> MNIST1DCNN:
    pl.seed_everything(seed, verbose=False)  # same initialisation for every student of this seed
    return MNIST1DCNN(lr=1e-2, lr_schedule="cosine")


def teacher_job(args, seed: int, regime: str) -> tuple[dict, dict]:
    pl.seed_everything(1000 + seed, verbose=False)
    dm = data(args, seed, regime)
    teacher = train(MNIST1DTeacherCNN(lr=1e-2, lr_schedule="cosine"), dm, args.teacher_steps)
    return teacher.state_dict(), accuracies(teacher, dm)


def load_teacher(state: dict) -> MNIST1DTeacherCNN:
    teacher = MNIST1DTeacherCNN()
    teacher.load_state_dict(state)
    return teacher.eval()


def student_job(args, seed: int, regime: str, teacher_state: dict | None, kd: dict | None) -> dict:
    """A student of ``seed``: alone (``kd=None``) or with ``KnowledgeDistillation(**kd)`` (cached)."""
    dm = data(args, seed, regime)
    callbacks = (
        [] if kd is None else [KnowledgeDistillation(teacher=load_teacher(teacher_state), cache_teacher=True, **kd)]
    )
    return accuracies(train(student(seed), dm, args.student_steps, callbacks), dm)


def step_times(args, teacher, dm) -> dict:
    """Median step time per configuration, the configurations interleaved round by round."""
    kd_args = dict(alpha=args.alpha, temperature=args.temperature)
    cached = KnowledgeDistillation(teacher=teacher, cache_teacher=True, **kd_args)
    configs = {
        "plain": lambda: [],
        "kd": lambda: [KnowledgeDistillation(teacher=teacher, **kd_args)],
        "kd_cached": lambda: [cached],
    }
    quiet_trainer(max_epochs=1, limit_train_batches=args.timing_batches, limit_val_batches=0, callbacks=[cached]).fit(
        student(0), datamodule=dm
    )  # fill the cache for the batches timed below
    times = {k: [] for k in configs}
    for _ in range(args.timing_rounds):
        for name, make in configs.items():
            timer = step_timer(skip_first=5)  # the first steps warm up
            quiet_trainer(
                max_epochs=1, limit_train_batches=args.timing_batches, limit_val_batches=0, callbacks=[*make(), timer]
            ).fit(student(0), datamodule=dm)
            times[name] += timer.times
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "step_ms": {k: round(1000 * v, 3) for k, v in med.items()},
        "step_time_ratio": {"no_cache": med["kd"] / med["plain"], "cache": med["kd_cached"] / med["plain"]},
        "cache_mb": round(cached.cache.nbytes / 2**20, 3),
    }


def summarize(teachers, alone, kd) -> dict:
    """Seed means and the fraction of the teacher-student gap KD closed (of the means, and per seed)."""
    out = {}
    for key, runs in (("teacher", teachers), ("student", alone), ("kd", kd)):
        out[f"{key}_acc"] = mean(r["test"] for r in runs)
        out[f"{key}_val_acc"] = mean(r["val"] for r in runs)
        out[f"{key}_acc_per_seed"] = [r["test"] for r in runs]
    out["gap"] = out["teacher_acc"] - out["student_acc"]
    out["gap_closed"] = (out["kd_acc"] - out["student_acc"]) / out["gap"]
    out["gap_closed_per_seed"] = [
        (k["test"] - s["test"]) / (t["test"] - s["test"]) for t, s, k in zip(teachers, alone, kd)
    ]
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/distillation.json")
    p.set_defaults(threads=1)  # one thread per process: two OpenMP threads stalled whenever a core was busy
    p.add_argument("--workers", type=int, default=2, help="trainings run in parallel (timings run alone)")
    p.add_argument("--num-samples", type=int, default=25000)
    p.add_argument("--val-examples", type=int, default=4000)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--student-steps", type=int, default=4000)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=8.0)  # fixed in advance; --grid searches on validation
    p.add_argument(
        "--grid",
        nargs="*",
        default=["0.9:4"],
        metavar="ALPHA:T",
        help="extra KD settings: the validation search; by default the literature's T=4 beside the choice",
    )
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--no-feature-kd", action="store_true")
    p.add_argument("--timing-batches", type=int, default=40)
    p.add_argument("--timing-rounds", type=int, default=5)
    args = p.parse_args()
    fair_cpu(args.threads)
    started, seeds = time.time(), args.seeds
    teachers = dict(
        zip(
            [(r, s) for r in args.regimes for s in seeds],
            run_all([(teacher_job, (args, s, r)) for r in args.regimes for s in seeds], args.workers, args.threads),
        )
    )
    print({k: v[1] for k, v in teachers.items()}, f"{time.time() - started:.0f}s", flush=True)

    chosen = {"alpha": args.alpha, "temperature": args.temperature}
    variants = {"alone": None, "kd": chosen}
    if not args.no_feature_kd:
        variants["feature_kd"] = {"alpha": 0.0, "features": {"pairs": {"net.5": "net.8"}}}
    variants.update(
        {f"kd_a{a}_T{t}": {"alpha": float(a), "temperature": float(t)} for a, t in (g.split(":") for g in args.grid)}
    )
    plan = [
        ((r, name, s), (student_job, (args, s, r, teachers[(r, s)][0], kd)))
        for r in args.regimes
        for name, kd in variants.items()
        if r == args.regimes[0] or name in ("alone", "kd")
        for s in seeds
    ]
    got = dict(zip([k for k, _ in plan], run_all([j for _, j in plan], args.workers, args.threads)))
    runs = lambda r, name: [got[(r, name, s)] for s in seeds]

    results: dict = {
        "config": {
            **vars(args),
            "regimes": {r: REGIMES[r] for r in args.regimes},
            "batch_size": 100,
            "optimizer": "adam lr 1e-2 cosine",
            "kd": chosen,
        }
    }
    for r in args.regimes:
        res = summarize([teachers[(r, s)][1] for s in seeds], runs(r, "alone"), runs(r, "kd"))
        if r == args.regimes[0]:
            results.update(res)
            results["training_examples"] = REGIMES[r] or 16000
            for name in variants:
                if name not in ("alone", "kd"):
                    results[name] = {
                        "acc": mean(x["test"] for x in runs(r, name)),
                        "val_acc": mean(x["val"] for x in runs(r, name)),
                        "acc_per_seed": [x["test"] for x in runs(r, name)],
                    }
        else:
            results[r] = res
    if "feature_kd" in variants:
        results["feature_kd_acc"] = results["feature_kd"]["acc"]
        results["feature_gap_closed"] = (results["feature_kd_acc"] - results["student_acc"]) / results["gap"]
    results["student_params"] = count_parameters(student(0))
    results["teacher_params"] = count_parameters(MNIST1DTeacherCNN())
    results["param_ratio"] = results["student_params"] / results["teacher_params"]
    first = args.regimes[0]
    results.update(step_times(args, load_teacher(teachers[(first, seeds[0])][0]), data(args, seeds[0], first)))
    results["training_processes"] = args.workers
    write(args.out, results, started)


if __name__ == "__main__":
    main()
