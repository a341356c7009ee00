"""Compression of real pretrained models (issue 19): SmolLM2-135M-Instruct and all-MiniLM-L6-v2,
every arm trained in a Lightning ``Trainer`` with the callbacks, on Python's documentation topics
(split by topic: settings chosen on ``val``, numbers reported on ``test``).

Each arm is a module of ``benchmarks/real/`` with ``run(args) -> dict`` whose result is stored
under its key of ``benchmarks/results/real_models.json``; ``--arms`` runs some of them and keeps
the other keys of an existing file, so arms can be run (and re-run) separately:

    python benchmarks/real_models.py --arms minilm_int8 smol_int8
    python benchmarks/real_models.py            # all arms, about an hour on 2 cores

Losses are mean next-token nats over every position of the split's 128-token windows; perplexity
is their exponential.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fair_cpu, machine, steady_allocator

# arm name (its key in the JSON) -> module of benchmarks/real/
ARMS = {
    "minilm_int8": "real.minilm_int8",
    "smol_int8": "real.smol_int8",
    "smol_fp32_ft": "real.smol_fp32_ft",
    "smol_2of4": "real.smol_2of4",
    "smol_student": "real.smol_student",
    "smol_student_corrected": "real.smol_student_corrected",
    "selection": "real.selection",
    "kd_cost": "real.kd_cost",
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    p.add_argument("--out", default="benchmarks/results/real_models.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a few steps on a few windows: checks the plumbing only")
    args = p.parse_args(argv)
    fair_cpu(args.threads)
    steady_allocator()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() and not args.smoke else {}
    started = time.time()
    for arm in args.arms:
        t = time.time()
        print(f"== {arm}", flush=True)
        results[arm] = {**importlib.import_module(ARMS[arm]).run(args), "wall_s": round(time.time() - t, 1)}
        if not args.smoke:  # after every arm: a later crash keeps what was measured
            _write(out, results, started, args.arms)
    if args.smoke:
        return results
    return _write(out, results, started, args.arms)


def _write(out: Path, results: dict, started: float, arms: list[str]) -> dict:
    # wall_s: the sum of the arms' own times (arms may come from separate runs); this run's in last_run
    results["wall_s"] = round(sum(r["wall_s"] for k, r in results.items() if k in ARMS), 1)
    results["last_run"] = {"arms": arms, "wall_s": round(time.time() - started, 1), "machine": machine()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
