"""LowRankFactorization: the factors are the truncated SVD (exact at full rank, Eckart-Young error at
rank r), parameters drop, the optimizer trains the factors after a mid-fit replacement, resumed runs
and reloaded checkpoints get the factorized structure, bad arguments and combinations are refused
before training, and it composes with the other techniques (QAT's int8 ONNX export of the factors)."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import small_data, small_model
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_slim.core.compose import IncompatibleCallbacksError
from lightning_slim.demos.models import MNIST1DCNN
from lightning_slim.factorization import FactorizationConfig, FactorizedLayer, LowRankFactorization, load_factorized
from lightning_slim.factorization import functional as F

ROOT = Path(__file__).resolve().parents[1]
U32 = 2.0**-24  # float32 unit roundoff
LAYERS = {
    "linear": lambda: nn.Linear(48, 20),
    "conv1d_k3": lambda: nn.Conv1d(6, 10, 3, stride=2, padding=1),
    "conv2d_k3": lambda: nn.Conv2d(4, 12, 3, padding=1, dilation=2, padding_mode="reflect"),
    "conv2d_1x1": lambda: nn.Conv2d(16, 24, 1, bias=False),
}
INPUTS = {
    "linear": (5, 48),
    "conv1d_k3": (2, 6, 17),
    "conv2d_k3": (2, 4, 9, 9),
    "conv2d_1x1": (2, 16, 5, 5),
}


def trainer(tmp_path, callbacks, **kw):
    args = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    return pl.Trainer(callbacks=callbacks, **{**args, **kw})


def product(layer: FactorizedLayer) -> torch.Tensor:
    """``up @ down`` as the dense weight matrix, computed in float64 (no float32 matmul error)."""
    return layer.up.weight.double().reshape(layer.up.weight.shape[0], -1) @ layer.down.weight.double().reshape(
        layer.rank, -1
    )


# --- the functional core -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LAYERS)
@torch.no_grad()
def test_full_rank_factors_reproduce_the_weight_and_the_layer(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    out, fan_in = F.matrix_shape(layer)
    full = F.factorize(layer, min(out, fan_in))
    w = layer.weight.double().reshape(out, -1)
    up, down = full.up.weight.reshape(out, -1), full.down.weight.reshape(full.rank, -1)
    # The SVD runs in float64 (error ~1e-16 ||W||); each factor is then rounded to float32 (relative U32
    # per entry), so |W - up down| <= 2.01 U32 (|up| |down|) entrywise: a bound on rounding that holds on
    # any CPU, whatever its summation order (the product is taken in float64 here).
    bound = 2.01 * U32 * (up.abs().double() @ down.abs().double()) + 1e-12 * float(w.abs().max())
    assert ((w - product(full)).abs() <= bound).all()
    # the layer computes the same function: in float64 the two-layer forward differs from the dense one by
    # rounding only (~fan_in * 1e-16 relative), far inside 1e-9
    dense64, x = copy.deepcopy(layer).double(), torch.randn(INPUTS[kind], dtype=torch.float64)
    full64 = F.factorize(dense64, min(out, fan_in))
    torch.testing.assert_close(full64(x), dense64(x), rtol=1e-9, atol=1e-9)  # float64 rounding only (above)
    assert full.up.bias is None if layer.bias is None else torch.equal(full.up.bias, layer.bias)
    assert full.down.bias is None


@pytest.mark.parametrize("kind", LAYERS)
@torch.no_grad()
def test_truncation_error_is_the_discarded_singular_values(kind):
    torch.manual_seed(1)
    layer = LAYERS[kind]()
    values = F.singular_values(layer)
    w = layer.weight.double().reshape(layer.weight.shape[0], -1)
    for rank in (1, len(values) // 2, len(values) - 1):
        low = F.factorize(layer, rank)
        error = torch.linalg.matrix_norm(w - product(low))
        expected = values[rank:].pow(2).sum().sqrt()  # Eckart-Young: the best rank-r error
        # the float32 rounding of the factors moves the product by at most 2.01 U32 || |up| |down| ||_F,
        # and || |up| |down| ||_F <= ||up||_F ||down||_F = sum of the kept singular values (split evenly)
        assert abs(float(error - expected)) <= 2.01 * U32 * float(values[:rank].sum()) + 1e-12, (kind, rank)
        # energy_kept sums squares in float64 (<= 128 terms): ~128 * 2**-53 = 1.4e-14, so 1e-12 holds on any CPU
        assert abs(F.energy_kept(values, rank) - 1 + float(expected**2 / values.pow(2).sum())) < 1e-12


def test_rank_rules():
    values = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert F.choose_rank(values, rank=0.25) == 1 and F.choose_rank(values, rank=0.1) == 1  # at least 1
    assert (
        F.choose_rank(values, rank=1.0) == 4
        and F.choose_rank(values, rank=3) == 3
        and F.choose_rank(values, rank=9) == 4
    )
    # energy: the smallest rank whose share of sum sigma^2 reaches the target (16/22 = 0.727, 20/22 = 0.909)
    assert [F.choose_rank(values, energy=e) for e in (0.5, 0.727, 0.73, 0.909, 0.91, 1.0)] == [1, 1, 2, 2, 3, 4]
    assert F.choose_rank(values, energy=20 / 22) == 2  # reached exactly: counts as reached
    assert F.choose_rank(torch.zeros(3), energy=0.9) == 3
    # saving parameters: r (out + fan_in) < out fan_in
    assert F.saves(32, 96, 23) and not F.saves(32, 96, 24) and F.breakeven_rank(32, 96) == 24.0


def test_restructure_and_load_factorized_rebuild_a_checkpoint(tmp_path):
    pl.seed_everything(0)
    cb = LowRankFactorization(rank=0.5, targets=["re:net\\.[24]", "Linear"], at=2, unit="step")
    model = small_model()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [cb, ckpt], max_epochs=1, enable_checkpointing=True).fit(model, datamodule=small_data())
    fresh = load_factorized(small_model(), str(tmp_path / "ckpt" / "last.ckpt"))
    x = torch.randn(8, 1, 40)
    assert {n: m.rank for n, m in fresh.named_modules() if isinstance(m, FactorizedLayer)} == cb.ranks
    # exact: the reloaded factors are the same tensors in the same shapes, run by the same kernels on this CPU
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


# --- the callback in a fit ---------------------------------------------------------------------------
class Probe(pl.Callback):
    """Records, at every training step, the optimizer's parameters, the learning rate, and the values of
    the model's parameters before and after the step (before: right before the optimizer steps, after a
    mid-fit restructuring at the batch's start)."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        opt = trainer.optimizers[0]
        self.steps.append(
            {
                "optimizer": {id(p) for g in opt.param_groups for p in g["params"]},
                "lr": opt.param_groups[0]["lr"],
                "before": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                "objects": dict(pl_module.named_parameters()),
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.steps[-1]["adam_steps"] = {n: int(opt.state[p]["step"]) for n, p in pl_module.named_parameters()}


def test_mid_fit_replacement_trains_the_factors_and_keeps_the_schedule(tmp_path):
    def run(callbacks):
        pl.seed_everything(0)
        model = MNIST1DCNN(channels=16, lr_schedule="cosine")
        probe = Probe()
        trainer(tmp_path, [*callbacks, probe], max_epochs=1).fit(model, datamodule=small_data())
        return model, probe.steps

    dense_model, dense = run([])
    cb = LowRankFactorization(rank=0.5, targets=["Linear"], at=3, unit="step")
    model, steps = run([cb])
    assert cb.ranks == {"net.7": 5} and cb.factorized_at == 3
    assert [s["lr"] for s in steps] == [s["lr"] for s in dense]  # the cosine schedule goes on where it was
    old_weight = steps[2]["objects"]["net.7.weight"]
    at = steps[3]  # the step the replacement happened at (before it)
    assert "net.7.weight" not in at["before"] and id(old_weight) not in at["optimizer"]
    assert at["optimizer"] == {id(p) for p in model.parameters()}
    for name in ("net.7.down.weight", "net.7.up.weight", "net.7.up.bias"):
        assert not torch.equal(at["before"][name], at["after"][name]), f"{name} did not train"
        assert at["adam_steps"][name] == 1  # new parameters: fresh optimizer state
    assert at["adam_steps"]["net.0.weight"] == 4  # untouched parameters keep their moments
    # the steps before the replacement are the dense run's, bit for bit
    for name, value in steps[2]["after"].items():
        assert torch.equal(value, dense[2]["after"][name]), name
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense_model.parameters())


def test_report_rows_and_layers_the_rule_keeps_dense(tmp_path):
    pl.seed_everything(0)
    cb = LowRankFactorization(rank=0.25, min_size=10)  # every Linear / conv of the 16-channel CNN
    model = small_model()
    dense_params = {n: F.params_of(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Linear))}
    trainer(tmp_path, [cb], max_epochs=1).fit(model, datamodule=small_data())
    rows = cb.report_rows()
    # net.0 (16 x 5) is below min_size; net.7 (10 x 80) at rank 2; the k=3 convs (16 x 48) at rank 4
    assert rows["ranks"] == {"net.2": 4, "net.4": 4, "net.7": 2} and set(rows["kept_dense"]) == {"net.0"}
    assert rows["params_before"] == sum(dense_params[n] for n in rows["ranks"])
    assert rows["params_after"] == 2 * (4 * 48 + 16 * 4 + 16) + (2 * 80 + 10 * 2 + 10)
    assert rows["factorized_at_step"] == 0 and rows["unsupported"] == {}
    assert all(0 < e < 1 for e in rows["energy_kept"].values())
    # a 16 x 48 conv breaks even at rank 16 * 48 / 64 = 12, which rank=0.75 gives: it stays dense; the
    # 10 x 80 Linear at rank 7 < 8.9 is factorized
    cb = LowRankFactorization(rank=0.75, targets=["net.2", "net.7"])
    trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(small_model(), datamodule=small_data())
    assert cb.ranks == {"net.7": 7} and "rank 12 of 16 saves nothing" in cb.kept_dense["net.2"]
    cb = LowRankFactorization(rank=0.75, targets=["net.2"])
    with pytest.warns(UserWarning, match="factorized nothing: rank=0.75 saves nothing"):
        trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(small_model(), datamodule=small_data())


