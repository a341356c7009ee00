"""Every sharded scenario in one launch: two gloo processes under Lightning's ``ModelParallelStrategy``
(FSDP2 ``fully_shard`` in ``configure_model``), then, on rank 0 only, a one-process run of each scenario
on the same global batch. Writes ``<out>/<scenario>_<run>.pt`` (full weights, full masks, logged
sparsity) and ``<out>/evidence.json`` (per-rank sizes and timings); the tests in this folder assert on them.

Run by the ``evidence`` fixture in a subprocess with the launcher's environment variables removed:
``strategy``'s launcher re-runs *this script* for rank 1, which inside pytest would re-run pytest.

    python tests/sharded/run_fsdp2.py OUT_DIR [SCENARIO ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

from lightning_slim import (
    CompressionReport,
    IterativeMagnitudePruning,
    KnowledgeDistillation,
    OnlineDataSelection,
    QuantizationAwareTraining,
)
from lightning_slim.core import sharding
from lightning_slim.distillation.callback import PROJECTIONS
from lightning_slim.quantization.export import int8_weights, load_int8
from lightning_slim.quantization.export_call import GraphCall, find_export_call
from lightning_slim.quantization.serving import OrtModel

sys.path.insert(0, str(Path(__file__).parent))  # the scenarios beside this script, run as a script or collected
from scenarios import COMPARED_WITH_DDP, NO_SINGLE, NOT_EXPORTED, RESUMED, SCENARIOS, SINGLE_TOO
from tiny_models import LOCAL_BATCH, STEPS, WORLD


def qat_state(quantize: QuantizationAwareTraining, module: pl.LightningModule) -> dict:
    """What a rank holds that decides how it quantizes: activation ranges, frozen weight scales (the callback's)
    and the folded BatchNorms' running statistics (the model's buffers, per rank under FSDP2)."""
    state = quantize.state_dict()
    bns = {n: m for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    return {
        "phase": state["phase"],
        "activation_ranges": {n: [float(r["min"]), float(r["max"])] for n, r in state["activation_ranges"].items()},
        "frozen_scales": {n: r["scale"].flatten().tolist() for n, r in state["ranges"].items()},
        "bn_statistics": {n: torch.cat([m.running_mean, m.running_var]).tolist() for n, m in bns.items()},
        "bn_training": {n: m.training for n, m in bns.items()},
    }


def trainer(run: str, epochs: int | None = None, checkpoints: Path | None = None) -> pl.Trainer:
    """``epochs``: that many epochs instead of ``STEPS`` steps; ``checkpoints``: save ``last.ckpt`` there."""
    strategies = {"fsdp": ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1), "ddp": "ddp"}
    return pl.Trainer(
        accelerator="cpu",
        devices=1 if run == "single" else WORLD,
        strategy=strategies.get("fsdp" if run == "resumed" else run, "auto"),
        max_steps=-1 if epochs else STEPS,
        max_epochs=epochs,
        logger=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoints is not None,
        callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0)] if checkpoints else None,
    )


def tensors_in(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    items = state.values() if isinstance(state, dict) else state if isinstance(state, list | tuple) else []
    return [t for item in items for t in tensors_in(item)]


def local_bytes(tensors) -> int:
    return sum(sharding.local(t).numel() * t.element_size() for t in tensors)


def export_evidence(module_cls, quantize: QuantizationAwareTraining, weights: dict, path: Path) -> None:
    """The saved int8 file beside a one-process export of the same trained weights (the callback's
    ``export`` of a fresh, unsharded module holding them), run on the same input."""
    reference = module_cls()
    reference.load_state_dict(weights)
    data = module_cls.data()
    call = find_export_call(reference, data[:8], quantize.config.export_module, quantize.config.export_inputs)
    single = quantize.export(reference)
    shipped = load_int8(quantize.saved_path)
    x = data.tensors[0][:8]
    if not isinstance(single, OrtModel):  # torchao: the converted module itself; the saved program takes x
        single = GraphCall(single, call)
    with torch.no_grad():
        outputs = {"shipped": shipped(x), "single": single(x)}
    torch.save(outputs | {"shipped_int8": int8_weights(shipped), "single_int8": int8_weights(single)}, path)


class GlobalOrder(torch.utils.data.Sampler):
    """The one-process reference's order: each epoch's permutation as Lightning's DistributedSampler draws it
    (seed 0 + epoch), so step k of either run sees the same global batch, in every epoch."""

    def __init__(self, size: int):
        self.size, self.epoch = size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


def distillation_evidence(kd: KnowledgeDistillation, module: pl.LightningModule, tr: pl.Trainer) -> dict:
    """Per rank: the teacher's and the feature projections' parameter bytes held, the terms logged at the last
    step (this rank's examples), the teacher's passes and the cache's use, and a digest of the cache."""
    projections = getattr(module, PROJECTIONS, nn.ModuleDict())
    record = {
        "teacher_bytes": local_bytes(kd.teacher.parameters()),
        "projection_bytes": local_bytes(projections.parameters()),
        "projections_sharded": sharding.any_sharded(projections.parameters()),
        "logged": {k.rsplit("/", 1)[1]: float(v) for k, v in tr.callback_metrics.items() if "/distillation/" in k},
        **kd.counts,
    }
    if kd.config.cache_teacher:
        digest = hashlib.sha256(kd.cache.filled.numpy().tobytes())
        for key, value in sorted(kd.cache.values.items()):
            digest.update(key.encode() + value.contiguous().view(torch.uint8).numpy().tobytes())
        record |= {"cache_rows": len(kd.cache), "cache_digest": digest.hexdigest()}
    return record


def run(name: str, out: Path, run_name: str) -> dict:
    """One fit: ``run_name`` is ``"fsdp"``, ``"ddp"``, ``"resumed"`` (two processes each) or ``"single"``
    (rank 0 alone). A scenario in RESUMED trains two epochs; ``"resumed"`` fits the first, then the second
    from the checkpoint, with a fresh module and fresh callbacks."""
    module_cls, make_callbacks = SCENARIOS[name]
    pl.seed_everything(0)
    module, callbacks = module_cls(), make_callbacks()
    epochs = 2 if name in RESUMED else None
    ckpt_path, at_stop = None, {}
    if run_name == "resumed":
        first = trainer(run_name, 1, out / f"{name}_checkpoints")
        first.callbacks.extend(callbacks)
        first.fit(module, DataLoader(module_cls.data(), batch_size=LOCAL_BATCH))
        ckpt_path = str(out / f"{name}_checkpoints" / "last.ckpt")
        at_stop["stopped_at"] = first.global_step
        quantize = next((c for c in callbacks if isinstance(c, QuantizationAwareTraining)), None)
        if quantize is not None:  # each rank's state when Lightning saved rank 0's
            at_stop["qat_at_stop"] = qat_state(quantize, module)
        prune = next((c for c in callbacks if isinstance(c, IterativeMagnitudePruning)), None)
        if prune is not None:  # what each rank's state_dict holds whole (a collective, as when Lightning saves)
            saved = prune.state_dict()
            snapshot = (saved["snapshot"] or {}).get("module", {})
            at_stop["whole_in_state"] = [v is not None for v in [*saved["masks"].values(), *snapshot.values()]]
        pl.seed_everything(0)
        module, callbacks = module_cls(), make_callbacks()
    tr = trainer(run_name, epochs)
    tr.callbacks.extend(callbacks)
    report = next((c for c in callbacks if isinstance(c, CompressionReport)), None)
    if report is not None:
        report.output_path = str(out / f"{name}_{run_name}_report.json")
    quantize = next((c for c in callbacks if isinstance(c, QuantizationAwareTraining)), None)
    if quantize is not None and run_name == "fsdp" and name not in NOT_EXPORTED:  # the sharded export only: time
        suffix = ".pt2" if quantize.config.runtime == "torchao" else ".onnx"
        quantize.config = dataclasses.replace(quantize.config, export_path=str(out / f"{name}_{run_name}{suffix}"))
    data = module_cls.data()
    if run_name != "single":  # Lightning adds a shuffling DistributedSampler (seed PL_GLOBAL_SEED = 0, epoch 0)
        loader = DataLoader(data, batch_size=LOCAL_BATCH)
    else:  # the same global batches: rank r takes permutation[r::WORLD], so step k sees permutation[kB:(k+1)B]
        loader = DataLoader(data, batch_size=LOCAL_BATCH * WORLD, sampler=GlobalOrder(len(data)))
    start = time.perf_counter()
    tr.fit(module, loader, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - start
    record = {"seconds": seconds, "param_bytes": local_bytes(module.parameters()), "steps": tr.global_step}
    if ckpt_path is not None:
        record.update(at_stop, checkpoint_files=sorted(p.name for p in Path(ckpt_path).iterdir()))
    prune = next((c for c in callbacks if isinstance(c, IterativeMagnitudePruning)), None)
    masks = prune.masks if prune is not None else {}
    if prune is not None:
        record.update(
            mask_numel=sum(sharding.local(m).numel() for m in masks.values()),
            mask_bytes=local_bytes(masks.values()),
            masks_sharded=all(sharding.is_sharded(m) for m in masks.values()),
            sparsity=prune._sparsity["sparsity"],
            rounds=prune.round,
        )
        if prune.snapshot is not None:  # rewind state: weights and optimizer state as they were
            record["snapshot_bytes"] = local_bytes(tensors_in(prune.snapshot))
    if quantize is not None:  # logged at the epoch's end, over every rank's rows (quantization_error)
        record.update(
            phase=quantize.phase, weight_error_mean=float(tr.callback_metrics["slim/quantization/weight_error_mean"])
        )
        record["qat"] = qat_state(quantize, module)
    if report is not None:  # rank 0's; the other ranks' are empty
        record["report_before"] = {k: report.before.get(k) for k in ("params", "size_bytes")}
        record["report_after"] = {k: report.after.get(k) for k in ("params", "nonzero_params", "size_bytes", "macs")}
    if prune is not None and prune.snapshot is not None:  # fsdpsel: the step the rewind state is from
        record["snapshot_step"] = prune.snapshot["step"]
    distil = next((c for c in callbacks if isinstance(c, KnowledgeDistillation)), None)
    if distil is not None:  # fsdpkd
        record["distillation"] = distillation_evidence(distil, module, tr)
    select = next((c for c in callbacks if isinstance(c, OnlineDataSelection)), None)
    if select is not None:
        record["ledger"] = select.ledger.summary()  # this rank's
        record["job_ledger"] = select.job_ledger.summary()  # what is logged and reported: every rank's added up
    full_weights = sharding.full_state_dict(module)  # collectives: every rank calls them
    full_masks = {k: sharding.full(m).cpu() for k, m in masks.items()}
    if tr.global_rank == 0:
        torch.save({"weights": full_weights, "masks": full_masks}, out / f"{name}_{run_name}.pt")
    if quantize is not None and quantize.config.export_path and tr.global_rank == 0:
        export_evidence(module_cls, quantize, full_weights, out / f"{name}_{run_name}_export.pt")
    return record


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    torch.set_num_threads(1)
    per_rank: dict = {"fsdp": {}, "ddp": {}}
    for name in names:
        per_rank["fsdp"][name] = run(name, out, "fsdp")
        if name in COMPARED_WITH_DDP:
            per_rank["ddp"][name] = run(name, out, "ddp")
        if name in RESUMED:
            per_rank.setdefault("resumed", {})[name] = run(name, out, "resumed")
    gathered = [None] * WORLD
    torch.distributed.all_gather_object(gathered, per_rank)
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0:
        return
    evidence: dict = {k: {n: [g[k][n] for g in gathered] for n in v} for k, v in per_rank.items()}
    singles = [n for n in names if n in SINGLE_TOO or n not in COMPARED_WITH_DDP + RESUMED + NO_SINGLE]
    evidence["single"] = {n: run(n, out, "single") for n in singles}
    (out / "evidence.json").write_text(json.dumps(evidence, indent=1))


if __name__ == "__main__":
    main()
