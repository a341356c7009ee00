"""Benchmark IterativeMagnitudePruning on MNIST-1D with plain Lightning Trainers.

    flock /tmp/slim_bench.lock python benchmarks/pruning.py --out benchmarks/results/pruning.json

Measures (DESIGN.md "Benchmarks": fixed threads, flushed denormals, paired splits, 3 seeds,
a 4000-example test split, a decaying learning rate, interleaved timing, medians):

- ``imp``: lottery-ticket IMP on a 64-channel CNN, 4 rounds of 53.6% (to 53.6 / 78.5 / 90.0 /
  95.4% sparsity over every Conv/Linear weight, classifier included), rewinding weights, Adam
  state and the per-round cosine schedule to step ``--rewind-step`` (Frankle et al. 2020);
  ``imp_rewind_init`` the same rewinding to step 0; round 0 is the dense network (``dense_acc``)
  trained with the same per-round budget.
- ``random_reinit_acc``: the final masks on freshly initialised weights, trained one round.
- ``structured``: a 128-channel CNN, 30% of Conv channels removed (torch-pruning) halfway through
  training, against the dense network trained as long; MACs, CPU latency (batch 256), accuracy.
- ``overhead``: median training-step time with 90% masks active over dense step time, for this
  callback and for Lightning's ``ModelPruning``, interleaved in one process.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_slim.data import MNIST1DDataModule
from lightning_slim.measure import count_macs, count_parameters, cpu_latency_ms
from lightning_slim.models import MNIST1DCNN
from lightning_slim.pruning import IterativeMagnitudePruning
from lightning_slim.pruning.structured import restructure, structure_of

warnings.filterwarnings("ignore")  # Lightning's advice about workers / logging intervals


class RoundCNN(MNIST1DCNN):
    """The reference CNN with Adam and a cosine learning rate over one IMP round (``round_steps``).
    Rewinding restores the scheduler, so every round replays the same decaying schedule."""

    def __init__(self, round_steps: int = 500, **kwargs):
        super().__init__(**kwargs)
        self.round_steps = round_steps

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        total = self.round_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(**kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, num_sanity_val_steps=0, deterministic=True)
    args.update(kwargs)
    return pl.Trainer(**args)


def data(args, seed: int) -> MNIST1DDataModule:
    # the same 16k/4k split for every seed and method (paired); the seed moves init and shuffling
    return MNIST1DDataModule(num_samples=args.num_samples, data_seed=42, batch_size=args.batch_size, seed=seed)


def imp_run(args, seed: int, rewind_step: int) -> tuple[list[list], dict]:
    pl.seed_everything(seed, verbose=False)
    dm = data(args, seed)
    steps_per_epoch = math.ceil(args.num_samples * 0.8 / args.batch_size)
    round_steps = args.round_epochs * steps_per_epoch
    model = RoundCNN(round_steps=round_steps + rewind_step, channels=args.imp_channels, lr=args.lr)
    cb = IterativeMagnitudePruning(
        {"kind": "imp", "rounds": args.rounds, "final_sparsity": 1 - 0.1 ** (args.rounds / 3),
         "every": args.round_epochs, "unit": "epoch"}, scope="global", rewind="step" if rewind_step else "init",
        rewind_step=rewind_step)
    trainer(max_epochs=(args.rounds + 1) * args.round_epochs, callbacks=[cb]).fit(model, datamodule=dm)
    return cb.curve, {k: v.clone() for k, v in cb.masks.items()}


def reinit_run(args, seed: int, masks: dict, sparsity: float) -> float:
    pl.seed_everything(seed + 1000, verbose=False)  # fresh weights, same masks, same data order
    steps_per_epoch = math.ceil(args.num_samples * 0.8 / args.batch_size)
    model = RoundCNN(round_steps=args.round_epochs * steps_per_epoch, channels=args.imp_channels, lr=args.lr)
    cb = IterativeMagnitudePruning({"kind": "one_shot", "sparsity": sparsity, "at": 0})
    cb.load_state_dict({**cb.state_dict(), "masks": masks, "events_done": 1})  # enforce these masks, prune no more
    t = trainer(max_epochs=args.round_epochs, callbacks=[cb])
    t.fit(model, datamodule=data(args, seed))
    return float(t.callback_metrics["val/acc"])


def structured_run(args, seed: int, prune: bool) -> tuple[float, dict, dict]:
    pl.seed_everything(seed, verbose=False)
    model = MNIST1DCNN(channels=args.wide_channels, lr=args.lr, lr_schedule="cosine")
    callbacks = []
    if prune:
        callbacks.append(IterativeMagnitudePruning(
            {"kind": "one_shot", "sparsity": args.channel_ratio, "at": args.structured_epochs // 2},
            structured=True, targets=["Conv1d"], scope="layer"))
    t = trainer(max_epochs=args.structured_epochs, callbacks=callbacks)
    t.fit(model, datamodule=data(args, seed))
    return float(t.callback_metrics["val/acc"]), model.cpu().state_dict(), structure_of(model)


def rebuild(args, state: dict, structure: dict) -> torch.nn.Module:
    model = MNIST1DCNN(channels=args.wide_channels)
    restructure(model, structure)
    model.load_state_dict(state)
    return model.eval()


def _init_worker(threads: int) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")


def _call(job):
    fn, job_args = job
    return fn(*job_args)


def run_all(args, jobs: list) -> list:
    """Independent trainings in ``args.workers`` processes of ``args.threads`` threads (results in order)."""
    if args.workers <= 1:
        return [_call(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.threads,)) as pool:
        return pool.map(_call, jobs, chunksize=1)


class StepTimer(pl.Callback):
    """Wall time between consecutive batch starts (everything the loop does per step) in epoch 1."""

    def __init__(self):
        self.times, self._last = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if trainer.current_epoch == 1 and self._last is not None and batch_idx > 1:
            self.times.append(now - self._last)
        self._last = now


def overhead(args) -> dict:
    from lightning.pytorch.callbacks import ModelPruning

    def callbacks(method, model):
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
        if method == "slim":  # 90% masks from the start of epoch 1 (timed)
            return [IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.9, "at": 1})]
        if method == "lightning_modelpruning":  # prunes 90% at the end of epoch 0, masks live in epoch 1
            return [ModelPruning("l1_unstructured", parameters_to_prune=[(m, "weight") for m in layers],
                                 amount=0.9, apply_pruning=lambda epoch: epoch == 0,
                                 use_lottery_ticket_hypothesis=False, verbose=0)]
        return []

    times = {"dense": [], "slim": [], "lightning_modelpruning": []}
    order = list(times)
    for rep in range(args.overhead_reps):
        for method in order[rep % 3:] + order[:rep % 3]:  # rotate so no method always runs first
            pl.seed_everything(rep, verbose=False)
            model = MNIST1DCNN(channels=args.imp_channels, lr=args.lr)
            timer = StepTimer()
            t = trainer(max_epochs=2, limit_train_batches=args.overhead_steps, limit_val_batches=0,
                        callbacks=[timer, *callbacks(method, model)])
            t.fit(model, datamodule=data(args, rep))
            times[method] += timer.times
    dense = statistics.median(times["dense"])
    return {"slim": statistics.median(times["slim"]) / dense,
            "lightning_modelpruning": statistics.median(times["lightning_modelpruning"]) / dense,
            "dense_step_ms": 1000 * dense, "steps_timed_per_method": len(times["dense"])}


def mean(xs):
    return sum(xs) / len(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/pruning.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="per process; 1 avoids thread spin on a shared machine")
    p.add_argument("--workers", type=int, default=2, help="trainings run in parallel (timings run alone)")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--imp-channels", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--round-epochs", type=int, default=8)
    p.add_argument("--rewind-step", type=int, default=80)
    p.add_argument("--skip-init-rewind", action="store_true")
    p.add_argument("--wide-channels", type=int, default=128)
    p.add_argument("--channel-ratio", type=float, default=0.3)
    p.add_argument("--structured-epochs", type=int, default=8)
    p.add_argument("--overhead-reps", type=int, default=4)
    p.add_argument("--overhead-steps", type=int, default=100)
    args = p.parse_args()
    started = time.time()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LIGHTNING_SLIM_CACHE", str(Path(__file__).resolve().parents[1] / ".slim_cache"))
    results: dict = {"config": vars(args)}

    variants = [("imp", args.rewind_step)] + ([] if args.skip_init_rewind else [("imp_rewind_init", 0)])
    jobs = [(imp_run, (args, s, k)) for _, k in variants for s in args.seeds]
    jobs += [(structured_run, (args, s, prune)) for s in args.seeds for prune in (False, True)]
    outputs = run_all(args, jobs)
    n = len(args.seeds)
    curves = {label: outputs[i * n:(i + 1) * n] for i, (label, _) in enumerate(variants)}
    for label, per_seed in curves.items():
        results[label] = [{"round": row[0], "sparsity": round(row[1], 4),
                           "acc": mean([c[i][2] for c, _ in per_seed]),
                           "acc_per_seed": [c[i][2] for c, _ in per_seed]}
                          for i, row in enumerate(per_seed[0][0])]
    results["dense_acc"] = results["imp"][0]["acc"]
    print("imp", json.dumps(results["imp"]), f"{time.time() - started:.0f}s", flush=True)

    final = results["imp"][-1]
    results["imp_layer_sparsity"] = {  # where global ranking put the zeros (seed 0's final masks)
        name: round(1 - mask.float().mean().item(), 4) for name, mask in curves["imp"][0][1].items()}
    reinit = run_all(args, [(reinit_run, (args, s, masks, final["sparsity"]))
                            for s, (_, masks) in zip(args.seeds, curves["imp"])])
    results["random_reinit_acc"] = mean(reinit)
    results["random_reinit"] = {"sparsity": final["sparsity"], "acc_per_seed": reinit,
                                "winning_ticket_acc": final["acc"]}
    print("reinit", reinit, f"{time.time() - started:.0f}s", flush=True)

    pairs = outputs[len(variants) * n:]
    dense, pruned = [p[0] for p in pairs[0::2]], [p[0] for p in pairs[1::2]]
    model_d, model_p = rebuild(args, *pairs[-2][1:]), rebuild(args, *pairs[-1][1:])
    torch.set_num_threads(args.threads)
    x = torch.randn(256, 1, 40)
    lat_d, lat_p = [], []
    for _ in range(7):  # interleaved, medians
        lat_d.append(cpu_latency_ms(model_d, x, warmup=3, repeats=10))
        lat_p.append(cpu_latency_ms(model_p, x, warmup=3, repeats=10))
    results["structured"] = {
        "macs_ratio": count_macs(model_d, x[:1]) / count_macs(model_p, x[:1]),
        "latency_speedup": statistics.median(lat_d) / statistics.median(lat_p),
        "acc": mean(pruned), "dense_acc": mean(dense), "acc_per_seed": pruned, "dense_acc_per_seed": dense,
        "params_ratio": count_parameters(model_d) / count_parameters(model_p),
        "latency_ms": {"dense": statistics.median(lat_d), "pruned": statistics.median(lat_p), "batch": 256,
                       "threads": args.threads},
        "channels": args.wide_channels, "channel_ratio": args.channel_ratio}
    print("structured", json.dumps(results["structured"]), f"{time.time() - started:.0f}s", flush=True)

    results["overhead"] = overhead(args)
    results["machine"] = {"cpu_cores": os.cpu_count(), "threads_per_process": args.threads,
                          "training_processes": args.workers, "torch": torch.__version__, "lightning": pl.__version__}
    results["wall_s"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
