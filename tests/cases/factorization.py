"""LowRankFactorization in the generic suite: the two k=3 convolutions and the classifier of the
16-channel CNN at half their rank, replaced at optimizer step 10 (in epoch 1 of a single-process fit;
the 2-process ddp_spawn fit ends at step 8, before it, which is the only way ddp_spawn may run it:
Lightning carries only weights back to the launching process, so a replacement inside such a fit is
refused before training, tested in tests/test_factorization.py)."""

from __future__ import annotations

import torch

from cases import Case, small_model
from lightning_slim.factorization import FactorizedLayer, LowRankFactorization

RANKS = {"net.2": 8, "net.4": 8, "net.7": 5}  # half of min(16, 16 x 3) and of min(10, 80)


def _callback():
    return LowRankFactorization(rank=0.5, targets=["re:net\\.[24]", "Linear"], at=10, unit="step")


def _check(trainer, module, cb):
    assert cb.done and cb.factorized_at == 10 and cb.ranks == RANKS
    for path, rank in RANKS.items():
        layer = module.get_submodule(path)
        assert isinstance(layer, FactorizedLayer) and layer.rank == rank, path
    assert type(module.net[0]) is torch.nn.Conv1d  # not targeted
    dense = sum(p.numel() for p in small_model().parameters())
    assert sum(p.numel() for p in module.parameters()) == dense - sum(
        r["params_before"] - r["params_after"] for r in cb.layers.values()
    )
    # the optimizer trains exactly the model's parameters: the factors, not the replaced weights
    in_opt = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == {id(p) for p in module.parameters()} and len(in_opt) == len(
        list(module.parameters())
    )
    assert float(trainer.callback_metrics["slim/factorization/factorized"]) == 1.0
    rows = cb.report_rows()
    logged = float(trainer.callback_metrics["slim/factorization/params_ratio"])
    assert abs(logged - rows["params_before"] / rows["params_after"]) < 1e-6  # logged as float32: ~1e-7 relative


def _check_module(module):
    # the 8-step ddp_spawn fit ends before step 10: the model comes back dense and whole
    assert not any(isinstance(m, FactorizedLayer) for m in module.modules())
    assert type(module.net[2]) is torch.nn.Conv1d and type(module.net[7]) is torch.nn.Linear


CASES = [
    Case(
        name="factorization",
        callback=_callback,
        check=_check,
        check_module=_check_module,
        wandb_keys=(
            "slim/factorization/factorized",
            "slim/factorization/layers",
            "slim/factorization/params_ratio",
            "slim/factorization/energy_kept",
            "slim/factorization/layers/nrows",
            "slim/factorization/final_params_ratio",
        ),
    )
]
