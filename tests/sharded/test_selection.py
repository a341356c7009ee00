"""Selection (and all supported techniques together) under FSDP2, against the same fit under DDP: both select
per rank from the rank's own super-batch, so DDP, not one process, is the run with the same global batches."""

from __future__ import annotations

import pytest
import torch

# FSDP2's reduce-scatter and DDP's all-reduce both add the two ranks' gradients and halve them (one float
# addition, commutative: bit-identical here); the bound is the one-process comparison's (test_pruning.py)
from .test_pruning import WEIGHT_TOLERANCE

SCENARIOS = ["cnn_select", "cnn_together"]
# learnability against a frozen, replicated reference module; against its losses precomputed by dataset index;
# JEST's joint selection (pair losses, chunks) against the same reference; distillation's teacher as the reference,
# its losses cached by index
REFERENCED = ["cnn_select_reference", "cnn_select_losses", "cnn_jest", "cnn_select_teacher_cached"]
SCENARIOS += REFERENCED


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_weights_and_masks_equal_the_ddp_run(evidence, scenario):
    sharded, ddp = evidence.tensors(scenario, "fsdp"), evidence.tensors(scenario, "ddp")
    for key, value in ddp["weights"].items():
        # the bound of the module comment above (imported from test_pruning.py)
        torch.testing.assert_close(sharded["weights"][key], value, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    assert sharded["masks"].keys() == ddp["masks"].keys()
    assert all(torch.equal(sharded["masks"][k], m) for k, m in ddp["masks"].items())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_rank_trains_on_half_of_what_it_scores_and_the_ledger_matches_ddp(evidence, scenario):
    sharded, ddp = evidence.record["fsdp"][scenario], evidence.record["ddp"][scenario]
    for rank, (mine, theirs) in enumerate(zip(sharded, ddp)):
        ledger = mine["ledger"]
        assert ledger["examples_seen"] == 24 and ledger["examples_trained"] == 12, (rank, ledger)  # keep=0.5
        assert ledger == theirs["ledger"], rank
        # logged and reported: the whole job's counts (both ranks'), the same on every rank, as under DDP
        job = mine["job_ledger"]
        assert job["examples_seen"] == 48 and job["examples_trained"] == 24, (rank, job)
        assert job["scoring_forwards"] == 2 * ledger["scoring_forwards"] and job == theirs["job_ledger"], rank


def test_all_supported_techniques_together_prune_and_distil(evidence):
    run = evidence.tensors("cnn_together", "fsdp")
    for name, mask in run["masks"].items():
        weight = run["weights"][f"{name}.weight"]
        assert torch.all(weight[~mask] == 0) and mask.float().mean() < 1, name
    alone = evidence.tensors("cnn_select", "fsdp")["weights"]  # the same selection without KD and pruning
    assert max(float((run["weights"][k] - alone[k]).abs().max()) for k in alone) > 100 * WEIGHT_TOLERANCE


def test_precomputed_losses_are_read_by_global_index(evidence):
    """Each rank looks its examples' reference losses up by the dataset index its DistributedSampler gave
    them: the fit selects exactly what scoring the same reference model on the fly selects (same rows, so
    the same float operations: bit-identical weights), with no reference forward at all. (The two reference
    losses of an example, from a batch of 48 and of 4, may differ by a few ulp on another CPU's kernels: that
    changes a choice only between two of a rank's 4 examples scored within a few ulp, none here.)"""
    cached, computed = evidence.tensors("cnn_select_losses", "fsdp"), evidence.tensors("cnn_select_reference", "fsdp")
    for key, value in computed["weights"].items():
        assert torch.equal(cached["weights"][key], value), key
    for cached_rank, computed_rank in zip(evidence.ranks("cnn_select_losses"), evidence.ranks("cnn_select_reference")):
        assert cached_rank["ledger"]["reference_forwards"] == 0, cached_rank["ledger"]
        assert computed_rank["ledger"]["reference_forwards"] == 24, computed_rank["ledger"]  # every example scored


@pytest.mark.parametrize(
    "scenario, other",
    [("cnn_select_reference", "cnn_select"), ("cnn_jest", "cnn_select_reference")],
    ids=["the reference counts", "joint differs from per example"],
)
def test_the_scores_change_what_is_trained(evidence, scenario, other):
    """Learnability (learner - reference loss) trains otherwise than the learner's loss alone, and JEST's joint
    choice otherwise than per-example learnability: each scenario tests what it names, not a no-op."""
    weights, others = evidence.tensors(scenario, "fsdp")["weights"], evidence.tensors(other, "fsdp")["weights"]
    moved = max(float((weights[k] - v).abs().max()) for k, v in others.items())
    assert moved > 100 * WEIGHT_TOLERANCE, moved


def test_the_teacher_reference_is_scored_once_per_example_and_distils(evidence):
    for rank in evidence.ranks("cnn_select_teacher_cached"):
        # 24 examples seen per rank, each once in a one-epoch fit: every one a cache miss, scored once
        assert rank["ledger"]["reference_forwards"] == 24, rank["ledger"]
    distilled = evidence.tensors("cnn_select_teacher_cached", "fsdp")["weights"]
    alone = evidence.tensors("cnn_select_reference", "fsdp")["weights"]
    # the same reference (cnn_teacher) and selection rule: what differs is the distillation term
    assert max(float((distilled[k] - v).abs().max()) for k, v in alone.items()) > 100 * WEIGHT_TOLERANCE
