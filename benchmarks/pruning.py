"""Benchmark IterativeMagnitudePruning on MNIST-1D with plain Lightning Trainers.

    flock /tmp/slim_bench.lock python benchmarks/pruning.py --out benchmarks/results/pruning.json

Workload (DESIGN.md "Benchmarks"): MNIST-1D, 25,000 examples: 5,000 test, 4,000 validation carved
from the training examples, 16,000 train; paired across methods (the same split for every seed);
3 seeds; Adam lr 1e-2 with a cosine decay over one training of ``--round-steps`` steps (batch 128).
The over-parameterised network is a 128-channel CNN (105k weights); the paper's 25-channel CNN (5k
weights) is the capacity-limited reference row. Sparsity is over every Conv/Linear weight,
classifier included, ranked globally by magnitude.

- ``dense_acc``: the dense network after one training (IMP's round 0).
- ``imp``: lottery-ticket IMP, ``--rate`` of the remaining weights per round for ``--rounds``
  rounds; every round rewinds weights, Adam state and the LR schedule to step ``--rewind-step``
  (Frankle et al. 2020) and trains back to the end of the schedule. 46% per round (5 rounds to
  95.4%) instead of the lottery-ticket papers' 20% (14 rounds): one round of the 128-channel CNN
  costs about 100 s of a core here, and 14 rounds x 3 seeds do not fit the 20-minute budget.
- ``gradual``: Zhu & Gupta's cubic schedule, one training of the same length as the dense one per
  final sparsity, pruning every 50 steps from step 0 to 70% of the training, then fine-tuning
  (the recipe we recommend for high sparsity: one training instead of one per round).
- ``random_reinit_acc``: IMP's final masks on freshly initialised weights, trained as long.
- ``structured``: 40% of the Conv channels removed (torch-pruning) a quarter into training, against
  the dense network trained as long; MACs, CPU latency (batch 256, interleaved, medians), accuracy.
  40% rather than the recipe's 30%: 30% removes 2.0x of the MACs but measured 1.7x of the latency.
- ``overhead``: median training-step time with 90% masks active over dense step time, for this
  callback and for Lightning's ``ModelPruning``, interleaved in one process.
- ``small_cnn``: ``dense_acc``, ``imp`` and ``gradual`` for the paper's CNN (capacity-limited).

Settings: the validation pilot (seed 0 only, gradual and structured arms, validation split) is
in the pruning method card; every other setting was fixed before any run at these settings.
Accuracies (``acc``) are on the test split; ``val_acc`` beside them is the validation split.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from common import (
    ValidatedMNIST1D,
    accuracy,
    fair_cpu,
    mean,
    parser,
    quiet_trainer,
    run_all,
    steady_allocator,
    step_timer,
    write,
)

from lightning_slim.demos.models import MNIST1DCNN
from lightning_slim.pruning import IterativeMagnitudePruning
from lightning_slim.pruning import functional as PF
from lightning_slim.pruning.structured import restructure, structure_of
from lightning_slim.reporting.measure import count_macs, count_parameters, cpu_latency_ms

warnings.filterwarnings("ignore")  # Lightning's advice about workers / logging intervals


class RoundCNN(MNIST1DCNN):
    """The reference CNN with Adam and a cosine learning rate over one training of ``round_steps``.
    Rewinding restores the scheduler too, so every IMP round ends at the end of the same schedule."""

    def __init__(self, round_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.round_steps = round_steps

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        total = self.round_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Evaluate(pl.Callback):
    """Sparsity and validation / test accuracy after the optimizer steps in ``at_steps`` (the ends of
    the IMP rounds: the next step's start prunes)."""

    def __init__(self, data: ValidatedMNIST1D, at_steps):
        self.data, self.at_steps, self.rows = data, set(at_steps), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.at_steps:
            weights = {n: m.weight for n, m in PF.select_layers(pl_module).items()}
            self.rows.append(
                {
                    "step": trainer.global_step,
                    "sparsity": round(PF.global_sparsity(weights), 4),
                    **{f"{s}_acc": accuracy(pl_module, *self.data.split(s)) for s in ("val", "test")},
                }
            )


def data(args, seed: int) -> ValidatedMNIST1D:
    # the same split for every seed and method (paired); the seed moves initialisation and batch order
    return ValidatedMNIST1D(
        num_samples=args.num_samples,
        val_examples=args.val_examples,
        data_seed=42,
        batch_size=args.batch_size,
        seed=seed,
    )


def fit(args, seed: int, channels: int, steps: int, callbacks, at=(), init_seed: int | None = None) -> list[dict]:
    """Train ``RoundCNN(channels)`` for ``steps`` with ``callbacks``; the Evaluate rows at ``at`` and the end."""
    pl.seed_everything(seed if init_seed is None else init_seed, verbose=False)
    model = RoundCNN(round_steps=args.round_steps, channels=channels, lr=args.lr)
    dm = data(args, seed)
    evaluate = Evaluate(dm, [*at, steps])
    quiet_trainer(max_steps=steps, limit_val_batches=0, deterministic=True, callbacks=[evaluate, *callbacks]).fit(
        model, datamodule=dm
    )
    return evaluate.rows


def imp_schedule(args) -> dict:
    # round 0 trains round_steps; each later round rewinds to rewind_step and trains back to round_steps
    every = args.round_steps - args.rewind_step
    return {
        "kind": "imp",
        "rounds": args.rounds,
        "rate": args.rate,
        "every": every,
        "start": args.rewind_step,
        "unit": "step",
    }


def imp_run(args, seed: int, channels: int) -> tuple[list[dict], dict]:
    cb = IterativeMagnitudePruning(
        imp_schedule(args), scope="global", rewind="step" if args.rewind_step else "init", rewind_step=args.rewind_step
    )
    steps = args.round_steps + args.rounds * (args.round_steps - args.rewind_step)
    rows = fit(args, seed, channels, steps, [cb], at=[t for t, _ in cb.events])
    return rows, {k: v.clone() for k, v in cb.masks.items()}


def gradual_schedule(args, final_sparsity: float) -> dict:
    if args.gradual_unit == "epoch":  # as in callbacks/pruning.yaml: one event per epoch
        epochs = args.round_steps * args.batch_size // (args.num_samples * 4 // 5 - args.val_examples)
        return {
            "kind": "gradual",
            "final_sparsity": final_sparsity,
            "start": 0,
            "end": round(args.gradual_end * epochs),
            "every": 1,
            "unit": "epoch",
        }
    return {
        "kind": "gradual",
        "final_sparsity": final_sparsity,
        "start": 0,
        "end": int(args.gradual_end * args.round_steps),
        "every": args.gradual_every,
        "unit": "step",
    }


def gradual_run(args, seed: int, channels: int, final_sparsity: float) -> dict:
    cb = IterativeMagnitudePruning(gradual_schedule(args, final_sparsity), scope="global")
    return fit(args, seed, channels, args.round_steps, [cb])[-1]


def reinit_run(args, seed: int, masks: dict, sparsity: float) -> dict:
    """The winning ticket's masks on fresh weights (another initialisation seed), trained one round."""
    cb = IterativeMagnitudePruning({"kind": "one_shot", "sparsity": sparsity, "at": 0, "unit": "step"})
    cb.load_state_dict({**cb.state_dict(), "masks": masks, "events_done": 1})  # enforce these masks, prune no more
    return fit(args, seed, args.channels, args.round_steps, [cb], init_seed=seed + 1000)[-1]


def structured_run(args, seed: int, prune: bool) -> tuple[dict, dict, dict]:
    callbacks = []
    if prune:
        callbacks.append(
            IterativeMagnitudePruning(
                {
                    "kind": "one_shot",
                    "sparsity": args.channel_ratio,
                    "unit": "step",
                    "at": int(args.structured_at * args.round_steps),
                },
                pattern="channels",
                targets=["Conv1d"],
                scope="layer",
            )
        )
    pl.seed_everything(seed, verbose=False)
    model = RoundCNN(round_steps=args.round_steps, channels=args.channels, lr=args.lr)
    dm = data(args, seed)
    quiet_trainer(max_steps=args.round_steps, limit_val_batches=0, deterministic=True, callbacks=callbacks).fit(
        model, datamodule=dm
    )
    accs = {f"{s}_acc": accuracy(model, *dm.split(s)) for s in ("val", "test")}
    return accs, model.cpu().state_dict(), structure_of(model)


def rebuild(args, state: dict, structure: dict) -> torch.nn.Module:
    model = MNIST1DCNN(channels=args.channels)
    restructure(model, structure)
    model.load_state_dict(state)
    return model.eval()


def curve(per_seed: list[list[dict]]) -> list[dict]:
    """Seed means per round of the Evaluate rows (test ``acc``, ``val_acc``), per-seed test accuracy."""
    return [
        {
            "round": r,
            "sparsity": rows[0]["sparsity"],
            "acc": mean(x["test_acc"] for x in rows),
            "val_acc": mean(x["val_acc"] for x in rows),
            "acc_per_seed": [x["test_acc"] for x in rows],
        }
        for r, rows in enumerate(zip(*per_seed))
    ]


def summary(rows: list[dict], sparsities) -> list[dict]:
    return [
        {
            "round": i,
            "sparsity": s,
            "acc": mean(x["test_acc"] for x in r),
            "val_acc": mean(x["val_acc"] for x in r),
            "reached_sparsity": mean(x["sparsity"] for x in r),
            "acc_per_seed": [x["test_acc"] for x in r],
        }
        for i, (s, r) in enumerate(zip(sparsities, rows))
    ]


def overhead(args) -> dict:
    from lightning.pytorch.callbacks import ModelPruning

    def callbacks(method, model):
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
        if method == "slim":  # 90% masks from the start (every timed step is masked)
            return [IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.9, "at": 0})]
        if method == "lightning_modelpruning":  # prunes 90% at the end of epoch 0, masks live in epoch 1
            return [
                ModelPruning(
                    "l1_unstructured",
                    parameters_to_prune=[(m, "weight") for m in layers],
                    amount=0.9,
                    apply_pruning=lambda epoch: epoch == 0,
                    use_lottery_ticket_hypothesis=False,
                    verbose=0,
                )
            ]
        return []

    times = {"dense": [], "slim": [], "lightning_modelpruning": []}
    order = list(times)
    for rep in range(args.overhead_reps):
        for method in order[rep % 3 :] + order[: rep % 3]:  # rotate so no method always runs first
            pl.seed_everything(rep, verbose=False)
            model = MNIST1DCNN(channels=args.channels, lr=args.lr)
            timer = step_timer(skip_first=args.overhead_steps + 2)  # time epoch 1 only
            t = quiet_trainer(
                max_epochs=2,
                limit_train_batches=args.overhead_steps,
                limit_val_batches=0,
                callbacks=[timer, *callbacks(method, model)],
            )
            t.fit(model, datamodule=data(args, rep))
            times[method] += timer.times
    dense = statistics.median(times["dense"])
    return {
        "slim": statistics.median(times["slim"]) / dense,
        "lightning_modelpruning": statistics.median(times["lightning_modelpruning"]) / dense,
        "dense_step_ms": 1000 * dense,
        "steps_timed_per_method": len(times["dense"]),
    }