def test_layers_it_cannot_handle_are_warned_about_and_reported(tmp_path):
    class Mixed(MNIST1DCNN):
        def __init__(self):
            super().__init__(channels=16)
            self.attention = nn.MultiheadAttention(8, 2)  # out_proj: a Linear subclass read directly

        def training_step(self, batch, batch_idx):
            self.attention(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))
            return super().training_step(batch, batch_idx)

    cb = LowRankFactorization(rank=0.5, targets=["Linear"])
    with pytest.warns(UserWarning, match="attention.out_proj"):
        trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(Mixed(), datamodule=small_data())
    assert "subclass" in cb.report_rows()["unsupported"]["attention.out_proj"]
    assert cb.ranks == {"net.7": 5}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 1.5}, r"rank=1\.5 must be a fraction in \(0, 1\]"),
        ({"rank": 0}, "rank=0 must be"),
        ({"rank": True}, "rank=True must be"),
        ({"rank": 0.5, "energy": 0.9}, "give rank=0.5 or energy=0.9, not both"),
        ({"energy": 0.0}, r"energy=0\.0 is outside the allowed range \(0, 1\]"),
        ({"at": -1}, "at=-1 must be an integer >= 0"),
        ({"unit": "batch"}, "unit='batch' is not one of"),
        ({"targets": "Linear"}, "targets='Linear' must be a list of strings"),
        ({"min_size": 0}, "min_size=0 must be an integer >= 1"),
        ({"config": {"rank": 0.5}, "at": 3}, r"not both \(also given: \['at'\]\)"),
        ({"config": {"ranks": 0.5}}, "config has no option 'ranks'"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankFactorization(**kwargs)


def test_config_and_arguments_build_the_same_callback():
    assert LowRankFactorization(config={"energy": 0.8, "at": 2}).config == LowRankFactorization(energy=0.8, at=2).config
    assert LowRankFactorization(config=FactorizationConfig(rank=4)).config.rule == "rank=4"


def _refused(tmp_path, callbacks, match, model=None, **kw):
    model = model or small_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, IncompatibleCallbacksError), match=match):
        trainer(tmp_path, callbacks, max_epochs=1, **kw).fit(model, datamodule=small_data())
    after = model.state_dict()  # refused before any weight changed
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_targets_that_select_nothing_are_refused_before_training(tmp_path):
    _refused(
        tmp_path, [LowRankFactorization(targets=["re:encoder\\..*"])], "matches no module factorization can handle"
    )
    _refused(tmp_path, [LowRankFactorization(targets=["net.1"])], "net.1' is a ReLU, which factorization does not")


