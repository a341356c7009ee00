"""The sharded scenarios: which tiny model (``tiny_models.py``) and which callbacks each scenario
attaches, and which runs each gets (``run_fsdp2.py`` runs them; the tests in this folder read the
evidence). A scenario in ``COMPARED_WITH_DDP`` is compared with a two-process DDP fit (per-rank
semantics: selection, averaged ranges), one in ``RESUMED`` trains two epochs and is also resumed from
the checkpoint of the first; the others are compared with a one-process fit of the same global batch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lightning_slim import (
    CompressionReport,
    IterativeMagnitudePruning,
    KnowledgeDistillation,
    LowRankFactorization,
    OnlineDataSelection,
    QuantizationAwareTraining,
)

sys.path.insert(0, str(Path(__file__).parent))  # beside this file, imported as a script's module or collected
from tiny_models import (
    IndexedCNN,
    IndexedLlama,
    RepeatedLlama,
    ScheduledCNN,
    TinyCNN,
    TinyCNNBN,
    TinyLlama,
)


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


# --- fsdpqat helpers ---
def qat_with_bn(runtime: str) -> QuantizationAwareTraining:
    """Fake quantization from step 2, weight scales and activation ranges frozen at step 4 (before a resumed
    run's stop after epoch 1, step 6), the folded BatchNorms' statistics frozen at step 8 (after it)."""
    return QuantizationAwareTraining(
        start_after=2, freeze_ranges_after=4, freeze_bn_after=8, unit="step", fold_bn=True, runtime=runtime
    )


def cnn_reference_losses() -> torch.Tensor:
    """The frozen reference's loss on every example, by dataset index (what ``compute_reference_losses`` makes)."""
    x, y, _ = IndexedCNN.data().tensors
    with torch.no_grad():
        return nn.functional.cross_entropy(cnn_teacher().eval()(x), y, reduction="none")


def cnn_pair_losses(model, batch) -> torch.Tensor:
    """A batch-level loss for JEST: entry (i, j) is example i's cross-entropy against example j's label."""
    net = model.net if isinstance(model, TinyCNN) else model
    x, y = batch[0], batch[1]
    return -torch.log_softmax(net(x), dim=-1)[:, y]


def imp_resumable(rewind: str = "none", **kwargs) -> list[IterativeMagnitudePruning]:
    """IMP rounds at steps 4 and 8, in a resumed two-epoch fit one on either side of the stop; rewinding to
    step 1 ("init": 0)."""
    schedule = {"kind": "imp", "rounds": 2, "rate": 0.5, "every": 4, "unit": "step"}
    return [pruning(schedule=schedule, rewind=rewind, rewind_step=int(rewind in ("step", "lr")), **kwargs)]


def wanda(sparsity: float, **kwargs) -> list[IterativeMagnitudePruning]:
    """Wanda at step 1, scoring by the inputs of step 0."""
    schedule = {"kind": "one_shot", "sparsity": sparsity, "at": 1, "unit": "step"}
    return [pruning(schedule=schedule, importance="wanda", **kwargs)]


# --- fsdpsel ---
def wide_llama_teacher():
    """A teacher wider than the student (hidden 48 against 32): feature pairs need a learned projection."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        student = TinyLlama().model.config
        return LlamaForCausalLM(type(student)(**{**student.to_dict(), "hidden_size": 48, "head_dim": 12}))


# --- fsdpkd ---


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
    # QAT on the transformer LM, per-token dynamic activations (the recipe for pretrained LMs): compared with DDP,
    # whose summation order is the same (one process's differs by rounding that flips some int8 roundings)
    "llama_qat": (
        TinyLlama,
        lambda: [QuantizationAwareTraining(start_after=2, unit="step", activation_mode="dynamic")],
    ),
    # all four techniques and the report in one Trainer: compared with DDP (selection and ranges are per rank)
    "cnn_all": (
        TinyCNN,
        lambda: [
            OnlineDataSelection(keep=0.5, score="hard"),
            KnowledgeDistillation(teacher=cnn_teacher(), alpha=0.5, temperature=2.0),
            pruning(schedule={"kind": "one_shot", "sparsity": 0.5, "at": 2, "unit": "step"}),
            QuantizationAwareTraining(start_after=3, unit="step", fold_bn=False),
            CompressionReport(accuracy_metric=None, loss_metric=None, measure_latency=False, evaluate_export=False),
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
    # BatchNorms folded, weight scales / ranges and BatchNorm statistics frozen, two epochs: compared with DDP
    # (ranges and BatchNorm statistics averaged across ranks in both) and resumed after the first; int8 export
    "cnn_bn_qat": (TinyCNNBN, lambda: [qat_with_bn("onnxruntime")]),
    "cnn_bn_qat_torchao": (TinyCNNBN, lambda: [qat_with_bn("torchao")]),
    # --- fsdpqat ---
    # fsdpsel: the rewind snapshot (weights and momentum; or the LR schedule) kept across a resume
    "llama_imp_rewind_resume": (TinyLlama, lambda: imp_resumable("step")),
    "cnn_imp_lr_resume": (ScheduledCNN, lambda: imp_resumable("lr")),
    "cnn_imp_init_resume": (TinyCNN, lambda: imp_resumable("init")),  # before any step: no momentum yet
    # Wanda from the norms of step 0's inputs, every rank's reduced over the global batch; convolutions (a norm
    # per kernel tap, row-dependent norm matrices) ranked globally across shards
    "llama_wanda": (TinyLlama, lambda: wanda(0.5)),
    "llama_2of4_wanda": (TinyLlama, lambda: wanda(0.5, pattern="2:4")),
    "cnn_wanda": (TinyCNN, lambda: wanda(0.6, scope="global")),
    # Wanda rounds at steps 4 and 8: the norms of steps 4-5, per rank, cross the resume at step 6
    "cnn_wanda_resume": (TinyCNN, lambda: imp_resumable(importance="wanda")),
    # selection against a frozen, replicated reference; its precomputed losses by global index; JEST
    "cnn_select_reference": (IndexedCNN, lambda: [OnlineDataSelection(keep=0.5, reference=cnn_teacher())]),
    "cnn_select_losses": (IndexedCNN, lambda: [OnlineDataSelection(keep=0.5, reference_losses=cnn_reference_losses())]),
    "cnn_jest": (
        IndexedCNN,
        lambda: [
            OnlineDataSelection(
                keep=0.5, reference=cnn_teacher(), joint={"pair_loss_fn": cnn_pair_losses, "num_chunks": 2}
            )
        ],
    ),
    # the distillation teacher as the reference, its losses cached by global index as each rank first sees them
    "cnn_select_teacher_cached": (
        IndexedCNN,
        lambda: [
            OnlineDataSelection(keep=0.5, reference="teacher", cache_reference=True),
            KnowledgeDistillation(teacher=cnn_teacher(), alpha=0.5, temperature=2.0),
        ],
    ),
    # factorized in setup (at=0), before configure_model shards: FSDP2 shards the factors
    "cnn_factorized": (TinyCNN, lambda: [LowRankFactorization(rank=0.5, targets=["Conv2d", "Linear"], at=0)]),
    # --- fsdpsel ---
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
COMPARED_WITH_DDP = ("cnn_select", "cnn_together", "cnn_qat", "cnn_bn_qat", "cnn_bn_qat_torchao")
COMPARED_WITH_DDP += ("cnn_all", "llama_qat")
NOT_EXPORTED = ("llama_qat",)  # its module has no forward to export (the int8 export is tested on the CNNs)
COMPARED_WITH_DDP += ("cnn_select_reference", "cnn_select_losses", "cnn_jest", "cnn_select_teacher_cached")
RESUMED = ("llama_resume", "cnn_bn_qat", "cnn_bn_qat_torchao")  # two epochs; also in COMPARED_WITH_DDP: DDP's too
RESUMED += ("llama_imp_rewind_resume", "cnn_imp_lr_resume", "cnn_imp_init_resume", "cnn_wanda_resume")
# fsdpkd: resumed, and also compared with one process over both epochs; compared with another sharded fit instead
RESUMED += ("llama_kd_cache",)
SINGLE_TOO = ("llama_kd_cache",)
NO_SINGLE = ("llama_kd_shard_teacher",)  # with llama_kd_repeats' two-process fit (a sharded teacher needs FSDP2)
