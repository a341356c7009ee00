"""Sharded fits of two epochs stopped after the first and resumed from Lightning's distributed checkpoint end
where the uninterrupted sharded fits end: distillation with gradual pruning, IMP rewinding weights and
momentum to step 1 (``rewind="step"``), to step 0 (``"init"``, no momentum yet) and IMP rewinding the LR
schedule (``rewind="lr"``), and IMP by Wanda importance. Each IMP fit
prunes at steps 4 and 8: the second round, after the resume, rewinds to the snapshot the checkpoint kept."""

from __future__ import annotations

import pytest
import torch

# scenario: the step its rewind snapshot is from
REWINDING = {"llama_imp_rewind_resume": 1, "cnn_imp_lr_resume": 1, "cnn_imp_init_resume": 0}
# Wanda's input norms since the last round are per rank: the checkpoint keeps every rank's
RESUMED = ["llama_resume", *REWINDING, "cnn_wanda_resume"]
ROUNDS = {"llama_resume": 5} | dict.fromkeys(RESUMED[1:], 2)  # of which at steps <= 6: 2 (gradual), 1 (IMP)


@pytest.mark.parametrize("scenario", RESUMED)
def test_resumed_fit_ends_where_the_uninterrupted_fit_ends(evidence, scenario):
    whole, resumed = evidence.tensors(scenario, "fsdp"), evidence.tensors(scenario, "resumed")
    # the same two processes, the same order of every float operation: the weights are bit-identical
    assert whole["weights"].keys() == resumed["weights"].keys()
    for key, value in whole["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key
    assert whole["masks"].keys() == resumed["masks"].keys() and whole["masks"]
    assert all(torch.equal(resumed["masks"][k], m) for k, m in whole["masks"].items())


@pytest.mark.parametrize("scenario", RESUMED)
def test_the_resumed_fit_started_from_the_checkpoint(evidence, scenario):
    for rank in evidence.record["resumed"][scenario]:
        assert rank["stopped_at"] == 6 and rank["steps"] == 12, rank  # stopped after epoch 1 of 2
        assert any(name.endswith(".distcp") for name in rank["checkpoint_files"]), rank  # sharded: one file a rank
        assert rank["masks_sharded"] and rank["rounds"] == ROUNDS[scenario], rank


@pytest.mark.parametrize("scenario", RESUMED)
def test_resumed_masks_are_sharded_again(evidence, scenario):
    ranks, whole = evidence.record["resumed"][scenario], evidence.record["fsdp"][scenario]
    assert [r["mask_numel"] for r in ranks] == [r["mask_numel"] for r in whole]
    assert all(r["sparsity"] == whole[0]["sparsity"] for r in ranks)


@pytest.mark.parametrize("scenario", REWINDING)
def test_the_rewind_snapshot_survives_the_resume(evidence, scenario):
    """The resumed fit rewinds to the snapshot it read back (a snapshot lost on resume would be retaken at
    step 6 and rewind there), and holds it sharded again: each rank its own block."""
    ranks, whole = evidence.record["resumed"][scenario], evidence.record["fsdp"][scenario]
    assert all(r["snapshot_step"] == REWINDING[scenario] for r in ranks + whole), ranks
    assert [r["snapshot_bytes"] for r in ranks] == [r["snapshot_bytes"] for r in whole]


def test_the_weight_snapshot_is_sharded_after_the_resume(evidence):
    ranks = evidence.record["resumed"]["llama_imp_rewind_resume"]
    param_bytes = [r["param_bytes"] for r in ranks]
    # weights and SGD momentum as at step 1: twice this rank's parameter bytes, not the whole model's
    assert [r["snapshot_bytes"] for r in ranks] == [2 * b for b in param_bytes], ranks


@pytest.mark.parametrize("scenario", ["llama_resume", *REWINDING])
def test_only_rank_0_holds_the_saved_masks_and_snapshot_whole(evidence, scenario):
    """Lightning writes callback state from rank 0: the masks and the rewind snapshot are gathered to rank 0
    alone (``sharding.whole_on_rank0``), so no other rank ever holds a whole copy of them."""
    rank0, rank1 = (r["whole_in_state"] for r in evidence.record["resumed"][scenario])
    assert rank0 and all(rank0) and not any(rank1)