def test_combinations_that_would_break_other_techniques_are_refused(tmp_path):
    from lightning_slim import IterativeMagnitudePruning, QuantizationAwareTraining

    late = LowRankFactorization(rank=0.5, targets=["Linear"], at=1)
    _refused(
        tmp_path,
        [late, IterativeMagnitudePruning()],
        r"replaces layers at epoch 1, but \['IterativeMagnitudePruning'\]",
    )
    first = LowRankFactorization(rank=0.5, targets=["Linear"])
    _refused(
        tmp_path,
        [QuantizationAwareTraining(), first],
        r"list LowRankFactorization before \['QuantizationAwareTraining'\]",
    )


def test_ddp_spawn_is_refused_before_the_factors_would_be_lost(tmp_path):
    # ddp_spawn loads only the weights back into this process's (dense) module, non-strictly
    with pytest.raises(Exception, match="Use strategy='ddp'"):
        trainer(tmp_path, [LowRankFactorization(targets=["Linear"])], strategy="ddp_spawn", devices=2).fit(
            small_model(), datamodule=small_data()
        )


# --- resume ----------------------------------------------------------------------------------------------
def _low_rank(weight: torch.Tensor, rank: int) -> None:
    """Make ``weight`` (in place) a rank-``rank`` matrix plus a trace of noise: the energy rule then keeps ``rank``."""
    g = torch.Generator().manual_seed(rank)
    m = weight.shape[0]
    with torch.no_grad():
        a, b = torch.randn(m, rank, generator=g), torch.randn(rank, weight[0].numel(), generator=g)
        weight.copy_((a @ b + 1e-4 * torch.randn(m, weight[0].numel(), generator=g)).reshape(weight.shape) / 10)


