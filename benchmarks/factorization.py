"""Benchmark LowRankFactorization on the MNIST-1D CNN and on all-MiniLM-L6-v2.

    python benchmarks/factorization.py --out benchmarks/results/factorization.json
    python benchmarks/factorization.py --arms minilm --smoke     # the plumbing, about a minute

``mnist1d``: the 128-channel MNIST-1D CNN (the pruning benchmark's workload: 25,000 examples, 5,000
test, 4,000 validation carved from the training examples, 16,000 train, the same split for every seed
and arm; Adam 1e-2 with a cosine decay over ``--steps`` steps at batch 128; seeds 0-2). Arms: dense,
and the CNN with its two k=3 convolutions (128 x 384 weights, 97% of the MACs) factorized a quarter into
training (``--at``) at ``rank`` 0.25 / 0.125 of their full rank or at ``energy`` 0.9, then trained to
the end of the same schedule. The 5-tap first convolution (128 x 5) and the classifier (10 x 640) stay
dense (``min_size=16``: their smaller side is 5 and 10). Test and validation accuracy over 3 seeds;
parameters, MACs and the batch-256 CPU latency of seed 0's models, side by side (interleaved medians).

``minilm``: all-MiniLM-L6-v2 with its 36 encoder Linears (query, key, value, attention output, FFN in and
out) factorized to ``energy`` 0.5 / 0.7 / 0.9 of their squared singular values, then fine-tuned for
``--ft-epochs`` epochs with the in-batch contrastive loss it was trained with (``SentenceEncoder``) on the
paragraph pairs of Python's documentation (604 train / 71 validation / 74 test pairs), in a Trainer with
the callback. The dense model fine-tuned the same way is the control. The learning rate of each arm is
chosen from ``--lrs`` on the validation split (mean cosine to the original model); test numbers are
reported. Quality, on the test split's 148 paragraphs: the mean cosine between each paragraph's embedding
and the original model's, the fraction whose nearest neighbour among the test paragraphs is the one the
original model finds, and pair retrieval (each anchor's positive is its nearest positive). Parameters,
MACs per paragraph (64 tokens) and the batch-32 CPU latency, side by side with the original model.

Timing ratios come from one process, interleaved, with the CPU flags in the JSON; absolute times on a
shared machine are not comparable between runs.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from common import accuracy, fair_cpu, mean, parser, quiet_trainer, run_all, steady_allocator, write
from pruning import data as mnist_data

from lightning_slim.demos.models import MNIST1DCNN
from lightning_slim.factorization import LowRankFactorization, restructure
from lightning_slim.reporting.measure import count_macs, count_parameters, cpu_latency_ms

warnings.filterwarnings("ignore")  # Lightning's advice about workers / logging intervals
MNIST_ARMS = {"rank_0.25": {"rank": 0.25}, "rank_0.125": {"rank": 0.125}, "energy_0.9": {"energy": 0.9}}
MINILM_ENERGIES = (0.5, 0.7, 0.9)
MINILM_EXCLUDE = ["re:.*pooler.*"]  # mean pooling never reads BERT's pooler


# --- MNIST-1D ------------------------------------------------------------------------------------------
def mnist_fit(args, seed: int, arm: str) -> dict:
    pl.seed_everything(seed, verbose=False)
    model = MNIST1DCNN(channels=args.channels, lr=args.lr, lr_schedule="cosine")
    dm = mnist_data(args, seed)
    callbacks = []
    if arm != "dense":
        at = int(args.at * args.steps)
        callbacks = [LowRankFactorization(**MNIST_ARMS[arm], min_size=16, at=at, unit="step")]
    quiet_trainer(max_steps=args.steps, limit_val_batches=0, deterministic=True, callbacks=callbacks).fit(
        model, datamodule=dm
    )
    out = {f"{s}_acc": accuracy(model, *dm.split(s)) for s in ("val", "test")}
    if callbacks:
        out["report"] = callbacks[0].report_rows()
    return {**out, "state": model.cpu().state_dict()}


def interleaved_latency(models: dict, example, rounds: int, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Median milliseconds of each model, measured in rotation so drift hits every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(cpu_latency_ms(models[name], example, warmup=warmup, repeats=repeats))
    return {name: statistics.median(t) for name, t in times.items()}


def mnist(args) -> dict:
    arms = ["dense", *args.mnist_arms]
    jobs = [(mnist_fit, (args, s, a)) for s in args.seeds for a in arms]
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for (_, (_, _, arm)), out in zip(jobs, run_all(jobs, args.workers, args.threads)):
        runs[arm].append(out)
    models = {}
    for arm in arms:  # seed 0's trained models, rebuilt from their state (the structure from the report)
        model = MNIST1DCNN(channels=args.channels)
        restructure(model, runs[arm][0].get("report", {}).get("ranks", {}))
        model.load_state_dict(runs[arm][0]["state"])
        models[arm] = model.eval()
    x = torch.randn(256, 1, 40, generator=torch.Generator().manual_seed(0))
    steady = steady_allocator()
    latency = interleaved_latency(models, x, rounds=args.latency_rounds)
    macs = {a: count_macs(m, x[:1]) for a, m in models.items()}
    params = {a: count_parameters(m) for a, m in models.items()}
    rows = {}
    for arm in arms:
        accs = [r["test_acc"] for r in runs[arm]]
        report = runs[arm][0].get("report", {})
        rows[arm] = {
            "test_acc": mean(accs),
            "test_acc_per_seed": accs,
            "val_acc": mean(r["val_acc"] for r in runs[arm]),
            "params": params[arm],
            "macs": macs[arm],
            "params_ratio": params["dense"] / params[arm],
            "macs_ratio": macs["dense"] / macs[arm],
            "latency_speedup": latency["dense"] / latency[arm],
            "latency_ms": latency[arm],
            **({"ranks": report["ranks"], "energy_kept": report["energy_kept"]} if report else {}),
        }
    return {
        "channels": args.channels,
        "steps": args.steps,
        "factorized_at_step": int(args.at * args.steps),
        "latency": {"batch": 256, "threads": args.threads, "steady_allocator": steady, "rounds": args.latency_rounds},
        "arms": rows,
    }


# --- all-MiniLM-L6-v2 ------------------------------------------------------------------------------------
def _paragraphs(dm, split: str) -> dict[str, torch.Tensor]:
    """The split's anchors then positives: ``input_ids`` / ``attention_mask`` of 2N paragraphs."""
    t = dm.datasets[split].tensors
    return {
        "input_ids": torch.cat([t["input_ids"], t["positive_input_ids"]]),
        "attention_mask": torch.cat([t["attention_mask"], t["positive_attention_mask"]]),
    }


