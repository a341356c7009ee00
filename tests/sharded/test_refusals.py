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
    check_sharded(MODEL_PARALLEL, [QuantizationAwareTraining(fold_bn=False)])
    check_sharded(
        MODEL_PARALLEL,
        [IterativeMagnitudePruning(), IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.5}, pattern="2:4")],
    )


@pytest.mark.parametrize(
    "callback, reason",
    [
        (IterativeMagnitudePruning(pattern="channels"), "changes parameter shapes"),
        (IterativeMagnitudePruning(importance="wanda"), "input norms"),
        (QuantizationAwareTraining(), r"none of \['fold_bn=True \(pass fold_bn=False\)'\]"),
        (QuantizationAwareTraining(fold_bn=False, runtime="torchao"), "none of .*runtime='torchao'"),
        (QuantizationAwareTraining(fold_bn=False, freeze_ranges_after=2), "none of .*freeze_ranges_after"),
        (
            KnowledgeDistillation(teacher=torch.nn.Linear(2, 2), cache_teacher={"key": "content"}),
            "cache_teacher key='content' is not supported sharded",
        ),
        (OnlineDataSelection(reference=torch.nn.Linear(2, 2)), "OnlineDataSelection with a reference or joint"),
        (LowRankFactorization(), "LowRankFactorization: it does not"),
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


def test_resuming_a_rewind_snapshot_is_refused_under_model_parallel():
    rewinding = IterativeMagnitudePruning(rewind="step", rewind_step=1)
    check_sharded(MODEL_PARALLEL, [rewinding])  # a fresh fit rewinds sharded (test_pruning.py)
    with pytest.raises(UnsupportedStrategyError, match="rewind='step'.* cannot resume sharded"):
        check_sharded(MODEL_PARALLEL, [rewinding], "last.ckpt")
    check_sharded(MODEL_PARALLEL, [IterativeMagnitudePruning()], "last.ckpt")  # test_resume.py


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