def _resume_matches(tmp_path, make_callbacks, make_model, make_fresh):
    every_epoch = lambda d: ModelCheckpoint(dirpath=d, save_top_k=-1, every_n_epochs=1)
    pl.seed_everything(0)
    full = make_model()
    trainer(tmp_path / "a", [*make_callbacks(), every_epoch(tmp_path / "ckpt")], enable_checkpointing=True).fit(
        full, datamodule=small_data()
    )
    pl.seed_everything(123)
    resumed, callbacks = make_fresh(), make_callbacks()
    trainer(tmp_path / "b", [*callbacks, every_epoch(tmp_path / "ckpt")], enable_checkpointing=True).fit(
        resumed, datamodule=small_data(), ckpt_path=next((tmp_path / "ckpt").glob("epoch=0*.ckpt"))
    )
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        # exact: the resumed run replays the same batches through the same kernels on this CPU
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    return callbacks


def test_resume_from_a_factorized_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path):
    cbs = _resume_matches(
        tmp_path,
        lambda: [LowRankFactorization(rank=0.5, targets=["re:net\\.[24]", "Linear"], at=3, unit="step")],
        small_model,
        small_model,
    )
    assert cbs[0].ranks == {"net.2": 8, "net.4": 8, "net.7": 5} and cbs[0].factorized_at == 3


def test_resume_when_the_energy_rule_chose_otherwise_on_the_fresh_weights(tmp_path):
    # started from: net.2 random (the energy rule keeps it dense), net.7 of rank 3 (factorized at rank 3);
    # the resumed run's fresh model has net.2 of rank 2 and net.7 of rank 1, so setup chooses differently:
    # the checkpoint's structure wins (net.2 made dense again, net.7 resized in place)
    def model(ranks):
        def make():
            m = small_model()
            for path, r in ranks.items():
                _low_rank(m.get_submodule(path).weight, r)
            return m

        return make

    make = lambda: [LowRankFactorization(energy=0.99, targets=["net.2", "net.7"])]
    cbs = _resume_matches(tmp_path, make, model({"net.7": 3}), model({"net.2": 2, "net.7": 1}))
    assert cbs[0].ranks == {"net.7": 3} and "net.2" in cbs[0].kept_dense


def test_resume_resizes_factors_that_quantization_has_wrapped(tmp_path):
    from lightning_slim import QuantizationAwareTraining

    def model(rank):
        def make():
            m = small_model()
            _low_rank(m.net[7].weight, rank)
            return m

        return make

    make = lambda: [
        LowRankFactorization(energy=0.99, targets=["net.7"]),
        QuantizationAwareTraining(start_after=1, targets=["Linear"]),
    ]
    cbs = _resume_matches(tmp_path, make, model(3), model(1))
    assert cbs[0].ranks == {"net.7": 3} and cbs[1].layers == ["net.7.down", "net.7.up"]


# --- the method card --------------------------------------------------------------------------------------
def test_the_method_card_knob_table_names_the_constructor_arguments():
    card = (ROOT / "lightning_slim" / "factorization" / "README.md").read_text()
    table = card.split("\n## Knobs\n", 1)[1].split("\n## ", 1)[0]
    named = {n for row in re.findall(r"^\| (`[^|]+) \|", table, re.M) for n in re.findall(r"`(\w+)`", row)}
    assert named == set(inspect.signature(LowRankFactorization).parameters)
