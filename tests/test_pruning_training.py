"""IterativeMagnitudePruning in real Lightning fits: masks that hold under SGD momentum and Adam
(with gradient accumulation and bf16), exact rewinding, errors before training, structural pruning
with resume, checkpoint loading and the W&B curve."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from cases import small_data, small_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_slim.demos.models import MNIST1DCNN
from lightning_slim.pruning import IterativeMagnitudePruning, load_pruned
from lightning_slim.pruning.curve import MissingMetricWarning
from lightning_slim.pruning.functional import global_sparsity, select_layers
from lightning_slim.pruning.options import PruningScheduleWarning
from lightning_slim.pruning.schedules import parse_schedule


def fit(tmp_path, callbacks, model=None, ckpt_path=None, **kwargs):
    args = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    args.update(kwargs)
    model = model if model is not None else small_model()
    trainer = pl.Trainer(callbacks=callbacks, **args)
    trainer.fit(model, datamodule=small_data(), ckpt_path=ckpt_path)
    return trainer, model


class MaskProbe(pl.Callback):
    """Runs after the pruning callback and checks every optimizer step: masked weights are zero,
    their gradients are zero and the optimizer's per-weight state is zero there."""

    def __init__(self, pruning):
        self.pruning, self.checked = pruning, 0

    def _masked(self, pl_module):
        modules = dict(pl_module.named_modules())
        return [(modules[n].weight, m) for n, m in self.pruning.masks.items()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for w, m in self._masked(pl_module):
            assert w.grad is None or not w.grad[~m].any()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for w, m in self._masked(pl_module):
            assert not w[~m].any(), "a pruned weight came back"
            for value in trainer.optimizers[0].state.get(w, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == w.shape:
                    assert not value[~m].any(), "optimizer state lives on at a pruned weight"
            self.checked += 1


@pytest.mark.parametrize(
    "setting",
    [
        dict(model=dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)),
        dict(
            model=dict(optimizer="adam", lr=0.01, weight_decay=1e-3), precision="bf16-mixed", accumulate_grad_batches=2
        ),
    ],
    ids=["sgd_momentum", "adam_bf16_accumulate"],
)
def test_masks_hold_under_momentum_adam_accumulation_and_bf16(setting, tmp_path):
    pl.seed_everything(0)
    setting = dict(setting)
    cb = IterativeMagnitudePruning(
        {"kind": "gradual", "final_sparsity": 0.8, "start": 1, "end": 5, "every": 2, "unit": "step"},
        exclude_classifier=True,
        scope="layer",
    )
    probe = MaskProbe(cb)
    _trainer, model = fit(
        tmp_path, [cb, probe], model=small_model(**setting.pop("model")), max_steps=7, limit_val_batches=0, **setting
    )
    assert probe.checked > 0 and cb.round == 3
    layers = select_layers(model, exclude=["net.7"])
    for name, module in layers.items():  # per-layer scope: every pruned layer at 80%
        # per-layer scope: exactly round(0.8 n) zeros in each layer (integer count, any CPU): error < 1/(2n) <= 0.00625
        # for the smallest layer (n = 80)
        assert abs((module.weight == 0).float().mean().item() - 0.8) < 0.01, name
    assert not (model.net[7].weight == 0).any()  # the classifier stayed dense...
    reported = cb.report_rows()["sparsity"]  # ...and counts in the reported sparsity
    # the same integer counts, counted twice: equal up to float rounding (default rel=1e-6)
    assert reported == pytest.approx(global_sparsity({n: m.weight for n, m in select_layers(model).items()}))
    assert reported < 0.8


class RewindProbe(pl.Callback):
    """Records the module and optimizer right after the first pruning event: in the step it starts, before
    that step's optimizer update (events run at the batch's start, after every callback's own hook)."""

    def __init__(self, pruning):
        self.pruning, self.seen = pruning, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.pruning.round == 1 and self.seen is None:
            sched = trainer.lr_scheduler_configs[0].scheduler
            self.seen = (
                {k: v.clone() for k, v in pl_module.state_dict().items()},
                {
                    i: {k: v.clone() for k, v in s.items()}
                    for i, s in trainer.optimizers[0].state_dict()["state"].items()
                },
                sched.last_epoch,
                trainer.optimizers[0].param_groups[0]["lr"],
            )


def test_step_rewind_restores_snapshot_exactly(tmp_path):
    pl.seed_everything(0)
    cb = IterativeMagnitudePruning({"kind": "imp", "rounds": 1, "rate": 0.6, "every": 1}, rewind="step", rewind_step=3)
    probe = RewindProbe(cb)
    fit(tmp_path, [cb, probe], model=small_model(optimizer="sgd", lr=0.05, lr_schedule="cosine"))
    weights, opt_state, last_epoch, lr = probe.seen
    snap = cb.snapshot
    assert snap["step"] == 3 and last_epoch == snap["schedulers"][0]["last_epoch"] == 3
    assert lr == snap["optimizers"][0]["param_groups"][0]["lr"]
    masks = {f"{n}.weight": m for n, m in cb.masks.items()}
    for key, saved in snap["module"].items():
        expected = saved * masks[key] if key in masks else saved
        assert torch.equal(weights[key], expected), key  # exactly the step-3 weights, pruned
    for i, state in snap["optimizers"][0]["state"].items():
        buf = opt_state[i]["momentum_buffer"]
        assert torch.equal(buf[buf != 0], state["momentum_buffer"][buf != 0])


def test_lr_rewind_keeps_weights_and_rewinds_schedule(tmp_path):
    pl.seed_everything(0)
    cb = IterativeMagnitudePruning({"kind": "imp", "rounds": 1, "rate": 0.5, "every": 1}, rewind="lr", rewind_step=0)
    probe = RewindProbe(cb)
    _, _model = fit(tmp_path, [cb, probe], model=small_model(lr_schedule="cosine"))
    weights, _, last_epoch, lr = probe.seen
    assert last_epoch == 0 and lr == pytest.approx(1e-2)  # back to the start of the schedule
    assert cb.snapshot.get("module") is None  # weights are not snapshotted, nor rewound
    assert weights["net.0.weight"].abs().sum() > 0


class Gate(torch.nn.Module):
    """A custom layer with a weight: magnitude masks handle it, torch-pruning cannot remove its channels."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels, 1))

    def forward(self, x):
        return torch.relu(x * self.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=["net.9"]), "pruning target 'net.9' matches no module"),
        (dict(schedule={"kind": "imp", "every": 1}, rewind="step", rewind_step=50), "rewind_step=50 is later than"),
        (
            dict(pattern="channels", targets=["Conv1d"], example_input_shape=None, schedule={"kind": "one_shot"}),
            "structured pruning traces the model",
        ),
        (
            dict(pattern="channels", targets=["net.1"], schedule={"kind": "one_shot"}),
            r"cannot handle layer 'net.1' \(Gate\)",
        ),
    ],
)
def test_bad_input_fails_before_the_first_step(kwargs, match, tmp_path):
    model = small_model()
    if kwargs.get("pattern") == "channels" and "example_input_shape" in kwargs:
        model.example_input_array = None
    if kwargs.get("targets") == ["net.1"]:
        model.net[1] = Gate()
    steps = []
    probe = pl.callbacks.LambdaCallback(on_train_batch_start=lambda *a: steps.append(1))
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [IterativeMagnitudePruning(**kwargs), probe], model=model)
    assert not steps


def test_structured_prunes_trains_resumes_and_loads(tmp_path):
    """Channels go at the start of epoch 1; a run resumed from the pruned epoch-1 checkpoint ends
    exactly where the uninterrupted one ends, and load_pruned rebuilds the small model."""
    make_cb = lambda: IterativeMagnitudePruning(
        {"kind": "one_shot", "sparsity": 0.5, "at": 1},
        pattern="channels",
        targets=["Conv1d"],
        scope="layer",
        rewind="lr",
        rewind_step=0,
    )
    ckpt = lambda d: ModelCheckpoint(dirpath=d, save_top_k=-1, every_n_epochs=1)
    pl.seed_everything(0)
    make = lambda: small_model(optimizer="sgd", lr=0.05, lr_schedule="cosine")
    trainer, full = fit(
        tmp_path, [make_cb(), ckpt(tmp_path / "ckpt")], model=make(), max_epochs=3, enable_checkpointing=True
    )
    assert [m.out_channels for m in full.net if isinstance(m, torch.nn.Conv1d)] == [8, 8, 8]
    # the optimizer holds the pruned layers' new parameters, so they kept training
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in full.parameters()} == opt_params
    ep1, ep2 = (sorted((tmp_path / "ckpt").glob(f"epoch={e}*.ckpt"))[0] for e in (1, 2))
    assert not torch.equal(
        torch.load(ep1, weights_only=False)["state_dict"]["net.0.weight"], full.net[0].weight.detach()
    )
    pl.seed_everything(123)
    _, resumed = fit(
        tmp_path / "r",
        [make_cb(), ckpt(tmp_path / "ckpt")],
        model=make(),
        max_epochs=3,
        enable_checkpointing=True,
        ckpt_path=ep1,
    )
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    small = load_pruned(small_model(), str(ep2))
    x = torch.randn(8, 1, 40)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in small_model().parameters()) / 2
    small.eval()
    assert small(x).shape == (8, 10)


def test_wandb_gets_the_accuracy_vs_sparsity_table(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from wandb_offline import read_run

    pl.seed_everything(0)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="slim-tests")
    cb = IterativeMagnitudePruning({"kind": "imp", "rounds": 2, "rate": 0.5, "every": 1})
    fit(tmp_path, [cb], max_epochs=3, logger=logger, log_every_n_steps=1)
    wandb.finish()
    run = read_run(tmp_path)
    table = run.tables()["slim/pruning/accuracy_vs_sparsity"]
    assert table["columns"] == ["round", "sparsity", "accuracy", "step"]
    assert [row[0] for row in table["data"]] == [0, 1, 2]
    assert [round(row[1], 3) for row in table["data"]] == [0.0, 0.5, 0.75]
    assert all(0 < row[2] <= 1 for row in table["data"])
    rounds = run.series("slim/pruning/round")
    assert rounds[0] == 0 and rounds[-1] == 2 and rounds == sorted(rounds)  # the round boundaries
    # exactly round(0.75 n) of n = 2,416 weights zero (integer count, any CPU): < 2e-4, logged as float32
    assert run.summary["slim/pruning/final_sparsity"] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize("config", ["pruning_gradual", "pruning_structured"])
def test_other_lightning_cli_configs(config, tmp_path, monkeypatch):
    from pathlib import Path

    from lightning_slim.cli import main

    path = Path(__file__).resolve().parents[1] / "callbacks" / f"{config}.yaml"
    monkeypatch.setattr("sys.argv", ["lightning_slim.cli"])
    cli = main(
        [
            "fit",
            "--config",
            str(path),
            "--model",
            "lightning_slim.MNIST1DCNN",
            "--model.channels=16",
            "--data",
            "lightning_slim.MNIST1DDataModule",
            "--data.num_samples=1000",
            f"--trainer.max_epochs={3 if config == 'pruning_gradual' else 1}",  # gradual prunes once an epoch
            "--seed_everything=0",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, IterativeMagnitudePruning))
    assert cb.round >= 1 and cb.report_rows()["sparsity"] > 0
    if config == "pruning_structured":
        assert cli.model.net[0].out_channels < 16 and cli.model.net[7].out_features == 10


class UnderscoreNames(MNIST1DCNN):
    """A user's module that logs ``val_acc`` (not the default ``val/acc``)."""

    def validation_step(self, batch, batch_idx):
        logits, y = self(batch[0]), batch[1]
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())


