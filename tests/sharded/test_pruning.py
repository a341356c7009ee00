"""Pruning under FSDP2 (two gloo processes, ``ModelParallelStrategy``) against the same fit in one process."""

from __future__ import annotations

import pytest
import torch

from lightning_slim.pruning.functional import is_nm
from lightning_slim.pruning.norms import InputNorms

SCENARIOS = ["llama_global", "llama_layer", "llama_2of4", "llama_imp_rewind", "llama_kd_pruned", "cnn_global"]
# Wanda after one step: each rank's input norms of step 0 reduced across ranks (sums of squares, counts). The
# masks are compared bit for bit: the reduced sums differ from one process's only in float32 summation order
# (a few ulp), which flips a mask only where two scores of a row (or, scope="global", of the model) lie within
# a few ulp: none here. Measured: with each rank's own norms instead (the reduction left out) all three differ.
WANDA = ["llama_wanda", "llama_2of4_wanda", "cnn_wanda"]
SCENARIOS += WANDA
# what a mask can cost: the two-process run against one process, after 6 SGD steps (lr 0.1, momentum 0.9).
# The runs differ only in float32 summation order (two reduce-scattered halves of the batch's gradient
# against one sum), a few ulp of each gradient (measured: at most 6e-8 on weights of size 0.05-1); 1e-5
# leaves two orders of margin for other CPUs' kernels and still fails a run that saw another batch
# (measured: 8e-3 after 2 steps) or pruned another weight (its whole magnitude, about 0.05).
WEIGHT_TOLERANCE = 1e-5


def weight_of(weights: dict, mask_name: str) -> torch.Tensor:
    key = next(k for k in (f"{mask_name}.weight", mask_name) if k in weights)
    return weights[key]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_masks_equal_the_one_process_masks(evidence, scenario):
    sharded, single = evidence.tensors(scenario, "fsdp"), evidence.tensors(scenario, "single")
    assert sharded["masks"].keys() == single["masks"].keys() and sharded["masks"]
    for name, mask in single["masks"].items():
        assert torch.equal(sharded["masks"][name], mask), name


@pytest.mark.parametrize("scenario", [*SCENARIOS, "llama_plain", "llama_kd"])
def test_weights_equal_the_one_process_weights(evidence, scenario):
    sharded, single = evidence.tensors(scenario, "fsdp")["weights"], evidence.tensors(scenario, "single")["weights"]
    assert sharded.keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)  # see its definition


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pruned_weights_are_zero_in_the_gathered_model(evidence, scenario):
    run = evidence.tensors(scenario, "fsdp")
    for name, mask in run["masks"].items():
        weight = weight_of(run["weights"], name)
        assert weight.shape == mask.shape, name
        assert torch.all(weight[~mask] == 0), name
        assert torch.all(weight[mask] != 0), name  # what was kept kept training


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_masks_are_held_per_shard(evidence, scenario):
    ranks, single = evidence.ranks(scenario), evidence.single(scenario)
    full = sum(m.numel() for m in evidence.tensors(scenario, "fsdp")["masks"].values())
    assert single["mask_numel"] == full and not single["masks_sharded"]
    assert sum(r["mask_numel"] for r in ranks) == full  # the shards partition the masks: no rank holds more
    for r in ranks:
        assert r["masks_sharded"]
        # torch.chunk's row blocks: the last rank's may be a row shorter per tensor
        assert 0.45 < r["mask_numel"] / full <= 0.55, r


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rank_reports_the_whole_model_sparsity(evidence, scenario):
    ranks, single = evidence.ranks(scenario), evidence.single(scenario)
    assert all(r["sparsity"] == single["sparsity"] for r in ranks)
    assert all(r["rounds"] == single["rounds"] for r in ranks)
    run = evidence.tensors(scenario, "fsdp")
    pruned = sum(int((~m).sum()) for m in run["masks"].values())
    # the same integer ratio, computed by two float divisions: at most a few ulp apart
    assert single["sparsity"] == pytest.approx(pruned / sum(m.numel() for m in run["masks"].values()), abs=1e-12)


def test_global_scope_ranks_across_tensors_and_shards(evidence):
    masks = evidence.tensors("llama_global", "fsdp")["masks"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    per_tensor = {n: 1 - m.float().mean().item() for n, m in masks.items()}
    assert max(per_tensor.values()) - min(per_tensor.values()) > 0.01  # one threshold, not one per tensor


def test_layer_scope_prunes_each_tensor_to_its_fraction(evidence):
    for name, mask in evidence.tensors("llama_layer", "fsdp")["masks"].items():
        assert int((~mask).sum()) == round(0.5 * mask.numel()), name


@pytest.mark.parametrize("scenario", ["llama_2of4", "llama_2of4_wanda"])
def test_two_of_four_holds_on_every_row(evidence, scenario):
    for name, mask in evidence.tensors(scenario, "fsdp")["masks"].items():
        assert is_nm(mask.reshape(mask.shape[0], -1), 2, 4) and mask.float().mean() == 0.5, name


def test_imp_rewinds_and_prunes_twice(evidence):
    single = evidence.single("llama_imp_rewind")
    # round(0.75 * n) of n weights pruned: 0.75 within 1 / (2n), n about 20k
    assert single["rounds"] == 2 and single["sparsity"] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize("scenario", [*SCENARIOS, "llama_kd"])
def test_parameters_and_masks_per_rank_are_half_of_one_process(evidence, scenario):
    ranks, single = evidence.ranks(scenario), evidence.single(scenario)
    for r in ranks:  # what users shard for: each rank holds half (uneven row blocks: within 5%)
        assert 0.45 < r["param_bytes"] / single["param_bytes"] <= 0.55, r
        if "mask_bytes" in single:
            assert 0.45 < r["mask_bytes"] / single["mask_bytes"] <= 0.55, r
    assert sum(r["param_bytes"] for r in ranks) == single["param_bytes"]


def test_distillation_changes_the_weights_it_is_compared_on(evidence):
    """The KD runs equal their one-process references *and* differ from plain training: the term acts sharded."""
    plain, kd = evidence.tensors("llama_plain", "fsdp")["weights"], evidence.tensors("llama_kd", "fsdp")["weights"]
    moved = max(float((kd[k] - plain[k]).abs().max()) for k in plain)
    assert moved > 100 * WEIGHT_TOLERANCE, moved


def test_rewind_state_is_sharded(evidence):
    ranks, single = evidence.ranks("llama_imp_rewind"), evidence.single("llama_imp_rewind")
    for r in ranks:  # the snapshot's weights and optimizer state: each rank's block only
        assert 0.45 < r["snapshot_bytes"] / single["snapshot_bytes"] <= 0.55, r


def test_every_ranks_wanda_norms_add_up_when_resumed_unsharded():
    """A sharded checkpoint keeps every rank's norms (test_resume.py); resumed without a process group they are
    added up: what one process seeing every rank's inputs would hold (the same two float32 additions)."""
    inputs = [torch.tensor([[1.0, 2.0], [0.5, 0.0]]), torch.tensor([[3.0, 1.0]])]
    per_rank, together = [], InputNorms()
    for x in inputs:
        rank = InputNorms()
        rank.add("lin", [x])
        per_rank.append(rank.state_dict())
        together.add("lin", [x])
    resumed = InputNorms()
    resumed.load_state_dict({"per_rank": per_rank})
    assert resumed.count == together.count == {"lin": 3}
    assert torch.equal(resumed.sumsq["lin"][0], together.sumsq["lin"][0])
