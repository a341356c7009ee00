"""Knowledge distillation on MNIST-1D: how much of the teacher-student gap does KD close, and what
does a KD step cost with and without the teacher-output cache.

Per seed (paired: the same data split, student initialisation and batch order for every method):
the teacher (MNIST1DTeacherCNN, 106k params) is trained once; the student (the paper's 5.2k-param
MNIST1DCNN) is trained alone, with logit KD (Hinton: T=4, alpha=0.9, the literature's default,
weighted convention), and with feature KD alone (the student's last conv block regressed onto the
teacher's through a learned 1x1 projection, MSE, no soft targets). All runs: Adam lr 1e-2, cosine
decay to zero, batch 100. KD runs use the cache (the teacher runs once per example). Timing:
median step time of plain / KD (no cache) / KD (warm cache) fits, interleaved in one process.

    flock /tmp/slim_bench.lock python benchmarks/distillation.py --out benchmarks/results/distillation.json
"""
from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch

from common import fair_cpu, parser, quiet_trainer, write
from lightning_slim import KnowledgeDistillation
from lightning_slim.data import MNIST1DDataModule
from lightning_slim.measure import count_parameters
from lightning_slim.models import MNIST1DCNN, MNIST1DTeacherCNN


@torch.inference_mode()
def accuracy(model, data) -> float:
    model.eval()
    logits = torch.cat([model(x) for x in data.x_test.split(1000)])
    return float((logits.argmax(-1) == data.y_test).float().mean())


def train(model, data, epochs, callbacks=()):
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(model, datamodule=data)
    return model


def student(seed):
    pl.seed_everything(seed, verbose=False)  # same initialisation for every student of this seed
    return MNIST1DCNN(lr=1e-2, lr_schedule="cosine")


class StepTimer(pl.Callback):
    def __init__(self):
        self.times, self._t = [], 0.0

    def on_train_batch_start(self, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self._t)


def step_times(teacher, data, batches: int, rounds: int) -> dict:
    """Median step time per configuration, the configurations interleaved round by round."""
    cached = KnowledgeDistillation(teacher=teacher, alpha=0.9, temperature=4.0, cache_teacher=True)
    configs = {"plain": lambda: [], "kd": lambda: [KnowledgeDistillation(teacher=teacher, alpha=0.9, temperature=4.0)],
               "kd_cached": lambda: [cached]}
    quiet_trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=0, callbacks=[cached]).fit(
        student(0), datamodule=data)  # fill the cache for the batches timed below
    times = {k: [] for k in configs}
    for _ in range(rounds):
        for name, make in configs.items():
            timer = StepTimer()
            trainer = quiet_trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
                                    callbacks=[*make(), timer])
            trainer.fit(student(0), datamodule=data)
            times[name] += timer.times[5:]  # the first steps warm up
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"step_ms": {k: round(1000 * v, 3) for k, v in med.items()},
            "step_time_ratio": {"no_cache": med["kd"] / med["plain"], "cache": med["kd_cached"] / med["plain"]}}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/distillation.json")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--student-epochs", type=int, default=25)
    # one thread: on this shared 2-core machine two OpenMP threads made a 4 ms step take 100-300 ms
    # whenever another process held a core (measured); one thread is stable
    p.set_defaults(threads=1)
    p.add_argument("--timing-batches", type=int, default=40)
    p.add_argument("--timing-rounds", type=int, default=5)
    args = p.parse_args()
    fair_cpu(args.threads)
    started = time.time()
    runs = {k: [] for k in ("teacher_acc", "student_acc", "kd_acc", "feature_kd_acc")}
    timing = None
    for seed in args.seeds:
        data = MNIST1DDataModule(num_samples=args.num_samples, batch_size=100, seed=seed, with_index=True)
        data.setup()
        pl.seed_everything(1000 + seed, verbose=False)
        teacher = train(MNIST1DTeacherCNN(lr=1e-2, lr_schedule="cosine"), data, args.teacher_epochs)
        runs["teacher_acc"].append(accuracy(teacher, data))
        runs["student_acc"].append(accuracy(train(student(seed), data, args.student_epochs), data))
        kd = KnowledgeDistillation(teacher=teacher, alpha=0.9, temperature=4.0, cache_teacher=True)
        runs["kd_acc"].append(accuracy(train(student(seed), data, args.student_epochs, [kd]), data))
        fkd = KnowledgeDistillation(teacher=teacher, alpha=0.0, feature_pairs={"net.5": "net.8"}, cache_teacher=True)
        runs["feature_kd_acc"].append(accuracy(train(student(seed), data, args.student_epochs, [fkd]), data))
        print({k: v[-1] for k, v in runs.items()}, f"{time.time() - started:.0f}s", flush=True)
        if timing is None:
            timing = step_times(teacher, data, args.timing_batches, args.timing_rounds)
            timing["cache_mb"] = round(kd.cache.nbytes / 2 ** 20, 3)
            timing["feature_cache_mb"] = round(fkd.cache.nbytes / 2 ** 20, 3)
    mean = {k: statistics.mean(v) for k, v in runs.items()}
    gaps = [(k - s) / (t - s) for t, s, k in zip(runs["teacher_acc"], runs["student_acc"], runs["kd_acc"])]
    feature_gaps = [(k - s) / (t - s) for t, s, k in
                    zip(runs["teacher_acc"], runs["student_acc"], runs["feature_kd_acc"])]
    results = {
        "config": {"num_samples": args.num_samples, "teacher_epochs": args.teacher_epochs,
                   "student_epochs": args.student_epochs, "seeds": args.seeds, "alpha": 0.9, "temperature": 4.0,
                   "batch_size": 100, "optimizer": "adam lr 1e-2 cosine", "test_examples": len(data.y_test)},
        **mean,
        "per_seed": runs,
        "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in runs.items()},
        "student_params": count_parameters(student(0)), "teacher_params": count_parameters(teacher),
        "gap_closed": (mean["kd_acc"] - mean["student_acc"]) / (mean["teacher_acc"] - mean["student_acc"]),
        "gap_closed_per_seed": gaps,
        "feature_gap_closed": (mean["feature_kd_acc"] - mean["student_acc"]) / (mean["teacher_acc"] - mean["student_acc"]),
        "feature_gap_closed_per_seed": feature_gaps,
        **timing,
    }
    results["param_ratio"] = results["student_params"] / results["teacher_params"]
    write(args.out, results, started)


if __name__ == "__main__":
    main()
