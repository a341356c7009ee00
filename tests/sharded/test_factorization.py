"""Low-rank factorization under FSDP2: factorized in ``setup`` (``at=0``), before ``configure_model`` shards, so
FSDP2 shards the factors; the fit equals the same fit in one process. Mid-fit factorization is refused
(test_refusals.py): it would change the shapes FSDP2 fixed."""

from __future__ import annotations

import torch

# the same SVD of the same initial weights on every rank and in one process; then the pruning comparison's
# bound (float32 summation order of the gradients over 6 SGD steps; see test_pruning.py)
from .test_pruning import WEIGHT_TOLERANCE


def test_the_factors_train_sharded_as_in_one_process(evidence):
    sharded = evidence.tensors("cnn_factorized", "fsdp")["weights"]
    single = evidence.tensors("cnn_factorized", "single")["weights"]
    assert sharded.keys() == single.keys()
    for key, value in single.items():
        # the bound of the module comment above (imported from test_pruning.py)
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    # every targeted layer became down (rank r) then up (back to its outputs), at half its full rank
    layers = {key.split(".down.")[0] for key in sharded if ".down." in key}
    assert layers == {"net.0", "net.3", "net.7"}, sorted(sharded)
    for layer in layers:
        down, up = sharded[f"{layer}.down.weight"], sharded[f"{layer}.up.weight"]
        full_rank = min(up.shape[0], down[0].numel())
        assert down.shape[0] == up.shape[1] == round(0.5 * full_rank), (layer, down.shape, up.shape)
        assert f"{layer}.weight" not in sharded


def test_each_rank_holds_half_of_the_factors(evidence):
    ranks, single = evidence.ranks("cnn_factorized"), evidence.single("cnn_factorized")
    assert sum(r["param_bytes"] for r in ranks) == single["param_bytes"]
    for r in ranks:  # uneven row blocks of tensors of 4-12 rows: within 5% of half
        assert 0.45 < r["param_bytes"] / single["param_bytes"] <= 0.55, r