def test_an_accuracy_metric_that_is_never_logged_is_warned_once_and_the_right_name_fills_the_curve(tmp_path):
    schedule = {"kind": "imp", "rounds": 2, "rate": 0.5, "every": 1}
    with pytest.warns(MissingMetricWarning) as caught:
        fit(tmp_path, [cb := IterativeMagnitudePruning(schedule)], model=UnderscoreNames(channels=8), max_epochs=3)
    said = [w for w in caught if issubclass(w.category, MissingMetricWarning)]
    assert len(said) == 1 and "accuracy_metric='val/acc' was not logged" in str(said[0].message)
    assert "'val_acc'" in str(said[0].message)  # the names that were logged
    assert [row[2] for row in cb.curve] == [None, None, None]
    fit(tmp_path, [cb := IterativeMagnitudePruning(schedule, accuracy_metric="val_acc")], model=UnderscoreNames(8))
    assert all(0 <= row[2] <= 1 for row in cb.curve[1:])  # epoch 0's event comes before any validation


def test_every_schedule_kind_counts_epochs_unless_told_steps():
    for kind in ({"kind": "imp"}, {"kind": "gradual"}, {"kind": "one_shot"}):
        assert parse_schedule(kind).unit == "epoch"
    # the README's gradual example: one pruning step per epoch, epochs 0 to 6
    readme = IterativeMagnitudePruning({"kind": "gradual", "final_sparsity": 0.8, "start": 0, "end": 6, "every": 1})
    assert readme.schedule.unit == "epoch" and [t for t, _ in readme.events] == [0, 1, 2, 3, 4, 5, 6]


