"""A sharded fit (distillation and gradual pruning, two epochs) stopped after the first epoch and resumed from
Lightning's distributed checkpoint ends where the uninterrupted sharded fit ends."""

from __future__ import annotations

import torch


def test_resumed_fit_ends_where_the_uninterrupted_fit_ends(evidence):
    whole, resumed = evidence.tensors("llama_resume", "fsdp"), evidence.tensors("llama_resume", "resumed")
    # the same two processes, the same order of every float operation: the weights are bit-identical
    for key, value in whole["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key
    assert whole["masks"].keys() == resumed["masks"].keys()
    assert all(torch.equal(resumed["masks"][k], m) for k, m in whole["masks"].items())


def test_the_resumed_fit_started_from_the_checkpoint(evidence):
    for rank in evidence.record["resumed"]["llama_resume"]:
        assert rank["stopped_at"] == 6 and rank["steps"] == 12, rank  # stopped after epoch 1 of 2
        assert any(name.endswith(".distcp") for name in rank["checkpoint_files"]), rank  # sharded: one file a rank
        assert rank["masks_sharded"] and rank["rounds"] == 5, rank  # rounds 1-2 before the stop, 3-5 after


def test_resumed_masks_are_sharded_again(evidence):
    ranks, whole = evidence.record["resumed"]["llama_resume"], evidence.record["fsdp"]["llama_resume"]
    assert [r["mask_numel"] for r in ranks] == [r["mask_numel"] for r in whole]
    assert all(r["sparsity"] == whole[0]["sparsity"] for r in ranks)
