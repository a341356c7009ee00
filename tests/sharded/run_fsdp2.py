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
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

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

LOCAL_BATCH, WORLD = 4, 2  # the one-process reference trains on batches of LOCAL_BATCH * WORLD
STEPS = 6


class TinyLlama(pl.LightningModule):
    """A real transformers Llama from a small config; an odd vocabulary makes lm_head's shards uneven (32/31 rows)."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=63,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        self.model = LlamaForCausalLM(config)

    def configure_model(self):
        if self.device_mesh is None:  # the one-process reference: unsharded
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:  # per decoder layer, as users shard
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    @staticmethod
    def data() -> TensorDataset:
        return TensorDataset(
            torch.randint(0, 63, (LOCAL_BATCH * WORLD * STEPS, 16), generator=torch.Generator().manual_seed(1))
        )


class TinyCNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(48, 10),
        )

    def configure_model(self):
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for i in (0, 3):
            fully_shard(self.net[i], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    @staticmethod
    def data() -> TensorDataset:
        g = torch.Generator().manual_seed(1)
        n = LOCAL_BATCH * WORLD * STEPS
        return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def llama_teacher():
    """A replicated, frozen teacher: the same architecture, its own initialisation (identical on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return TinyLlama().model


def cnn_teacher():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return TinyCNN().net


def pruning(**kwargs) -> IterativeMagnitudePruning:
    return IterativeMagnitudePruning(accuracy_metric=None, **kwargs)


# --- fsdpkd helpers ---
class IndexedLlama(TinyLlama):
    """TinyLlama whose batches carry each example's dataset index, ``(tokens, labels, index)``: the cache's key."""

    def training_step(self, batch, batch_idx):
        tokens, labels, _ = batch
        return self.model(input_ids=tokens, labels=labels, use_cache=False).loss

    @staticmethod
    def data() -> TensorDataset:
        (tokens,) = TinyLlama.data().tensors
        return TensorDataset(tokens, tokens, torch.arange(len(tokens)))


class RepeatedLlama(IndexedLlama):
    """Twelve examples, each four times (its index is the example's): with the cache shared across ranks, at
    step 2 (seed 0) rank 0 has seen all of its batch and rank 1 has not, and at several steps both ranks
    compute one example at once."""

    @staticmethod
    def data() -> TensorDataset:
        (tokens,) = TinyLlama.data().tensors
        index = torch.arange(len(tokens)) % 12
        return TensorDataset(tokens[index], tokens[index], index)


def wide_llama_teacher():
    """A teacher wider than the student (hidden 48 against 32): feature pairs need a learned projection."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        student = TinyLlama().model.config
        return LlamaForCausalLM(type(student)(**{**student.to_dict(), "hidden_size": 48, "head_dim": 12}))


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


# --- end fsdpkd helpers ---
# name: (module class, callbacks factory)
SCENARIOS = {
    # one-shot at step 0: masks from the same initial weights, so equal to the one-process masks bit for bit
    "llama_global": (
        TinyLlama,
        lambda: [pruning(schedule={"kind": "one_shot", "sparsity": 0.6, "at": 0, "unit": "step"})],
    ),
    "llama_layer": (
        TinyLlama,
        lambda: [pruning(schedule={"kind": "one_shot", "sparsity": 0.5, "at": 0, "unit": "step"}, scope="layer")],
    ),
    "llama_2of4": (
        TinyLlama,
        lambda: [pruning(schedule={"kind": "one_shot", "sparsity": 0.5, "at": 0, "unit": "step"}, pattern="2:4")],
    ),
    # IMP: rounds at steps 2 and 4 on trained weights, rewinding to step 1
    "llama_imp_rewind": (
        TinyLlama,
        lambda: [
            pruning(
                schedule={"kind": "imp", "rounds": 2, "rate": 0.5, "every": 2, "unit": "step"},
                rewind="step",
                rewind_step=1,
            )
        ],
    ),
    "llama_plain": (TinyLlama, lambda: []),  # what the distillation runs are told apart from
    "llama_kd": (TinyLlama, lambda: [KnowledgeDistillation(teacher=llama_teacher(), alpha=0.5, temperature=2.0)]),
    "llama_kd_pruned": (
        TinyLlama,
        lambda: [
            KnowledgeDistillation(teacher=llama_teacher(), alpha=0.5, temperature=2.0),
            pruning(schedule={"kind": "one_shot", "sparsity": 0.5, "at": 2, "unit": "step"}),
        ],
    ),
    # the report's numbers of the deployed model: built from the full state dict on rank 0
    "llama_report": (
        TinyLlama,
        lambda: [
            pruning(schedule={"kind": "one_shot", "sparsity": 0.6, "at": 0, "unit": "step"}),
            CompressionReport(accuracy_metric=None, loss_metric=None, measure_latency=False, evaluate_export=False),
        ],
    ),
    "cnn_global": (TinyCNN, lambda: [pruning(schedule={"kind": "one_shot", "sparsity": 0.7, "at": 0, "unit": "step"})]),
    # selection is per rank (each rank keeps the best of its own super-batch), as under DDP: compared with DDP
    "cnn_select": (TinyCNN, lambda: [OnlineDataSelection(keep=0.5, score="hard")]),
    "cnn_together": (
        TinyCNN,
        lambda: [
            OnlineDataSelection(keep=0.5, score="hard"),
            KnowledgeDistillation(teacher=cnn_teacher(), alpha=0.5, temperature=2.0),
            pruning(schedule={"kind": "one_shot", "sparsity": 0.5, "at": 2, "unit": "step"}),
        ],
    ),
    # two epochs; "resumed" stops after the first and resumes from Lightning's distributed checkpoint
    "llama_resume": (
        TinyLlama,
        lambda: [
            KnowledgeDistillation(teacher=llama_teacher(), alpha=0.5, temperature=2.0),
            pruning(
                schedule={"kind": "gradual", "final_sparsity": 0.6, "start": 2, "end": 10, "every": 2, "unit": "step"}
            ),
        ],
    ),
    # fake quantization from step 2; static activation ranges averaged across ranks as under DDP: compared with
    # DDP; the int8 export (export_path, set per run) built on rank 0 from the full state dict
    "cnn_qat": (TinyCNN, lambda: [QuantizationAwareTraining(start_after=2, unit="step", fold_bn=False)]),
    # the teacher's top-k and paired hidden states cached by dataset index and shared across ranks: two
    # epochs, the second served from the cache; compared with one process over both epochs and resumed from
    # the distributed checkpoint (the cache, and the sharded feature projection)
    "llama_kd_cache": (
        IndexedLlama,
        lambda: [
            KnowledgeDistillation(
                teacher=wide_llama_teacher(),
                alpha=0.5,
                temperature=2.0,
                cache_teacher={"top_k": 8},
                features={"pairs": {"model.model.layers.1": "model.layers.1"}, "pooling": "token", "weight": 100.0},
            )
        ],
    ),
    # a hidden-state pair through a learned projection (32 -> 48), sharded with FSDP2 as the student is;
    # weighted up: the hidden states of a fresh Llama are small (an MSE of 0.01), and the projections must move
    "llama_kd_features": (
        TinyLlama,
        lambda: [
            KnowledgeDistillation(
                teacher=wide_llama_teacher(),
                alpha=0.5,
                temperature=2.0,
                features={"pairs": {"model.model.layers.1": "model.layers.1"}, "pooling": "token", "weight": 100.0},
            )
        ],
    ),
    # repeated examples through the shared cache (full logits): one process, and the same fit with the teacher
    # sharded over the ranks (its forward a collective even where a rank's batch is all cached); the report
    # measures the teacher on rank 0 (gathered when sharded)
    "llama_kd_repeats": (
        RepeatedLlama,
        lambda: [
            KnowledgeDistillation(teacher=llama_teacher(), alpha=0.5, temperature=2.0, cache_teacher=True),
            CompressionReport(accuracy_metric=None, loss_metric=None, measure_latency=False, evaluate_export=False),
        ],
    ),
    "llama_kd_shard_teacher": (
        RepeatedLlama,
        lambda: [
            KnowledgeDistillation(
                teacher=llama_teacher(), alpha=0.5, temperature=2.0, cache_teacher=True, teacher_sharding="shard"
            ),
            CompressionReport(accuracy_metric=None, loss_metric=None, measure_latency=False, evaluate_export=False),
        ],
    ),
    # --- fsdpkd ---
}
COMPARED_WITH_DDP = ("cnn_select", "cnn_together", "cnn_qat")
RESUMED = ("llama_resume", "llama_kd_cache")
# no one-process run: compared with DDP, with their own uninterrupted fit, or with another sharded run
NO_SINGLE = (*COMPARED_WITH_DDP, "llama_resume", "llama_kd_shard_teacher")


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
    single = quantize.export(reference)
    shipped = load_int8(quantize.saved_path)
    x = module_cls.data().tensors[0][:8]
    with torch.no_grad():
        outputs = {"shipped": shipped(x), "single": single(x)}
    torch.save(outputs | {"shipped_int8": int8_weights(shipped), "single_int8": int8_weights(single)}, path)


def run(name: str, out: Path, run_name: str) -> dict:
    """One fit: ``run_name`` is ``"fsdp"``, ``"ddp"``, ``"resumed"`` (two processes each) or ``"single"``
    (rank 0 alone). A scenario in RESUMED trains two epochs; ``"resumed"`` fits the first, then the second
    from the checkpoint, with a fresh module and fresh callbacks."""
    module_cls, make_callbacks = SCENARIOS[name]
    pl.seed_everything(0)
    module, callbacks = module_cls(), make_callbacks()
    epochs = 2 if name in RESUMED else None
    ckpt_path = None
    if run_name == "resumed":
        first = trainer(run_name, 1, out / f"{name}_checkpoints")
        first.callbacks.extend(callbacks)
        first.fit(module, DataLoader(module_cls.data(), batch_size=LOCAL_BATCH))
        ckpt_path = str(out / f"{name}_checkpoints" / "last.ckpt")
        stopped_at = first.global_step
        pl.seed_everything(0)
        module, callbacks = module_cls(), make_callbacks()
    tr = trainer(run_name, epochs)
    tr.callbacks.extend(callbacks)
    report = next((c for c in callbacks if isinstance(c, CompressionReport)), None)
    if report is not None:
        report.output_path = str(out / f"{name}_{run_name}_report.json")
    quantize = next((c for c in callbacks if isinstance(c, QuantizationAwareTraining)), None)
    if quantize is not None and run_name == "fsdp":  # the sharded export only: the suite's time is short
        quantize.config = dataclasses.replace(quantize.config, export_path=str(out / f"{name}_{run_name}.onnx"))
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
        record.update(stopped_at=stopped_at, checkpoint_files=sorted(p.name for p in Path(ckpt_path).iterdir()))
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
    if report is not None:  # rank 0's; the other ranks' are empty
        record["report_before"] = {k: report.before.get(k) for k in ("params", "size_bytes")}
        record["report_after"] = {k: report.after.get(k) for k in ("params", "nonzero_params", "size_bytes", "macs")}
    distil = next((c for c in callbacks if isinstance(c, KnowledgeDistillation)), None)
    if distil is not None:
        record["distillation"] = distillation_evidence(distil, module, tr)
    select = next((c for c in callbacks if isinstance(c, OnlineDataSelection)), None)
    if select is not None:
        record["ledger"] = select.ledger.summary()
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
    evidence["single"] = {n: run(n, out, "single") for n in names if n not in NO_SINGLE}
    (out / "evidence.json").write_text(json.dumps(evidence, indent=1))


if __name__ == "__main__":
    main()
