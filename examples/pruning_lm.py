"""Prune a small Llama in plain PyTorch (no Trainer): unstructured 50%, 2:4, Wanda 2:4, whole
attention heads + MLP channels (torch-pruning, weight magnitude), and a student at half the
non-embedding parameters cut by activation importance (``cut_student``, the recipe for pretrained
transformers), each fine-tuned briefly; prints validation losses, MACs and latency.

    flock /tmp/slim_bench.lock python examples/pruning_lm.py --out lm_pruning.json   # ~3 minutes, 1 thread

Data: a byte corpus made of Python standard-library sources (``os.path.dirname(os.__file__)``;
the files below), printable ASCII as 96 symbols, first 90% train / last 10% validation. Its
contents follow the Python version. Everything uses ``lightning_slim.pruning``'s functions, as
a plain training loop or a benchmark would.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_slim.pruning import apply_masks, calibrate, prune, select_tensors
from lightning_slim.pruning.activations import activation_importance, weight_importance
from lightning_slim.pruning.heads import sync_configs, transformer_plan
from lightning_slim.pruning.structured import channel_prune
from lightning_slim.pruning.student import StudentShape, cut, cut_student, nonembedding_parameters
from lightning_slim.pruning.tensors import tensor_of

FILES = [
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "argparse.py",
    "difflib.py",
    "pprint.py",
    "calendar.py",
    "inspect.py",
]


def corpus(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(os.path.dirname(os.__file__))
    raw = torch.frombuffer(bytearray(b"\n".join((root / f).read_bytes() for f in FILES)), dtype=torch.uint8).long()
    ids = torch.where(raw == 10, torch.full_like(raw, 95), (raw - 32).clamp(0, 94))
    cut = int(0.9 * len(ids))
    windows = lambda d: d[: len(d) // seq * seq].reshape(-1, seq)
    return windows(ids[:cut]), windows(ids[cut:])


def batches(train: torch.Tensor, steps: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield train[torch.randint(len(train), (batch,), generator=g)]


def train(model, train_ids, steps, lr, seed, masks=None, targets=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    for ids in batches(train_ids, steps, 16, seed):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if masks:  # the zeros stay zeros: re-apply after every step (what the callback does)
            apply_masks({n: tensor_of(model, t) for n, t in targets.items()}, masks)


@torch.no_grad()
def val_loss(model, val_ids) -> float:
    model.eval()
    return sum(float(model(input_ids=v, labels=v).loss) for v in val_ids.split(64)) / len(val_ids.split(64))


def macs(model, seq) -> int:
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    ops, _ = tp.utils.count_ops_and_params(_Logits(m), torch.zeros(1, seq, dtype=torch.long))
    return int(ops)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


@torch.no_grad()
def latency_ms(models: dict, seq: int, repeats: int = 30) -> dict[str, float]:
    """Batch-1 forward of ``seq`` tokens, models interleaved, median (ms)."""
    ids = torch.randint(0, 96, (1, seq))
    times = {k: [] for k in models}
    for m in models.values():
        m.eval()(input_ids=ids)  # warm up
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            m(input_ids=ids)
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(out: str | None, dense_steps: int, tune_steps: int) -> dict:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    start = time.time()
    seq = 64
    train_ids, val_ids = corpus(seq)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    dense = LlamaForCausalLM(cfg)
    train(dense, train_ids, dense_steps, 3e-3, seed=0)
    results = {"dense_before_finetune": val_loss(dense, val_ids)}
    linear = ["re:.*(q|k|v|o|gate|up|down)_proj"]  # every Linear of the decoder layers (lm_head, embeddings dense)
    variants = {
        "dense": {},
        "unstructured_50": dict(scope="layer"),
        "2:4": dict(pattern="2:4"),
        "wanda_2:4": dict(pattern="2:4", importance="wanda"),
    }
    for name, kw in variants.items():
        model = copy.deepcopy(dense)
        masks, targets = None, None
        if kw:
            targets = select_tensors(model, linear)
            stats = calibrate(model, targets, [{"input_ids": b} for b in batches(train_ids, 8, 16, seed=99)])
            masks = prune(model, 0.5, targets=linear, stats=stats, **kw)
            results[f"{name}_before_finetune"] = val_loss(model, val_ids)
        train(model, train_ids, tune_steps, 1e-3, seed=1, masks=masks, targets=targets)
        results[name] = val_loss(model, val_ids)
    # heads + MLP channels: half of the heads and of the MLP width, the residual stream unchanged
    small = copy.deepcopy(dense)
    roots, heads, _ = transformer_plan(small, heads=True)
    mods = dict(small.named_modules())
    channel_prune(
        small,
        {"input_ids": torch.zeros(1, 8, dtype=torch.long)},
        [mods[r] for r in roots],
        0.5,
        num_heads={mods[n]: h for n, h in heads.items()},
    )
    config = sync_configs(small)
    results["heads_mlp_before_finetune"] = val_loss(small, val_ids)
    train(small, train_ids, tune_steps, 1e-3, seed=1)
    lat = latency_ms({"dense": dense, "pruned": small}, 256)
    results["heads_mlp"] = {
        "loss": val_loss(small, val_ids),
        "macs_ratio": macs(dense, 256) / macs(small, 256),
        "params_ratio": sum(p.numel() for p in dense.parameters()) / sum(p.numel() for p in small.parameters()),
        "latency_speedup": lat["dense"] / lat["pruned"],
        "latency_ms": lat,
        "config": config,
    }
    # the recipe for pretrained transformers: score channels, heads and layers from activations on
    # calibration batches, search depth x heads for the student at half the non-embedding parameters
    # (lowest validation loss right after the cut), then fine-tune; beside it the same shape by weight magnitude
    calibration = [{"input_ids": b} for b in batches(train_ids, 4, 16, seed=99)]
    scores = activation_importance(dense, calibration)
    student, search = cut_student(
        dense, scores, 0.5, lambda m: val_loss(m, val_ids), depths=[4, 3], heads=[(4, 1), (3, 1), (2, 1)], multiple=16
    )
    shape = StudentShape(*(search[k] for k in ("layers", "kv_heads", "queries_per_kv", "intermediate_size")))
    by_weight = copy.deepcopy(dense)
    cut(by_weight, shape, weight_importance(dense), search["kept_layers"])
    row = {"shape": {**asdict(shape), "kept_layers": search["kept_layers"]}, "params_ratio": search["params_ratio"]}
    for name, model in (("activation", student), ("weight_magnitude", by_weight)):
        row[f"{name}_before_finetune"] = val_loss(model, val_ids)
        train(model, train_ids, tune_steps, 1e-3, seed=1)
        row[name] = val_loss(model, val_ids)
    row["nonembedding_params"] = nonembedding_parameters(student)
    results["student_50"] = row
    results.update(
        dense_steps=dense_steps,
        tune_steps=tune_steps,
        wall_s=round(time.time() - start, 1),
        model="Llama 4 layers, width 128, 4 heads, MLP 384; seq 64, batch 16, AdamW",
    )
    print(json.dumps(results, indent=1))
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--tune-steps", type=int, default=150)
    args = parser.parse_args()
    main(args.out, args.dense_steps, args.tune_steps)
