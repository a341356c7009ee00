"""All four techniques on one student vs the teacher it learns from (issue 7).

    python benchmarks/pipeline.py --out benchmarks/results/pipeline.json

MNIST-1D, 20000 examples (16000 train / 4000 test), the teacher ``MNIST1DTeacherCNN`` (106k
parameters) trained 8 epochs, then the paper's 5k CNN trained 10 epochs with learnability
selection (keep 50% of 256-example super-batches), distillation (alpha 0.7, T 4, cached),
gradual pruning to 50% over 6 epochs, int8 QAT from epoch 6, exported to int8.
Latency: CPU, batch 256, teacher and student timed interleaved in one process.
Targets (issue 7): size_ratio >= 20, student within 2 points of the teacher, latency_speedup >= 3.
"""

from __future__ import annotations

import statistics
import time

from common import fair_cpu, parser, write

from lightning_slim.pipeline import run_pipeline

KEYS = (
    "teacher_acc",
    "student_acc",
    "size_ratio",
    "latency_speedup",
    "latency_speedup_fp32_student",
    "student_fp32_latency_ms",
    "train_compute_ratio",
    "teacher_bytes",
    "student_bytes",
    "teacher_latency_ms",
    "student_latency_ms",
    "examples_seen",
    "examples_trained",
    "student_nonzero_params",
    "teacher_params",
)


def main() -> None:
    args = parser(__doc__.splitlines()[0], "benchmarks/results/pipeline.json").parse_args()
    fair_cpu(args.threads)
    started, runs = time.time(), []
    for seed in args.seeds:
        summary, _ = run_pipeline(
            seed=seed,
            out=f"/tmp/slim_pipeline_bench/{seed}",
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        runs.append({k: summary[k] for k in KEYS})
    mean = {k: statistics.mean(r[k] for r in runs) for k in KEYS}
    write(
        args.out,
        {
            "seeds": args.seeds,
            **mean,
            "per_seed": runs,
            "targets_met": {
                "size_ratio>=20": mean["size_ratio"] >= 20,
                "student_within_2_points": mean["teacher_acc"] - mean["student_acc"] <= 0.02,
                "latency_speedup>=3": mean["latency_speedup"] >= 3,
            },
        },
        started,
    )


if __name__ == "__main__":
    main()
