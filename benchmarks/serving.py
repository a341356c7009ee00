"""int8 served by ONNX Runtime: speed, size and accuracy against fp32, on the host it runs on.

    python benchmarks/serving.py --out benchmarks/results/serving.json

Per model: a short QuantizationAwareTraining run on MNIST-1D (runtime="onnxruntime": 1 float
warm-up epoch, static uint8 activation ranges and 7-bit per-channel weights, ranges and folded
BN frozen for the last epoch, cosine-decayed learning rate, seed 0, 16,000 train / 4,000 test
examples), then, in one process with one thread (torch and ORT ``intra_op_num_threads=1``):

- ``fp32_eager_ms`` the trained float model in PyTorch, ``fp32_runtime_ms`` the same model exported
  to ONNX and run by ORT, ``int8_ms`` the QAT artifact in ORT: timed interleaved (rounds of
  repeats, medians), ``int8_speedup`` = fp32_eager / int8;
- bytes of the files written (fp32 ONNX vs int8 ONNX), and ``int4_bytes`` of a weight-only int4
  (MatMulNBits, block 128, ORT's own quantizer default) conversion of the same trained weights
  for the Linear-heavy models;
- ``gemm_kernels``: ORT's int8 GEMM (``MatMulInteger``, s8 and u8 weights) against its fp32
  ``MatMul`` for a 1024x1024 weight at 1 to 256 rows: the most a Linear-heavy model can gain here;
- ``fakequant_metric`` test accuracy of the fake-quantized model (what validation reported during
  QAT), ``int8_metric`` of the ORT artifact, their argmax agreement and largest logit difference.
Nothing is tuned: the recipe is the method card's default schedule.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fair_cpu, quiet_trainer

from lightning_slim.demos.data import MNIST1DDataModule
from lightning_slim.demos.models import MNIST1DCNN, MNIST1DMLP, MNIST1DTeacherCNN, MNIST1DTransformer
from lightning_slim.quantization import (
    QuantizationAwareTraining,
    QuantizationConfig,
    artifact_bytes,
    cpu_int8_capability,
    fp32_onnx,
    fused_ops,
    interleaved_latency_ms,
    select_layers,
    to_runtime,
)
from lightning_slim.quantization import (
    functional as F,
)
from lightning_slim.quantization.export import save_int8

# name -> (factory, lr, Linear-heavy: also int4)
MODELS = {
    "mnist1d_cnn": (MNIST1DCNN, 1e-2, False),
    "cnn_128_bn": (MNIST1DTeacherCNN, 3e-3, False),
    "mlp_1024": (partial(MNIST1DMLP, hidden=1024), 1e-3, True),
    "transformer": (partial(MNIST1DTransformer, dim=128), 1e-3, True),
}
BATCHES = {"mnist1d_cnn": 256, "cnn_128_bn": 256, "mlp_1024": 256, "transformer": 256, "mlp_1024_b1": 1}
INT4_BLOCK = 128


def fit_qat(name: str, data, epochs: int, seed: int):
    make, lr, _ = MODELS[name]
    torch.manual_seed(seed)
    module = make(lr=lr, lr_schedule="cosine")
    cb = QuantizationAwareTraining(start_after=1, freeze_ranges_after=epochs - 1, freeze_bn_after=epochs - 1)
    quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[cb]).fit(module, datamodule=data)
    return module.cpu().eval(), cb


@torch.no_grad()
def logits(model, x, chunk=1000):
    return torch.cat([model(c) for c in x.split(chunk)])


def int4_artifact(module, x, path) -> tuple[int, float]:
    """Weight-only int4 of the trained float weights (post-training, MatMulNBits): (bytes, test acc)."""
    model = copy.deepcopy(module).eval()
    F.prepare_qat(
        model,
        select_layers(model, ["Linear"]),
        QuantizationConfig(weight_bits=4, activation_bits=None, group_size=INT4_BLOCK),
    )
    F.set_fake_quant(model, True)
    int4 = to_runtime(model, x[:8])
    return artifact_bytes(save_int8(int4, x[:8], path)), int4


def measure(name, module, cb, data, batch, tmp, repeats):
    x_test, y_test = data.x_test, data.y_test
    fake = cb.fake_quantized(copy.deepcopy(module))
    int8 = cb.export(copy.deepcopy(module), x_test[:8])
    fp32_rt = fp32_onnx(module, x_test[:8])
    fp32_path, int8_path = fp32_rt.save(tmp / f"{name}_fp32.onnx"), int8.save(tmp / f"{name}_int8.onnx")
    fq_out, int8_out = logits(fake, x_test), logits(int8, x_test)
    acc = lambda out: float((out.argmax(-1) == y_test).float().mean())
    x = x_test[:batch]
    times = interleaved_latency_ms(
        {"fp32_eager": lambda: module(x), "fp32_runtime": lambda: fp32_rt(x), "int8": lambda: int8(x)}, repeats=repeats
    )
    row = {
        "params": sum(p.numel() for p in module.parameters()),
        "batch": batch,
        "runtime": "onnxruntime",
        "fp32_eager_ms": times["fp32_eager"],
        "fp32_runtime_ms": times["fp32_runtime"],
        "int8_ms": times["int8"],
        "int8_speedup": times["fp32_eager"] / times["int8"],
        "int8_speedup_vs_fp32_runtime": times["fp32_runtime"] / times["int8"],
        "fp32_bytes": artifact_bytes(fp32_path),
        "int8_bytes": artifact_bytes(int8_path),
        "fp32_metric": acc(logits(module, x_test)),
        "fakequant_metric": acc(fq_out),
        "int8_metric": acc(int8_out),
        "argmax_agreement": float((fq_out.argmax(-1) == int8_out.argmax(-1)).float().mean()),
        "max_logit_diff": float((fq_out - int8_out).abs().max()),
        "int8_ops": fused_ops(int8_path),
    }
    row["int8_size_ratio"] = row["fp32_bytes"] / row["int8_bytes"]
    if MODELS[name.removesuffix("_b1")][2]:
        row["int4_bytes"], int4 = int4_artifact(module, x_test, tmp / f"{name}_int4.onnx")
        row["int4_size_ratio"] = row["fp32_bytes"] / row["int4_bytes"]
        row["int4_ptq_metric"] = acc(logits(int4, x_test))
    return row


def gemm_kernels(k: int = 1024, n: int = 1024, rows=(1, 16, 64, 256), repeats: int = 20) -> dict:
    """ORT's int8 GEMM against its fp32 GEMM on this CPU, one (rows x k) @ (k x n) product each:
    ``MatMul`` in float against ``MatMulInteger`` with s8 weights (7-bit, the export's) and with
    u8 weights (MLAS's other AVX2 kernel), interleaved medians. What a whole model can gain from
    int8 is bounded by these ratios: at batch 1 the product is memory-bound (int8 weights are 4x
    fewer bytes), at batch 256 compute-bound (int8 gains only what the CPU's int8 dot products
    gain over its FMAs)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def product(kind: str):
        if kind == "fp32":
            w = rng.standard_normal((k, n)).astype(np.float32)
            node, inits, types = helper.make_node("MatMul", ["A", "W"], ["Y"]), [], (TensorProto.FLOAT,) * 2
        else:
            s8 = kind == "u8s8"
            w = rng.integers(-64, 64, (k, n)).astype(np.int8) if s8 else rng.integers(0, 256, (k, n)).astype(np.uint8)
            zero_w = np.array(0 if s8 else 128, dtype=w.dtype)
            inits = [numpy_helper.from_array(zero_w, "zw"), numpy_helper.from_array(np.array(128, np.uint8), "za")]
            node = helper.make_node("MatMulInteger", ["A", "W", "za", "zw"], ["Y"])
            types = (TensorProto.UINT8, TensorProto.INT32)
        graph = helper.make_graph(
            [node],
            kind,
            [helper.make_tensor_value_info("A", types[0], [None, k])],
            [helper.make_tensor_value_info("Y", types[1], [None, n])],
            [numpy_helper.from_array(w, "W"), *inits],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    sessions = {kind: product(kind) for kind in ("fp32", "u8s8", "u8u8")}
    out = {}
    for m in rows:
        a = {
            "fp32": rng.standard_normal((m, k)).astype(np.float32),
            "int8": rng.integers(0, 128, (m, k)).astype(np.uint8),
        }
        feeds = {kind: {"A": a["fp32" if kind == "fp32" else "int8"]} for kind in sessions}
        ms = interleaved_latency_ms(
            {kind: (lambda s=s, f=feeds[kind]: s.run(None, f)) for kind, s in sessions.items()},
            repeats=repeats * (20 if m == 1 else 1),
        )
        out[f"{m}x{k}x{n}"] = {
            **{f"{kind}_ms": v for kind, v in ms.items()},
            "u8s8_speedup": ms["fp32"] / ms["u8s8"],
            "u8u8_speedup": ms["fp32"] / ms["u8u8"],
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/serving.json")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per round (x5 rounds; x20 at batch 1)")
    p.add_argument("--models", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    args = p.parse_args(argv)
    started = time.time()
    fair_cpu(1)
    data = MNIST1DDataModule(num_samples=args.num_samples, batch_size=128, seed=args.seed)
    data.setup()
    results, trained = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            base = name.removesuffix("_b1")
            if base not in trained:
                t0 = time.time()
                trained[base] = (*fit_qat(base, data, args.epochs, args.seed), time.time() - t0)
            module, cb, train_s = trained[base]
            batch = BATCHES[name]
            repeats = args.repeats * (20 if batch == 1 else 1)
            results[name] = {**measure(name, module, cb, data, batch, Path(tmp), repeats), "train_s": train_s}
            print(name, json.dumps(results[name]), flush=True)
    kernels = gemm_kernels()
    cap = cpu_int8_capability()
    flags = sorted(
        f
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
        for f in line.split(":", 1)[1].split()
        if f.startswith(("avx", "amx", "vnni", "fma", "sse4"))
    )
    import lightning
    import onnxruntime

    out = {
        "machine": {
            "cpu": cap["model"],
            "int8_capability": cap,
            "cpu_flags": sorted(set(flags)),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "lightning": lightning.__version__,
            "threads": 1,
            "ort_intra_op_threads": 1,
        },
        "command": "python benchmarks/serving.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            "epochs": args.epochs,
            "seed": args.seed,
            "num_samples": args.num_samples,
            "test_examples": len(data.y_test),
            "int4_block": INT4_BLOCK,
            "repeats": args.repeats,
        },
        "models": results,
        "gemm_kernels": kernels,
        "wall_s": round(time.time() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, r in results.items():
        print(
            f"{name:>12} {r['params']:>9,} b={r['batch']:<3} eager {r['fp32_eager_ms']:7.3f} ms | ORT fp32 "
            f"{r['fp32_runtime_ms']:7.3f} | ORT int8 {r['int8_ms']:7.3f} ({r['int8_speedup']:.2f}x) | size "
            f"x{r['int8_size_ratio']:.2f} | acc fq {r['fakequant_metric']:.4f} int8 {r['int8_metric']:.4f}"
        )
    for shape, r in kernels.items():
        print(f"GEMM {shape}: int8 u8s8 {r['u8s8_speedup']:.2f}x, u8u8 {r['u8u8_speedup']:.2f}x of ORT fp32")
    print("wall_s", out["wall_s"])
    return out


if __name__ == "__main__":
    main()