def test_a_step_schedule_that_is_over_in_the_first_epoch_of_a_longer_training_warns_before_training(tmp_path):
    steps = []
    probe = pl.callbacks.LambdaCallback(on_train_batch_start=lambda *a: steps.append(1))
    gradual = {"kind": "gradual", "final_sparsity": 0.8, "start": 0, "end": 6, "every": 1, "unit": "step"}
    with pytest.warns(PruningScheduleWarning, match=r"7 events \(steps 0 to 6\) all come in the first epoch \(8 steps"):
        warns_first = pl.callbacks.LambdaCallback(on_train_start=lambda *a: steps.append("start"))
        fit(tmp_path, [IterativeMagnitudePruning(gradual, accuracy_metric=None), warns_first, probe], max_epochs=2)
    assert steps[0] == "start" and len(steps) == 17  # warned in on_train_start, before the first of 16 steps
    with warnings.catch_warnings():  # the same schedule in a one-epoch training, or a one-shot at a step: as meant
        warnings.simplefilter("error", PruningScheduleWarning)
        fit(tmp_path, [IterativeMagnitudePruning(gradual, accuracy_metric=None)], max_epochs=1)
        one_shot = {"kind": "one_shot", "sparsity": 0.5, "at": 3, "unit": "step"}
        fit(tmp_path, [IterativeMagnitudePruning(one_shot, accuracy_metric=None)], max_epochs=2)


class FailAtStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("stopped at step 2")


@pytest.mark.parametrize("fails", [False, True], ids=["teardown", "exception"])
def test_the_module_is_the_users_own_again_after_fit_or_a_failure(fails, tmp_path):
    """One teardown path (SlimCallback's, also when fit raises): Wanda's input hooks and the step wrapper go."""
    model = small_model()
    wanda = IterativeMagnitudePruning(
        {"kind": "one_shot", "sparsity": 0.5, "at": 1, "unit": "step"}, importance="wanda"
    )
    callbacks = [wanda, FailAtStep()] if fails else [wanda]
    if fails:
        with pytest.raises(RuntimeError, match="stopped at step 2"):
            fit(tmp_path, callbacks, model=model, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    else:
        fit(tmp_path, callbacks, model=model, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    assert wanda.round == 1 and wanda.norms.count  # its hooks recorded the steps
    assert not [name for name, m in model.named_modules() if m._forward_hooks]
    assert "training_step" not in model.__dict__ and "on_load_checkpoint" not in model.__dict__
