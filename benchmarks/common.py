"""Shared benchmark plumbing: fair CPU settings, quiet Trainers, JSON output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def fair_cpu(threads: int = 2) -> None:
    """DESIGN.md: denormals made training 2.3x slower once; fix the thread count."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)


def quiet_trainer(**kwargs):
    import lightning.pytorch as pl

    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    args.update(kwargs)
    return pl.Trainer(**args)


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help="where to write the JSON results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    return p


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def write(out: str, results: dict, started: float) -> None:
    results = {**results, "machine": machine(), "wall_s": round(time.time() - started, 1)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