@torch.no_grad()
def embed(bert, paragraphs: dict[str, torch.Tensor], batch: int = 64) -> torch.Tensor:
    from lightning_slim.demos.modules import mean_pool

    bert.eval()
    ids, mask = paragraphs["input_ids"], paragraphs["attention_mask"]
    chunks = [
        mean_pool(
            bert(input_ids=ids[i : i + batch], attention_mask=mask[i : i + batch]).last_hidden_state,
            mask[i : i + batch],
        )
        for i in range(0, len(ids), batch)
    ]
    return torch.cat(chunks)


def quality(emb: torch.Tensor, original: torch.Tensor) -> dict[str, float]:
    """Mean cosine to the original model's embeddings (both unit length), nearest-neighbour agreement among
    the paragraphs, and pair retrieval (anchors are the first half, their positives the second)."""

    def neighbours(e):
        sim = e @ e.t()
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    n = len(emb) // 2
    retrieval = ((emb[:n] @ emb[n:].t()).argmax(1) == torch.arange(n)).float().mean()
    return {
        "cosine": float((emb * original).sum(-1).mean()),
        "nn_agreement": float((neighbours(emb) == neighbours(original)).float().mean()),
        "retrieval": float(retrieval),
    }


def minilm_data(args):
    from lightning_slim.demos import pretrained, text

    limit = {"train": 32, "val": 8, "test": 8} if args.smoke else None
    return text.pair_datamodule(pretrained.load_minilm()[1], max_length=64, batch_size=16, seed=0, limit=limit)


