"""What is refused under sharded strategies, before training, and the global threshold's tie rule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_slim import (
    CompressionReport,
    IterativeMagnitudePruning,
    KnowledgeDistillation,
    LowRankFactorization,
    OnlineDataSelection,
    QuantizationAwareTraining,
)
from lightning_slim.core.compose import UnsupportedStrategyError, check_sharded
from lightning_slim.core.sharding import keep_top
from lightning_slim.pruning.patterns import masks

MODEL_PARALLEL = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def test_fsdp1_is_refused_naming_model_parallel():
    with pytest.raises(UnsupportedStrategyError, match="FSDPStrategy.*ModelParallelStrategy"):
        check_sharded(FSDPStrategy(), [IterativeMagnitudePruning()])


def test_unsharded_strategies_pass():
    check_sharded(pl.Trainer(accelerator="cpu", devices=1, logger=False).strategy, [IterativeMagnitudePruning()])


def test_supported_techniques_pass_under_model_parallel():
    check_sharded(MODEL_PARALLEL, [KnowledgeDistillation(teacher=torch.nn.Linear(2, 2))])
    features = {"pairs": {"net.0": "0"}}  # test_distillation.py: features, the cache by index, a sharded teacher
    distil = KnowledgeDistillation(teacher=torch.nn.Linear(2, 2), features=features, cache_teacher=True)
    check_sharded(MODEL_PARALLEL, [distil], "last.ckpt")
    check_sharded(MODEL_PARALLEL, [KnowledgeDistillation(teacher=torch.nn.Linear(2, 2), teacher_sharding="shard")])
    check_sharded(MODEL_PARALLEL, [OnlineDataSelection(score="hard")])
    reference = torch.nn.Linear(2, 2)
    check_sharded(MODEL_PARALLEL, [OnlineDataSelection(reference=reference, joint=True)])  # test_selection.py
    check_sharded(MODEL_PARALLEL, [OnlineDataSelection(reference_losses=torch.zeros(4))])
    cached = OnlineDataSelection(reference="teacher", cache_reference=True)
    check_sharded(MODEL_PARALLEL, [cached, KnowledgeDistillation(teacher=torch.nn.Linear(2, 2))])
    with pytest.raises(UnsupportedStrategyError, match=r"cache_reference=True\) cannot resume sharded"):
        check_sharded(MODEL_PARALLEL, [cached], "last.ckpt")
    check_sharded(MODEL_PARALLEL, [LowRankFactorization(at=0)])  # in setup, before sharding: test_factorization.py
    check_sharded(MODEL_PARALLEL, [QuantizationAwareTraining(fold_bn=False)])
    for runtime in ("onnxruntime", "torchao"):  # test_quantization.py: cnn_bn_qat, cnn_bn_qat_torchao (resumed too)
        qat = QuantizationAwareTraining(runtime=runtime, freeze_ranges_after=4, freeze_bn_after=8, unit="step")
        check_sharded(MODEL_PARALLEL, [qat], "last.ckpt")
    check_sharded(
        MODEL_PARALLEL,
        [IterativeMagnitudePruning(), IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.5}, pattern="2:4")],
    )


@pytest.mark.parametrize(
    "callback, reason",
    [
        (IterativeMagnitudePruning(pattern="channels"), "changes parameter shapes"),
        (
            KnowledgeDistillation(teacher=torch.nn.Linear(2, 2), cache_teacher={"key": "content"}),
            "cache_teacher key='content' is not supported sharded",
        ),
        (OnlineDataSelection(reference={"class_path": "torch.nn.Linear", "checkpoint": "r.pt"}), "dict spec"),
        (LowRankFactorization(at=1), r"LowRankFactorization\(at=1, unit='epoch'\) replaces layers mid-fit.*at=0"),
    ],
)
def test_unsupported_callbacks_are_refused_naming_what_works(callback, reason):
    with pytest.raises(UnsupportedStrategyError, match=reason) as err:
        check_sharded(MODEL_PARALLEL, [callback])
    assert "IterativeMagnitudePruning with unstructured or N:M magnitude pruning" in str(err.value)
    assert "docs/sharded.md" in str(err.value)


def test_the_report_and_the_int8_export_are_accepted_sharded():  # test_report.py, test_quantization.py
    check_sharded(MODEL_PARALLEL, [CompressionReport(), IterativeMagnitudePruning()])
    check_sharded(MODEL_PARALLEL, [QuantizationAwareTraining(fold_bn=False, export_path="m.onnx")])


def test_resuming_rewind_snapshots_and_wanda_is_accepted_and_factorization_refused_under_model_parallel():
    for rewind in ("init", "step", "lr"):  # the snapshot is gathered into the checkpoint (test_resume.py)
        rewinding = IterativeMagnitudePruning(rewind=rewind, rewind_step=int(rewind != "init"))
        check_sharded(MODEL_PARALLEL, [rewinding], "last.ckpt")
    wanda = IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.5, "at": 1}, importance="wanda")
    check_sharded(MODEL_PARALLEL, [wanda])  # a fresh fit reduces its norms across ranks (test_pruning.py)
    check_sharded(MODEL_PARALLEL, [wanda], "last.ckpt")  # every rank's norms in the checkpoint (test_resume.py)
    with pytest.raises(UnsupportedStrategyError, match="LowRankFactorization cannot resume sharded"):
        check_sharded(MODEL_PARALLEL, [LowRankFactorization(at=0)], "last.ckpt")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_keep_top_matches_a_stable_sort_with_ties(scope):
    # ties (zeros, repeated values) are where a threshold search and a sort could disagree
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.randint(-2, 3, shape, generator=g).float() for n, shape in [("a", (6, 5)), ("b", (3, 7))]}
    scores["a"][0, :3] = torch.tensor([-0.0, 0.0, -0.0])  # signed zeros tie, as in a sort
    for sparsity in (0.0, 0.3, 0.5, 0.77, 0.99):
        expected = masks(scores, sparsity, scope)
        ranked = [list(scores)] if scope == "global" else [[n] for n in scores]
        kept = keep_top([[scores[n].flatten() for n in group] for group in ranked], sparsity)
        got = {n: m.view_as(scores[n]) for group, ms in zip(ranked, kept) for n, m in zip(group, ms)}
        for n in scores:
            assert torch.equal(got[n], expected[n]), (scope, sparsity, n)
