"""CompressionReport under FSDP2: the deployed model it measures is the whole model, built on rank 0
from the full state dict, and its numbers are those a one-process report gives for the same weights."""

from __future__ import annotations

import torch


def test_the_report_counts_the_whole_model_as_one_process_does(evidence):
    rank0, rank1 = evidence.ranks("llama_report")
    single = evidence.single("llama_report")
    # one-shot masks at step 0 are bit-identical (test_pruning.py), so every count and byte is exact
    assert rank0["report_after"] == single["report_after"]
    assert rank0["report_before"] == single["report_before"]
    assert set(rank1["report_after"].values()) == {None}  # measured on rank 0 only
    weights = evidence.tensors("llama_report", "fsdp")["weights"]
    whole = sum(w.numel() for w in weights.values())
    # the whole model's parameters, not rank 0's shard (which holds about half: param_bytes)
    assert rank0["report_after"]["params"] == whole
    assert rank0["param_bytes"] < 0.6 * 4 * whole
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights.values())
    assert rank0["report_after"]["nonzero_params"] == nonzero < 0.5 * whole  # the pruned zeros counted