def structured_summary(args, dense_runs, pruned_runs) -> dict:
    dense, pruned = [r[0] for r in dense_runs], [r[0] for r in pruned_runs]
    model_d, model_p = rebuild(args, *dense_runs[-1][1:]), rebuild(args, *pruned_runs[-1][1:])
    x = torch.randn(256, 1, 40)
    steady = steady_allocator()
    lat_d, lat_p = [], []
    for _ in range(7):  # interleaved, medians
        lat_d.append(cpu_latency_ms(model_d, x, warmup=3, repeats=10))
        lat_p.append(cpu_latency_ms(model_p, x, warmup=3, repeats=10))
    return {
        "macs_ratio": count_macs(model_d, x[:1]) / count_macs(model_p, x[:1]),
        "latency_speedup": statistics.median(lat_d) / statistics.median(lat_p),
        "acc": mean(p["test_acc"] for p in pruned),
        "dense_acc": mean(p["test_acc"] for p in dense),
        "val_acc": mean(p["val_acc"] for p in pruned),
        "dense_val_acc": mean(p["val_acc"] for p in dense),
        "acc_per_seed": [p["test_acc"] for p in pruned],
        "dense_acc_per_seed": [p["test_acc"] for p in dense],
        "params_ratio": count_parameters(model_d) / count_parameters(model_p),
        "latency_ms": {
            "dense": statistics.median(lat_d),
            "pruned": statistics.median(lat_p),
            "batch": 256,
            "threads": args.threads,
            "steady_allocator": steady,
        },
        "channels": args.channels,
        "channel_ratio": args.channel_ratio,
        "pruned_at_step": int(args.structured_at * args.round_steps),
    }


