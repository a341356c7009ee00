"""SmolLM2-135M-Instruct in int8 / int4 with ONNX Runtime (issue 19).

Every arm is a Lightning ``Trainer`` fit of the user-style ``CausalLM`` (no ``forward``; the model
in eval mode as ``from_pretrained`` returns it) with ``QuantizationAwareTraining``, then
``qat.export``: an ONNX file of ``model`` with inputs ``input_ids`` and ``attention_mask``, whose
perplexity is measured in ONNX Runtime on the test windows. int8 arms (every Linear, ``lm_head``
included unless said; 8-bit weights, ``reduce_range=False``, see the method card):

- ``ptq_static`` / ``ptq_dynamic``: the callback at learning rate 0 (its steps only calibrate the
  static ranges), static per-tensor or dynamic per-token activations;
- ``ptq_<mode>_head_fp32``: the chosen mode with the output head left float (``exclude=["model.lm_head"]``).
  SmolLM2's head is tied to its input embedding, which stays float anyway, so a float head adds no
  bytes (the file holds the table once) and removes the int8 copy; the head was measured the most
  int8-sensitive Linear (its input, the final normed hidden state, has the largest outliers);
- ``qat`` / ``qat_kd``: fine-tuning in the activation mode and head choice made on validation, alone
  or with ``KnowledgeDistillation`` from the fp32 model (token logits).

int4: weight-only (``MatMulNBits``, float activations) PTQ at group sizes 128 and 64. Not 32:
SmolLM2's weights were stored as 4-bit blocks of 32 (Q4_1), so int4 with groups of 32 is near-lossless
on it by construction and would be no evidence for int4 in general.

Serving: one 128-token forward at batch 1 (the full sequence, no key/value cache: the export has
none), fp32 eager vs the int8 and int4 files, one thread, timed interleaved in one process.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from lightning_slim import KnowledgeDistillation, QuantizationAwareTraining
from lightning_slim.demos import modules
from lightning_slim.quantization import serving
from real.common import lm_data, lm_loss, one_thread, ppl, smol, trainer, windows

INT4_GROUPS = (128, 64)  # not 32: the checkpoint's own Q4_1 blocks, near-lossless by construction


@torch.no_grad()
def ort_loss(int8, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token nats of an exported causal LM (logits out) over ``(N, T)`` windows."""
    total = 0.0
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        logits = int8(input_ids=chunk, attention_mask=torch.ones_like(chunk))
        nats = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        total += float(nats) * len(chunk)
    return total / len(ids)


