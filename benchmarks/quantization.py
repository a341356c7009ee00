"""QAT vs post-training quantization vs fp32 on MNIST-1D, with the int8 export's size and CPU latency.

    python benchmarks/quantization.py --out benchmarks/results/quantization.json

Per model and seed (paired: same data split, same initialisation, same cosine-decayed
learning rate and epochs for every method):
  fp32  -- plain training (Lightning, no callback);
  PTQ   -- that fp32 model quantized for onnxruntime as is (activation ranges observed on 2048
           training inputs, no training);
  QAT   -- the same training with QuantizationAwareTraining (runtime="onnxruntime": 1 float warm-up
           epoch, ranges and folded BN frozen for the last 20% of epochs), exported to int8 ONNX.
Accuracies are on the 4000-example test split. Latency: CPU, batch 256, 2 threads, fp32 eager and
the int8 ONNX Runtime artifact timed alternately in one process (median of interleaved repeats;
benchmarks/serving.py adds fp32-in-ORT, batch 1 and one-thread rows). Size: torch.save(state_dict)
of the fp32 model against the int8 module, whose state is the ONNX file's bytes;
``payload_ratio`` counts tensor bytes only (what per-file overhead hides on tiny models).
Two wider models (untrained) add size and latency rows to show how int8 scales with width.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from functools import partial

import lightning.pytorch as pl
import torch

from lightning_slim.demos.data import MNIST1DDataModule
from lightning_slim.demos.models import MNIST1DCNN, MNIST1DMLP
from lightning_slim.quantization import QuantizationAwareTraining, QuantizationConfig, select_layers
from lightning_slim.quantization import functional as F
from lightning_slim.quantization.export import to_runtime
from lightning_slim.quantization.static import calibrate
from lightning_slim.reporting.measure import serialized_bytes
from lightning_slim.reporting.report import classification_accuracy

MODELS = {  # name -> (factory, epochs, lr); the required rows, trained
    "mnist1d_cnn": (partial(MNIST1DCNN, channels=25), 10, 1e-2),
    "mnist1d_mlp": (partial(MNIST1DMLP, hidden=100), 10, 3e-3),
}
# wider models, size and latency only (untrained weights: the 10-minute budget has no room to
# train them): does int8 pay off once GEMMs, not per-op overhead, dominate?
WIDE = {
    "mnist1d_mlp_1024": partial(MNIST1DMLP, hidden=1024),
    "mnist1d_cnn_128_bn": partial(MNIST1DCNN, channels=128, batch_norm=True),
}


def fit(make, epochs, lr, seed, data, callbacks=()):
    pl.seed_everything(seed, verbose=False)
    module = make(lr=lr, lr_schedule="cosine")
    pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    ).fit(module, datamodule=data)
    return module


def ptq(module, calibration):
    """Post-training int8 for onnxruntime: ranges observed on ``calibration`` inputs, no training."""
    model = copy.deepcopy(module).cpu().eval()
    F.prepare_qat(model, select_layers(model), QuantizationConfig())
    calibrate(model, calibration.split(256))
    F.set_fake_quant(model, True)
    return to_runtime(model.eval(), calibration[:8])


def payload_bytes(model) -> int:
    total = 0
    for t in model.state_dict().values():
        for attr in ("qdata", "scale", "zero_point"):
            inner = getattr(t, attr, None) if type(t) is not torch.Tensor else None
            total += inner.numel() * inner.element_size() if isinstance(inner, torch.Tensor) else 0
        total += t.numel() * t.element_size() if type(t) in (torch.Tensor, torch.nn.Parameter) else 0
    return total


@torch.inference_mode()
def interleaved_latency(a, b, x, repeats):
    for _ in range(5):
        a(x), b(x)
    ta, tb = [], []
    for _ in range(repeats):
        for model, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(ta), 1e3 * statistics.median(tb)


def run_model(name, seeds, num_samples, repeats, epochs_scale):
    make, epochs, lr = MODELS[name]
    epochs = max(2, round(epochs * epochs_scale))
    rows = []
    for seed in seeds:
        data = MNIST1DDataModule(num_samples=num_samples, batch_size=128, seed=seed)
        data.setup()
        test = data.test_dataloader()
        t0 = time.time()
        fp32 = fit(make, epochs, lr, seed, data).cpu().eval()
        cb = QuantizationAwareTraining(
            start_after=1, freeze_ranges_after=max(1, round(0.8 * epochs)), freeze_bn_after=max(1, round(0.8 * epochs))
        )
        qat = fit(make, epochs, lr, seed, data, [cb]).cpu().eval()
        qat_int8 = cb.export(copy.deepcopy(qat))
        x = data.x_test[:256]
        fp32_ms, int8_ms = interleaved_latency(fp32, qat_int8, x, repeats)
        rows.append(
            {
                "seed": seed,
                "fp32_acc": classification_accuracy(fp32, test),
                "ptq_int8_acc": classification_accuracy(ptq(fp32, data.x_train[:2048]), test),
                "qat_fp32_acc": classification_accuracy(qat, test),
                "qat_int8_acc": classification_accuracy(qat_int8, test),
                "fp32_bytes": serialized_bytes(fp32),
                "int8_bytes": serialized_bytes(qat_int8),
                "payload_ratio": payload_bytes(fp32) / payload_bytes(qat_int8),
                "fp32_ms": fp32_ms,
                "int8_ms": int8_ms,
                "seconds": time.time() - t0,
            }
        )
        print(name, rows[-1], flush=True)
    mean = lambda k: statistics.mean(r[k] for r in rows)
    return {
        "fp32_acc": mean("fp32_acc"),
        "ptq_int8_acc": mean("ptq_int8_acc"),
        "qat_int8_acc": mean("qat_int8_acc"),
        "size_ratio": mean("fp32_bytes") / mean("int8_bytes"),
        "payload_size_ratio": mean("payload_ratio"),
        "latency_speedup": statistics.median(r["fp32_ms"] / r["int8_ms"] for r in rows),
        "fp32_latency_ms": mean("fp32_ms"),
        "int8_latency_ms": mean("int8_ms"),
        "params": sum(p.numel() for p in make().parameters()),
        "epochs": epochs,
        "lr": lr,
        "acc_std_fp32": statistics.pstdev(r["fp32_acc"] for r in rows),
        "acc_std_qat_int8": statistics.pstdev(r["qat_int8_acc"] for r in rows),
        "per_seed": rows,
    }


def run_wide(name, repeats):
    fp32 = WIDE[name]().eval()
    x = torch.randn(256, 1, 40, generator=torch.Generator().manual_seed(0))
    int8 = ptq(fp32, x)
    fp32_ms, int8_ms = interleaved_latency(fp32, int8, x, repeats)
    row = {
        "size_ratio": serialized_bytes(fp32) / serialized_bytes(int8),
        "payload_size_ratio": payload_bytes(fp32) / payload_bytes(int8),
        "latency_speedup": fp32_ms / int8_ms,
        "fp32_latency_ms": fp32_ms,
        "int8_latency_ms": int8_ms,
        "params": sum(p.numel() for p in fp32.parameters()),
        "trained": False,
    }
    print(name, row, flush=True)
    return row


@torch.inference_mode()
def gemm_row(repeats):
    """The kernel under every int8 layer: torch._int_mm (int8 x int8 -> int32) vs fp32 matmul."""
    from torchao.utils import _cpu_is_amx_tile_supported, _cpu_is_vnni_supported

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-128, 128, s, dtype=torch.int8, generator=g) for s in ((256, 1024), (1024, 1024)))
    af, bf = a.float(), b.float()
    fp32_ms, int8_ms = interleaved_latency(lambda _x: af @ bf, lambda _x: torch._int_mm(a, b), None, repeats)
    return {
        "shape": "256x1024 @ 1024x1024",
        "fp32_ms": fp32_ms,
        "int8_ms": int8_ms,
        "int8_speedup": fp32_ms / int8_ms,
        "cpu_avx512_vnni": _cpu_is_vnni_supported(),
        "cpu_amx": _cpu_is_amx_tile_supported(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="shrink epochs for a quick try")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(2)
    start = time.time()
    results = {
        name: run_model(name, args.seeds, args.num_samples, args.repeats, args.epochs_scale) for name in args.models
    }
    # int8 is slow on some CPUs (see gemm_row): fewer repeats keep these rows inside the budget
    results |= {name: run_wide(name, min(args.repeats, 10)) for name in WIDE}
    gemm = gemm_row(min(args.repeats, 10))
    print("gemm", gemm)
    meta = {
        "int8_gemm_kernel": gemm,
        "command": "python " + " ".join(sys.argv),
        "seeds": args.seeds,
        "torch": torch.__version__,
        "threads": 2,
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "seconds": round(time.time() - start, 1),
        "test_examples": int(args.num_samples * 0.2),
        "latency_batch": 256,
    }
    with open(args.out, "w") as f:
        json.dump({**results, "_meta": meta}, f, indent=2)
    for name, r in results.items():
        accs = " ".join(f"{k[:-4]} {r[k]:.4f}" for k in ("fp32_acc", "ptq_int8_acc", "qat_int8_acc") if k in r)
        print(
            f"{name:>20}: {accs} size x{r['size_ratio']:.2f} (payload x{r['payload_size_ratio']:.2f}) "
            f"latency x{r['latency_speedup']:.2f} ({r['fp32_latency_ms']:.2f} -> {r['int8_latency_ms']:.2f} ms)"
        )


if __name__ == "__main__":
    main()