def main() -> None:
    p = parser(__doc__.split("\n")[0], "benchmarks/results/pruning.json")
    p.set_defaults(threads=1)  # per process; 1 avoids thread spin on a shared machine
    p.add_argument("--workers", type=int, default=2, help="trainings run in parallel (timings run alone)")
    p.add_argument(
        "--arms",
        nargs="+",
        default=["imp", "gradual", "structured", "small", "overhead"],
        help="what to run (the random re-init control runs with imp; small: the paper CNN's rows)",
    )
    p.add_argument("--num-samples", type=int, default=25000)
    p.add_argument("--val-examples", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--small-channels", type=int, default=25)
    p.add_argument("--round-steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rate", type=float, default=0.46)
    p.add_argument("--rewind-step", type=int, default=200, help="0: rewind to initialisation")
    p.add_argument("--gradual-sparsities", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--gradual-end", type=float, default=0.7, help="fraction of the training")
    p.add_argument("--gradual-every", type=int, default=50, help="steps between pruning events (unit step)")
    p.add_argument("--gradual-unit", choices=["step", "epoch"], default="step")
    p.add_argument("--channel-ratio", type=float, default=0.4)
    p.add_argument("--structured-at", type=float, default=0.25, help="fraction of the training")
    p.add_argument("--overhead-reps", type=int, default=4)
    p.add_argument("--overhead-steps", type=int, default=100)
    args = p.parse_args()
    started = time.time()
    fair_cpu(args.threads)
    arms, seeds = set(args.arms), args.seeds
    nets = {"main": args.channels, **({"small": args.small_channels} if "small" in arms else {})}
    plan = []  # (what, job): every training in one pool, the longest (IMP) first
    for name, c in nets.items():
        plan += [((name, "imp"), (imp_run, (args, s, c))) for s in seeds if "imp" in arms]
    for name, c in nets.items():
        plan += [
            ((name, f), (gradual_run, (args, s, c, f)))
            for f in args.gradual_sparsities
            for s in seeds
            if "gradual" in arms
        ]
    plan += [
        (("structured", prune), (structured_run, (args, s, prune)))
        for s in seeds
        for prune in (False, True)
        if "structured" in arms
    ]
    got: dict = {}
    for (what, _), output in zip(plan, run_all([job for _, job in plan], args.workers, args.threads)):
        got.setdefault(what, []).append(output)

    results: dict = {
        "config": vars(args),
        "channels": args.channels,
        "imp_schedule": imp_schedule(args),
        "gradual_schedule": gradual_schedule(args, args.gradual_sparsities[-1]),
    }
    for name, channels in nets.items():
        res = (
            results
            if name == "main"
            else results.setdefault(
                "small_cnn", {"channels": channels, "note": "the paper's CNN: capacity-limited reference row"}
            )
        )
        if "imp" in arms:
            res["imp"] = curve([rows for rows, _ in got[(name, "imp")]])
            res["dense_acc"], res["dense_val_acc"] = res["imp"][0]["acc"], res["imp"][0]["val_acc"]
        if "gradual" in arms:
            res["gradual"] = summary([got[(name, f)] for f in args.gradual_sparsities], args.gradual_sparsities)
    print(
        {k: results.get(k) for k in ("dense_acc", "imp", "gradual", "small_cnn")},
        f"{time.time() - started:.0f}s",
        flush=True,
    )

    if "imp" in arms:
        final, masks = results["imp"][-1], [m for _, m in got[("main", "imp")]]
        results["imp_layer_sparsity"] = {  # where global ranking put the zeros (seed 0's final masks)
            n: round(1 - m.float().mean().item(), 4) for n, m in masks[0].items()
        }
        reinit = run_all(
            [(reinit_run, (args, s, m, final["sparsity"])) for s, m in zip(seeds, masks)], args.workers, args.threads
        )
        results["random_reinit_acc"] = mean(r["test_acc"] for r in reinit)
        results["random_reinit"] = {
            "sparsity": final["sparsity"],
            "acc_per_seed": [r["test_acc"] for r in reinit],
            "val_acc": mean(r["val_acc"] for r in reinit),
            "winning_ticket_acc": final["acc"],
        }
        print("reinit", results["random_reinit"], f"{time.time() - started:.0f}s", flush=True)
    if "structured" in arms:
        results["structured"] = structured_summary(args, got[("structured", False)], got[("structured", True)])
        print("structured", results["structured"], f"{time.time() - started:.0f}s", flush=True)
    if "overhead" in arms:
        results["overhead"] = overhead(args)
    results["training_processes"] = args.workers
    write(args.out, results, started)


if __name__ == "__main__":
    main()
