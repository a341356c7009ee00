"""Selection (and all supported techniques together) under FSDP2, against the same fit under DDP: both select
per rank from the rank's own super-batch, so DDP, not one process, is the run with the same global batches."""

from __future__ import annotations

import pytest
import torch

# FSDP2's reduce-scatter and DDP's all-reduce both add the two ranks' gradients and halve them (one float
# addition, commutative: bit-identical here); the bound is the one-process comparison's (test_pruning.py)
from .test_pruning import WEIGHT_TOLERANCE

SCENARIOS = ["cnn_select", "cnn_together"]


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


def test_all_supported_techniques_together_prune_and_distil(evidence):
    run = evidence.tensors("cnn_together", "fsdp")
    for name, mask in run["masks"].items():
        weight = run["weights"][f"{name}.weight"]
        assert torch.all(weight[~mask] == 0) and mask.float().mean() < 1, name
    alone = evidence.tensors("cnn_select", "fsdp")["weights"]  # the same selection without KD and pruning
    assert max(float((run["weights"][k] - alone[k]).abs().max()) for k in alone) > 100 * WEIGHT_TOLERANCE
