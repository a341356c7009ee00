"""Shared benchmark plumbing: fair CPU settings, quiet Trainers, a validation split, accuracy,
parallel trainings, step timing, machine description and JSON output."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from lightning_slim.demos.data import IndexedTensorDataset, MNIST1DDataModule

# generated data sets stay in the checkout (ignored by git), never downloaded
os.environ.setdefault("LIGHTNING_SLIM_CACHE", str(Path(__file__).resolve().parents[1] / ".slim_cache"))


def fair_cpu(threads: int = 2) -> None:
    """DESIGN.md: denormals made training 2.3x slower once; fix the thread count."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc: no heap trimming, no mmap for buffers under 512 MiB).

    Measured here: a 128-channel CNN's batch-256 forward took 5.5-6.6 ms in a fresh process and
    2.5 ms after a training had run in it, while a 89-channel one took 1.8 ms in both: with glibc's
    defaults every forward's large activation buffers are returned to the system and page-faulted
    back in, a cost that depends on what ran before. With this, latency ratios measure compute.
    Returns False where there is no glibc (the defaults stay)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 29))


def quiet_trainer(**kwargs):
    import lightning.pytorch as pl

    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    args.update(kwargs)
    return pl.Trainer(**args)


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help="where to write the JSON results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    return p


class ValidatedMNIST1D(MNIST1DDataModule):
    """MNIST-1D with a clean validation split carved from the training examples.

    ``MNIST1DDataModule`` validates on its test split. Recipes must be chosen on data the reported
    numbers never see, so ``val_examples`` training examples are set aside first (a fixed permutation
    from ``val_seed``: the same split for every seed and method), before the holdout and the label
    noise are drawn from the rest. ``train_examples`` keeps a fixed random subset of what remains (a
    data-limited workload). ``val_dataloader`` serves the validation split, ``test_dataloader`` the
    test split; ``x_val``/``y_val`` and ``x_test``/``y_test`` hold them.
    """

    def __init__(self, val_examples: int = 4000, val_seed: int = 1234, train_examples: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.val_examples, self.val_seed, self.train_examples = val_examples, val_seed, train_examples

    def _load(self):
        x, y, x_test, y_test = super()._load()
        g = torch.Generator().manual_seed(self.val_seed)
        perm = torch.randperm(len(y), generator=g)
        val, rest = perm[: self.val_examples], perm[self.val_examples :]
        if self.train_examples is not None:
            if self.train_examples > len(rest):
                raise ValueError(f"train_examples={self.train_examples} exceeds the {len(rest)} left after validation")
            rest = rest[torch.randperm(len(rest), generator=g)[: self.train_examples]]
        self.x_val, self.y_val = x[val], y[val]
        rest = rest.sort().values
        return x[rest], y[rest], x_test, y_test

    def val_dataloader(self):
        self.setup()
        return self._loader(IndexedTensorDataset(self.x_val, self.y_val), self.eval_batch_size)

    def test_dataloader(self):
        return super().val_dataloader()  # the base class serves its test split there

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        self.setup()
        return {"val": (self.x_val, self.y_val), "test": (self.x_test, self.y_test)}[name]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(c) for c in x.split(chunk)])
    model.train(was_training)
    return float((logits.argmax(-1) == y).float().mean())


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _init_worker(threads: int) -> None:
    fair_cpu(threads)
    warnings.filterwarnings("ignore")


def _call(job):
    fn, job_args = job
    return fn(*job_args)


def run_all(jobs: list, workers: int = 1, threads: int = 1) -> list:
    """``[(fn, args), ...]`` in ``workers`` processes of ``threads`` threads; results in job order.
    ``fn`` must be a module-level function (the processes are spawned)."""
    if workers <= 1:
        return [_call(j) for j in jobs]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        return pool.map(_call, jobs, chunksize=1)


def step_timer(skip_first: int = 0):
    """A Lightning callback that records each training step's wall time (``.times``, seconds),
    from batch start to batch end, dropping the first ``skip_first`` steps of every fit (warm-up)."""
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > skip_first:
                self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def cpu_description() -> dict:
    """Model name and the instruction-set flags that decide CPU kernel speed (from /proc/cpuinfo)."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        elif key.strip() == "flags":
            wanted = ("avx", "fma", "amx", "vnni", "bf16", "f16c")
            info["flags"] = sorted(f for f in value.split() if f.startswith(wanted) or f in wanted)
            break
    return info


def machine() -> dict:
    import lightning

    return {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "threads": torch.get_num_threads(),
    }


def write(out: str, results: dict, started: float) -> None:
    results = {**results, "machine": machine(), "wall_s": round(time.time() - started, 1)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
