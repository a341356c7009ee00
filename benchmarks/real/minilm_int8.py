"""all-MiniLM-L6-v2 in int8 beside a peer's int8 ONNX file of the same model (issue 19).

Every arm is a Lightning ``Trainer`` fit of the user-style ``SentenceEncoder`` (no ``forward``; its
``training_step`` calls ``self.model``, the model left in eval mode as ``from_pretrained`` returns it)
with ``QuantizationAwareTraining`` (the word embedding quantized too), then ``qat.export``: an ONNX
file of ``model`` with inputs ``input_ids`` and ``attention_mask``. Arms:

- ``ptq``: the callback at learning rate 0 for 8 steps (they only calibrate static ranges);
- ``qat``: the sentence-transformers contrastive loss on the training pairs;
- ``qat_kd``: the same plus ``KnowledgeDistillation`` from the fp32 model (its last hidden states).

Each arm runs with static per-tensor and with dynamic per-token activations (``activation_mode``);
the arm reported on top is the one with the best cosine on the validation paragraphs. Held-out
"sentences" are the paragraphs of the split's topics (both members of each pair), truncated at 128
tokens. Quality: cosine of the mean-pooled, normalised embeddings to fp32 PyTorch's, and
nearest-neighbour agreement (each paragraph's nearest other paragraph, fp32 vs quantized). Latency:
one thread, the three models timed interleaved in one process (medians), batch 1 (one paragraph) and
batch 32 (padded to the longest).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from lightning_slim import KnowledgeDistillation, QuantizationAwareTraining
from lightning_slim.demos import modules, pretrained, text
from lightning_slim.quantization import serving
from real.common import one_thread, trainer

MAX_LENGTH = 128
ARMS = ("ptq", "qat", "qat_kd")
MODES = ("static", "dynamic")


def paragraphs(split: str) -> list[str]:
    return [p for pair in text.paragraph_pairs(split) for p in pair]


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def embed(hidden_fn, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, normalised embeddings; ``hidden_fn(input_ids, attention_mask)`` -> hidden states."""
    out = []
    for i in range(0, len(texts), batch_size):
        b = encode(tokenizer, texts[i : i + batch_size])
        out.append(modules.mean_pool(torch.as_tensor(hidden_fn(**b)), b["attention_mask"]))
    return torch.cat(out)


def quality(reference: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    cos = (reference * emb).sum(-1)
    a, b = reference @ reference.t(), emb @ emb.t()
    a.fill_diagonal_(-2.0)
    b.fill_diagonal_(-2.0)
    return {
        "cosine_mean": round(float(cos.mean()), 5),
        "cosine_min": round(float(cos.min()), 5),
        "neighbour_agreement": round(float((a.argmax(1) == b.argmax(1)).float().mean()), 4),
    }


def peer_hidden(session):
    def run(input_ids, attention_mask):
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return session.run(None, feed)[0]

    return run


def fit_arm(fp32, tokenizer, arm: str, mode: str, steps: int, smoke: bool):
    """One fit with the callbacks; returns the exported ``OrtModel``."""
    module = modules.SentenceEncoder(copy.deepcopy(fp32), lr=0.0 if arm == "ptq" else 1e-5, warmup=max(1, steps // 10))
    qat = QuantizationAwareTraining(
        targets=["Linear", "Embedding"],
        activation_mode=mode,
        reduce_range=False,  # 8-bit weights: exact u8 x s8 on VNNI/AMX/ARM, x64quantprecision on AVX2 (serving)
        start_after=0,
        freeze_ranges_after=max(1, steps // 2),
        unit="step",
    )
    callbacks = [qat]
    if arm == "qat_kd":
        teacher = modules.SentenceEncoder(copy.deepcopy(fp32))
        callbacks.append(
            KnowledgeDistillation(
                teacher=teacher, alpha=0.0, features={"pairs": {"model": "model"}, "loss": "mse", "weight": 100.0}
            )
        )
    limit = {"train": 32, "val": 8, "test": 8} if smoke else None
    data = text.pair_datamodule(tokenizer, max_length=MAX_LENGTH // 2, batch_size=16, seed=0, limit=limit)
    trainer(steps, callbacks).fit(module, datamodule=data)
    return qat.export(copy.deepcopy(module))


def latency(models: dict, tokenizer, texts: list[str], smoke: bool) -> dict[str, dict[str, float]]:
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    median = texts[int(np.argsort(lengths)[len(texts) // 2])]
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for label, batch_texts, repeats in (("b1", [median], 20), ("b32", texts[:32], 3)):
        b = encode(tokenizer, batch_texts)
        fns = {name: (lambda fn=fn, b=b: fn(**b)) for name, fn in models.items()}
        ms = serving.interleaved_latency_ms(fns, repeats=1 if smoke else repeats, rounds=2 if smoke else 5)
        for name, v in ms.items():
            out[name][label] = round(v, 2)
    return out


def run(args) -> dict:
    with one_thread():  # everything compared runs on one thread
        return _run(args)


def _run(args) -> dict:
    torch.manual_seed(0)
    fp32, tokenizer = pretrained.load_minilm()
    val, test = paragraphs("val"), paragraphs("test")
    if args.smoke:
        val, test = val[:16], test[:16]

    def fp32_hidden(input_ids, attention_mask):
        return fp32(input_ids=input_ids, attention_mask=attention_mask)[0]

    reference = {"val": embed(fp32_hidden, tokenizer, val), "test": embed(fp32_hidden, tokenizer, test)}
    steps, calibration = (4, 2) if args.smoke else (60, 8)  # PTQ: 8 batches of 16 pairs calibrate
    results, exported = {}, {}
    plan = [("dynamic", "ptq"), ("dynamic", "qat_kd")] if args.smoke else [(m, a) for m in MODES for a in ARMS]
    for mode, arm in plan:
        key = f"{arm}_{mode}"
        arm_steps = min(steps, calibration) if arm == "ptq" else steps
        exported[key] = int8 = fit_arm(fp32, tokenizer, arm, mode, arm_steps, args.smoke)
        results[key] = {
            "bytes": int8.artifact_bytes(),
            "val": quality(reference["val"], embed(int8, tokenizer, val)),
            "test": quality(reference["test"], embed(int8, tokenizer, test)),
        }
        print(key, results[key], flush=True)
    chosen = max(results, key=lambda k: results[k]["val"]["cosine_mean"])  # chosen on validation
    peer_session = serving.session(pretrained.peer_minilm_onnx())
    peer = peer_hidden(peer_session)
    peer_quality = quality(reference["test"], embed(peer, tokenizer, test))
    timed = latency({"ours": exported[chosen], "peer": peer, "fp32_eager": fp32_hidden}, tokenizer, test, args.smoke)
    return {
        **results[chosen]["test"],
        "bytes": results[chosen]["bytes"],
        "peer_bytes": serving.artifact_bytes(pretrained.peer_minilm_onnx()),
        "peer_cosine_mean": peer_quality["cosine_mean"],
        "peer_quality": peer_quality,
        "latency_ms": timed["ours"],
        "peer_latency_ms": timed["peer"],
        "fp32_eager_latency_ms": timed["fp32_eager"],
        "chosen": chosen,
        "chosen_on": "validation cosine_mean",
        "arms": results,
        "steps": steps,
        "calibration_steps": calibration,
        "sentences": {"val": len(val), "test": len(test)},
        "cpu": serving.cpu_int8_capability(),
        "threads": 1,
        "seed": 0,
    }
