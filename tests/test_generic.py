"""The same tests for every callback in the registry (tests/cases/): a short fit, two fits in
a row, resume = uninterrupted, ddp_spawn with 2 CPU processes, the LightningCLI config, and
the keys a user finds in a real offline W&B run."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import CleanDistributedExit, all_cases
from lightning.pytorch.callbacks import ModelCheckpoint
from wandb_offline import read_run

from lightning_slim.core import interception

ROOT = Path(__file__).resolve().parents[1]
CASES = all_cases()
KEY = re.compile(r"^slim/[a-z_]+/[A-Za-z0-9_./\-]+$")


def trainer_for(case, tmp_path, **kwargs) -> pl.Trainer:
    args = dict(
        max_epochs=case.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    args.update(case.trainer_kwargs)
    args.update(kwargs)
    return pl.Trainer(**args)


def assert_unwrapped(module):
    assert "training_step" not in module.__dict__, "the training_step wrapper was left on the module"
    assert interception._ATTR not in module.__dict__


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_short_fit(case, tmp_path):
    pl.seed_everything(0)
    cb, module = case.callback(), case.model()
    trainer = trainer_for(case, tmp_path, callbacks=[cb])
    trainer.fit(module, datamodule=case.data())
    assert trainer.global_step > 0
    assert_unwrapped(module)
    if case.check:
        case.check(trainer, module, cb)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_two_fits_in_a_row(case, tmp_path):
    pl.seed_everything(0)
    cb, module, data = case.callback(), case.model(), case.data()
    for i in range(2):
        trainer = trainer_for(case, tmp_path / str(i), callbacks=[cb], max_epochs=1)
        trainer.fit(module, datamodule=data)
        assert_unwrapped(module)
        assert torch.isfinite(trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_resume_matches_uninterrupted(case, tmp_path):
    pl.seed_everything(0)
    every_epoch = lambda d: ModelCheckpoint(dirpath=d, save_top_k=-1, every_n_epochs=1)
    ckpt = every_epoch(tmp_path / "ckpt")
    full = case.model()
    trainer_for(case, tmp_path, callbacks=[case.callback(), ckpt], enable_checkpointing=True).fit(
        full, datamodule=case.data()
    )
    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))
    assert first, "no checkpoint after the first epoch"

    pl.seed_everything(123)  # resuming must not depend on the global RNG
    resumed = case.model()
    trainer_for(
        case,
        tmp_path / "resumed",
        callbacks=[case.callback(), every_epoch(tmp_path / "ckpt")],
        enable_checkpointing=True,
    ).fit(resumed, datamodule=case.data(), ckpt_path=first[0])
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        # resume_atol is 0 for every case: both runs replay the same batches through the same kernels on this CPU, so a
        # resumed run is bit-equal to the uninterrupted one
        torch.testing.assert_close(b[k], a[k], atol=case.resume_atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_ddp_spawn_two_processes(case, tmp_path):
    pl.seed_everything(0)
    module = case.model()
    trainer = trainer_for(
        case,
        tmp_path,
        callbacks=[case.callback(), CleanDistributedExit()],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=min(case.epochs, 2),
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=case.data())
    # ddp_spawn sends back the trained weights and metrics (not the step counter)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if k in before)
    if case.check_module:
        case.check_module(module)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_lightning_cli_config(case, tmp_path, monkeypatch):
    from lightning_slim.cli import main

    config = Path(case.config) if case.config else ROOT / "callbacks" / f"{case.name}.yaml"
    assert config.exists(), f"missing LightningCLI config {config}"
    args = [
        "fit",
        "--config",
        str(config),
        "--model",
        "lightning_slim.MNIST1DCNN",
        "--model.channels=16",
        "--data",
        "lightning_slim.MNIST1DDataModule",
        "--data.num_samples=1000",
        "--trainer.max_epochs=1",
        "--seed_everything=0",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        *case.cli_args,
    ]
    monkeypatch.setattr("sys.argv", ["lightning_slim.cli"])
    cli = main(args)
    expected = type(case.callback())
    assert any(type(cb) is expected for cb in cli.trainer.callbacks), cli.trainer.callbacks
    assert cli.trainer.global_step > 0


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_wandb_offline_keys(case, tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    pl.seed_everything(0)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="slim-tests")
    trainer = trainer_for(case, tmp_path, callbacks=[case.callback()], logger=logger, max_epochs=2, log_every_n_steps=1)
    trainer.fit(case.model(), datamodule=case.data())
    wandb.finish()
    run = read_run(tmp_path)
    seen = run.keys() | set(run.summary) | set(run.config)  # settings fixed for a run are config
    slim = {k for k in seen if k.startswith("slim/")}
    assert slim, f"no slim/ keys reached W&B; saw {sorted(seen)}"
    bad = sorted(k for k in slim if not KEY.match(k))
    assert not bad, f"malformed keys: {bad}"
    missing = [k for k in case.wandb_keys if k not in seen]
    assert not missing, f"missing {missing}; saw {sorted(slim)}"