def minilm_fit(args, energy: float | None, lr: float | None) -> dict:
    """Factorize (``energy``; None: dense) and fine-tune at ``lr`` (None: no fine-tuning); the quality on
    validation and test, and the trained weights with their structure."""
    from lightning_slim.demos import pretrained
    from lightning_slim.demos.modules import SentenceEncoder
    from lightning_slim.factorization import apply_factorization
    from lightning_slim.factorization.configs import FactorizationConfig

    pl.seed_everything(0, verbose=False)
    original, dm = pretrained.load_minilm()[0], minilm_data(args)
    bert = copy.deepcopy(original)
    config = None if energy is None else FactorizationConfig(energy=energy, exclude=MINILM_EXCLUDE)
    report = {}
    if lr is None:  # the SVD alone
        report = apply_factorization(bert, config) if config else {}
    else:
        callbacks = [] if config is None else [LowRankFactorization(config=config)]
        steps = args.ft_epochs * -(-len(dm.datasets["train"]) // 16)
        module = SentenceEncoder(bert, lr=lr, warmup=min(10, steps // 5))
        quiet_trainer(max_steps=steps, limit_val_batches=0, deterministic=True, callbacks=callbacks).fit(
            module, datamodule=dm
        )
        report = callbacks[0].report_rows() if callbacks else {}
        report["ranks"] = {k.removeprefix("model."): r for k, r in report.get("ranks", {}).items()}  # bert's paths
    out = {"report": report, "state": bert.state_dict(), "energy": energy, "lr": lr}
    for split in ("val", "test"):
        paragraphs = _paragraphs(dm, split)
        out[split] = quality(embed(bert, paragraphs), embed(original, paragraphs))
    return out


def minilm(args) -> dict:
    from lightning_slim.demos import pretrained

    arms = [None, *args.energies]
    plan = [(e, None) for e in args.energies] + [(e, lr) for e in arms for lr in args.lrs]
    results = run_all([(minilm_fit, (args, e, lr)) for e, lr in plan], args.workers, args.threads)
    done = {(r["energy"], r["lr"]): r for r in results}
    original = pretrained.load_minilm()[0].eval()
    dm = minilm_data(args)
    test = _paragraphs(dm, "test")
    example = {k: v[:32] for k, v in test.items()}  # batch 32 of 64-token paragraphs
    rows, models = {}, {"original": original}
    for e in arms:
        name = "dense" if e is None else f"energy_{e:g}"
        tuned = {lr: done[(e, lr)] for lr in args.lrs}
        best = max(tuned, key=lambda lr: tuned[lr]["val"]["cosine"])  # chosen on validation
        chosen = tuned[best]
        model = copy.deepcopy(original)
        restructure(model, chosen["report"].get("ranks", {}))
        model.load_state_dict(chosen["state"])
        models[name] = model.eval()
        rows[name] = {
            "lr": best,
            "val_cosine_per_lr": {str(lr): tuned[lr]["val"]["cosine"] for lr in args.lrs},
            "finetuned": chosen["test"],
            **({"svd_only": done[(e, None)]["test"]} if e is not None else {}),
            "report": {
                k: chosen["report"][k]
                for k in ("layers_factorized", "params_before", "params_after", "params_ratio", "kept_dense")
            }
            if e is not None
            else {},
        }
    macs = {n: count_macs(m, example) for n, m in models.items()}
    latency = interleaved_latency(models, example, rounds=args.latency_rounds, warmup=2, repeats=5)
    for name, row in rows.items():
        m = models[name]
        row |= {
            "params": count_parameters(m),
            "params_ratio": count_parameters(original) / count_parameters(m),
            "macs_per_paragraph": macs[name],
            "macs_ratio": macs["original"] / macs[name],
            "latency_speedup": latency["original"] / latency[name],
            "latency_ms": latency[name],
        }
    return {
        "original": {
            "params": count_parameters(original),
            "macs_per_paragraph": macs["original"],
            "latency_ms": latency["original"],
        },
        "latency": {"batch": 32, "tokens": 64, "threads": args.threads, "rounds": args.latency_rounds},
        "ft_epochs": args.ft_epochs,
        "arms": rows,
    }


def main() -> None:
    p = parser(__doc__.split("\n")[0], "benchmarks/results/factorization.json")
    p.set_defaults(threads=1)  # per process; 1 avoids thread spin on a shared machine
    p.add_argument("--arms", nargs="+", choices=["mnist1d", "minilm"], default=["mnist1d", "minilm"])
    p.add_argument("--workers", type=int, default=2, help="trainings run in parallel (timings run alone)")
    p.add_argument("--smoke", action="store_true", help="tiny limits: checks the plumbing only")
    p.add_argument("--num-samples", type=int, default=25000)
    p.add_argument("--val-examples", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--at", type=float, default=0.25, help="MNIST-1D: factorize at this fraction of the training")
    p.add_argument("--ft-epochs", type=int, default=2, help="MiniLM fine-tuning epochs")
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 1e-4], help="MiniLM learning rates to choose from")
    p.add_argument("--latency-rounds", type=int, default=5)
    p.add_argument("--mnist-arms", nargs="+", choices=list(MNIST_ARMS), default=list(MNIST_ARMS))
    p.add_argument("--energies", type=float, nargs="+", default=list(MINILM_ENERGIES), help="MiniLM arms")
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.num_samples, args.val_examples = [0], 40, 6000, 1000
        args.ft_epochs, args.latency_rounds = 1, 1
        args.mnist_arms, args.energies, args.lrs = ["rank_0.25"], [0.5], [1e-4]
    started = time.time()
    fair_cpu(args.threads)
    results: dict = {"config": vars(args)}
    if "mnist1d" in args.arms:
        results["mnist1d"] = mnist(args)
    if "minilm" in args.arms:
        results["minilm"] = minilm(args)
    write(args.out, results, started)


if __name__ == "__main__":
    main()