def fit(fp32, steps: int, lr: float, qat: QuantizationAwareTraining, teacher=None, smoke: bool = False):
    module = modules.CausalLM(copy.deepcopy(fp32), lr=lr, warmup=max(1, steps // 5))
    callbacks = [qat]
    if teacher is not None:
        callbacks.append(KnowledgeDistillation(teacher=teacher, alpha=0.5, temperature=1.0))
    limit = {"train": 8, "val": 2, "test": 2} if smoke else None
    trainer(steps, callbacks).fit(module, datamodule=lm_data(batch_size=4, seed=0, limit=limit))
    started = time.time()
    int8 = qat.export(copy.deepcopy(module))
    return int8, round(time.time() - started, 1)


HEAD = ["model.lm_head"]
QAT_STEPS, QAT_LR = 12, 2e-5  # shared with smol_fp32_ft, the float control


def smoke_cut(fp32) -> None:
    """The plumbing only: SmolLM2 cut to its first two decoder layers."""
    fp32.model.layers = fp32.model.layers[:2]
    fp32.config.num_hidden_layers = 2
    fp32.config.layer_types = fp32.config.layer_types[:2] if getattr(fp32.config, "layer_types", None) else None


def int8_callback(mode: str, steps: int, exclude: list[str] | None = None) -> QuantizationAwareTraining:
    return QuantizationAwareTraining(
        exclude=exclude,
        activation_mode=mode,
        reduce_range=False,
        start_after=0,
        freeze_ranges_after=max(1, steps // 2),
        unit="step",
    )


def run(args) -> dict:
    with one_thread():  # everything compared runs on one thread
        return _run(args)


def _run(args) -> dict:
    torch.manual_seed(0)
    smoke = args.smoke
    fp32 = smol()
    test, val = windows("test"), windows("val")
    if smoke:  # two decoder layers, two windows
        smoke_cut(fp32)
        test, val = test[:2], val[:2]
    else:
        val = val[:16]  # choosing needs less than reporting
    out: dict = {"fp32_loss": round(lm_loss(fp32, test), 4)}
    out["fp32_ppl"] = round(ppl(out["fp32_loss"]), 3)
    fp32_val = lm_loss(fp32, val)
    arms: dict = {}
    exported: dict = {}

    def record(name: str, int8, export_s: float) -> None:
        exported[name] = int8
        arms[name] = {
            "bytes": int8.artifact_bytes(),
            "export_s": export_s,
            "val_loss": round(ort_loss(int8, val), 4),
            "loss": round(ort_loss(int8, test), 4),
        }
        arms[name]["ppl"] = round(ppl(arms[name]["loss"]), 3)
        int8._session = None  # the bytes stay (for serving below); ORT's copy of the weights goes
        print(name, arms[name], flush=True)

    calib = 2 if smoke else 8
    for mode in ("static", "dynamic"):
        int8, seconds = fit(fp32, calib, 0.0, int8_callback(mode, calib), smoke=smoke)
        record(f"ptq_{mode}", int8, seconds)
    mode = min(("static", "dynamic"), key=lambda m: arms[f"ptq_{m}"]["val_loss"])  # chosen on validation
    record(f"ptq_{mode}_head_fp32", *fit(fp32, calib, 0.0, int8_callback(mode, calib, HEAD), smoke=smoke))
    ptq = min((f"ptq_{mode}", f"ptq_{mode}_head_fp32"), key=lambda k: arms[k]["val_loss"])  # on validation
    exclude = HEAD if ptq.endswith("head_fp32") else None
    steps = 2 if smoke else QAT_STEPS
    int8, seconds = fit(fp32, steps, QAT_LR, int8_callback(mode, steps, exclude), smoke=smoke)
    record("qat", int8, seconds)
    teacher = modules.CausalLM(copy.deepcopy(fp32))
    int8, seconds = fit(fp32, steps, QAT_LR, int8_callback(mode, steps, exclude), teacher=teacher, smoke=smoke)
    record("qat_kd", int8, seconds)
    del teacher
    best = min((ptq, "qat", "qat_kd"), key=lambda k: arms[k]["val_loss"])  # chosen on validation

    for group in INT4_GROUPS[:1] if smoke else INT4_GROUPS:
        qat = QuantizationAwareTraining(
            weight_bits=4, activation_bits=None, group_size=group, start_after=0, unit="step"
        )
        record(f"int4_g{group}", *fit(fp32, 1, 0.0, qat, smoke=smoke))
    int4 = f"int4_g{INT4_GROUPS[0]}"
    serving_ms = serve(fp32, {"int8": exported[best], int4: exported[int4]}, smoke)
    return {
        **out,
        "loss": arms[best]["loss"],
        "ppl": arms[best]["ppl"],
        "ppl_ratio": round(arms[best]["ppl"] / out["fp32_ppl"], 4),
        "chosen": best,
        "activation_mode": mode,
        "head": "float (tied to the float embedding)" if exclude else "int8",
        "chosen_on": f"validation loss ({len(val)} windows; fp32 {fp32_val:.4f})",
        "arms": arms,
        "int4_note": "groups 128 and 64; not 32, the checkpoint's own Q4_1 blocks (near-lossless by construction)",
        "serving_b1_128_tokens_ms": serving_ms,
        "qat_steps": steps,
        "calibration_steps": calib,
        "batch": "4 x 128 tokens",
        "cpu": serving.cpu_int8_capability(),
        "threads": 1,
        "seed": 0,
    }


def serve(fp32, models: dict, smoke: bool) -> dict:
    ids = windows("test")[:1]
    fns = {"fp32_eager": lambda: fp32(input_ids=ids, use_cache=False).logits}
    for name, m in models.items():
        fns[name] = lambda m=m: m(input_ids=ids, attention_mask=torch.ones_like(ids))
    ms = serving.interleaved_latency_ms(fns, repeats=1 if smoke else 5, rounds=2 if smoke else 5)
    return {k: round(v, 1) for k, v in ms.items()} | {
        f"speedup_{k}": round(ms["fp32_eager"] / v, 2) for k, v in ms.items() if k != "fp32_eager"
    }
