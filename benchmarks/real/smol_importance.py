"""Which importance to cut SmolLM2-135M-Instruct by: the measurements behind the pruning card's
section "Pretrained transformers" and the settings of the ``smol_student`` arm. All on the
validation split (``WINDOWS`` windows of 128 tokens), importance from ``CALIBRATION`` training windows:

- a 25% MLP cut (1536 -> 1152 channels in every layer) by weight magnitude (``weight_importance``
  and torch-pruning's own ``channel_prune``, the structured path) vs by activation;
- head cuts of the 9/3 grouped-query attention: a whole key/value group (-> 6/2) or one query head
  in every group (-> 6/3), by weight vs by activation;
- depth: the loss without each contiguous run of 10 layers (what ``choose_layers`` measures) beside
  the angular distance across the run (Gromov et al. 2024) and the summed block influence (ShortGPT),
  with their rank correlations and the run each picks;
- the student grid at half the non-embedding parameters (``cut_student``'s candidates), with the
  weight-magnitude cut of the four best shapes.

    python benchmarks/real/smol_importance.py      # about 15 minutes on 2 quiet cores
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fair_cpu, machine

from lightning_slim.pruning.activations import activation_importance, weight_importance
from lightning_slim.pruning.depth import angular_distances, choose_layers
from lightning_slim.pruning.heads import sync_configs, transformer_plan
from lightning_slim.pruning.structured import channel_prune
from lightning_slim.pruning.student import StudentShape, cut, cut_student
from lightning_slim.pruning.width import keep_heads, keep_mlp_channels
from real.common import lm_loss, smol, windows

WINDOWS = 16
CALIBRATION = 16
DROP = 10
DEPTHS = (30, 27, 24, 20, 15)
HEADS = ((3, 3), (2, 3), (3, 2), (2, 2))


def ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().float()


def spearman(a: list[float], b: list[float]) -> float:
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def main(out: str) -> dict:
    started = time.time()
    teacher = smol()
    val, train = windows("val")[:WINDOWS], windows("train")
    loss = lambda m: lm_loss(m, val)
    scores = activation_importance(teacher, [{"input_ids": train[i : i + 8]} for i in range(0, CALIBRATION, 8)])
    weights = weight_importance(teacher)
    result: dict = {"teacher": loss(teacher)}

    def cut_copy(fn) -> float:
        model = copy.deepcopy(teacher)
        fn(model)
        return loss(model)

    def torch_pruning(model):
        roots, _, _ = transformer_plan(model, heads=False)
        modules = dict(model.named_modules())
        channel_prune(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, [modules[r] for r in roots], 0.25)
        sync_configs(model)

    result["mlp_25"] = {
        "weight_magnitude": cut_copy(lambda m: keep_mlp_channels(m, 1152, weights.mlp)),
        "torch_pruning_magnitude": cut_copy(torch_pruning),
        "activation": cut_copy(lambda m: keep_mlp_channels(m, 1152, scores.mlp)),
    }
    result["heads"] = {
        f"{kv}x{q}_{name}": cut_copy(lambda m, kv=kv, q=q, s=s: keep_heads(m, kv, q, s.heads))
        for kv, q in ((2, 3), (3, 2))
        for name, s in (("weight_magnitude", weights), ("activation", scores))
    }
    print(json.dumps(result, indent=1), flush=True)

    _, losses = choose_layers(teacher, 30 - DROP, loss)
    angle = angular_distances(scores.similarity, DROP)
    sim = scores.similarity
    influence = {}  # ShortGPT's block influence 1 - cos(state before, state after), summed over the run
    for run in losses:
        first, last = map(int, run.split("-"))
        influence[run] = sum(1 - float(sim[i, i + 1]) for i in range(first, last + 1))
    keys = list(losses)
    pick = lambda d: min(d, key=d.get)
    result["depth"] = {
        "drop": DROP,
        "loss": losses,
        "angular_distance": angle,
        "block_influence": influence,
        "spearman_angular": spearman([angle[k] for k in keys], [losses[k] for k in keys]),
        "spearman_block_influence": spearman([influence[k] for k in keys], [losses[k] for k in keys]),
        "picks": {
            c: {"run": pick(d), "loss": losses[pick(d)]}
            for c, d in (("loss", losses), ("angular", angle), ("block_influence", influence))
        },
    }
    print(json.dumps(result["depth"]["picks"]), flush=True)

    _, search = cut_student(teacher, scores, 0.5, loss, DEPTHS, HEADS)
    best = sorted(search["candidates"], key=lambda c: c["loss"])
    for c in best[:4]:
        shape = StudentShape(*(c[k] for k in ("layers", "kv_heads", "queries_per_kv", "intermediate_size")))
        c["weight_magnitude_loss"] = cut_copy(lambda m, s=shape, k=c["kept_layers"]: cut(m, s, weights, k))
    result["student_50"] = best
    result.update(
        windows=WINDOWS,
        calibration_windows=CALIBRATION,
        split="val",
        machine=machine(),
        wall_s=round(time.time() - started, 1),
    )
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/smol_importance.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fair_cpu(args.threads)
    main(args.out)
