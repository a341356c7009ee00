"""Package set-up, demo data, measurement and the compression report."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from cases import small_data, small_model
from wandb_offline import read_run

from lightning_slim.batches import BatchFormatError, batch_indices, batch_inputs, slice_batch
from lightning_slim.demos.data import DigitsDataModule, EpochSeededSampler, MNIST1DDataModule
from lightning_slim.demos.models import MNIST1DMLP, DigitsCNN, MNIST1DTransformer
from lightning_slim.reporting.measure import count_nonzero_parameters, measure, serialized_bytes
from lightning_slim.reporting.report import CompressionReport


def test_import_is_lean():
    code = (
        "import sys, lightning_slim; lightning_slim.MNIST1DCNN; lightning_slim.CompressionReport;"
        "print([m for m in ('wandb', 'torchao', 'torch_pruning') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_label_noise_holdout_and_indices():
    dm = MNIST1DDataModule(num_samples=1000, label_noise=0.3, holdout_fraction=0.25, with_index=True)
    dm.setup()
    assert len(dm.y_holdout) == 200 and len(dm.y_train) == 600
    assert dm.noisy.sum() == 180
    # corrupted labels really differ from the clean ones, and only those
    assert torch.equal(dm.y_train != dm.y_train_clean, dm.noisy)
    x, y, idx = next(iter(dm.train_dataloader()))
    assert torch.equal(dm.x_train[idx], x) and torch.equal(dm.y_train[idx], y)
    # the holdout comes from the same distribution but keeps clean labels
    clean = MNIST1DDataModule(num_samples=1000, holdout_fraction=0.25)
    clean.setup()
    assert torch.equal(clean.y_holdout, dm.y_holdout)


def test_same_seed_same_noise_and_generated_data_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SLIM_CACHE", str(tmp_path))
    a = MNIST1DDataModule(num_samples=200, label_noise=0.2)
    a.setup()
    assert len(list(tmp_path.glob("mnist1d_*.pt"))) == 1
    b = MNIST1DDataModule(num_samples=200, label_noise=0.2)
    b.setup()
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.x_train, b.x_train)


def test_shuffling_is_independent_of_the_label_noise():
    dm = MNIST1DDataModule(num_samples=1000, label_noise=0.3, seed=0, batch_size=100)
    dm.setup()
    for epoch in range(3):
        dm_loader = dm.train_dataloader()
        dm_loader.sampler.set_epoch(epoch)
        first = torch.tensor(list(dm_loader.sampler))[:100]
        # a seed shared by the shuffle and the corruption would put the noisy labels first
        assert 0.15 < dm.noisy[first].float().mean() < 0.45, epoch


def test_sampler_order_depends_only_on_seed_and_epoch():
    s = EpochSeededSampler(50, seed=3)
    s.set_epoch(2)
    first = list(s)
    torch.manual_seed(999)
    assert list(s) == first
    s.set_epoch(3)
    assert list(s) != first and sorted(s) == list(range(50))


@pytest.mark.parametrize(
    "bad", [dict(label_noise=1.0), dict(holdout_fraction=-0.1), dict(batch_size=0), dict(num_samples=3)]
)
def test_bad_data_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MNIST1DDataModule(**bad)


def test_unknown_data_option_is_an_error():
    with pytest.raises(TypeError, match="label_nosie"):
        MNIST1DDataModule(label_nosie=0.1)


def test_digits_data_and_conv2d_model_learn_quickly():
    pl.seed_everything(0)
    dm, model = DigitsDataModule(batch_size=64), DigitsCNN()
    trainer = pl.Trainer(
        max_epochs=5, logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["val/acc"] > 0.9


def test_models_forward_and_per_sample_loss():
    x, y = torch.randn(6, 1, 40), torch.randint(0, 10, (6,))
    for model in (MNIST1DMLP(), MNIST1DTransformer()):
        assert model(x).shape == (6, 10)
        assert model.per_sample_loss((x, y)).shape == (6,)


def test_batch_helpers_on_tuples_dicts_and_errors():
    x, y, i = torch.randn(4, 3), torch.arange(4), torch.arange(10, 14)
    rows = torch.tensor([3, 1])
    assert torch.equal(slice_batch((x, y, i), rows)[2], torch.tensor([13, 11]))
    d = slice_batch({"x": x, "y": y, "meta": "keep"}, rows)
    assert torch.equal(d["x"], x[rows]) and d["meta"] == "keep"
    assert torch.equal(batch_indices({"x": x, "index": i}), i) and batch_indices((x, y)) is None
    with pytest.raises(BatchFormatError, match="expected one of"):
        batch_inputs({"features": x})


def test_measure_counts_zeros_and_bytes():
    model = small_model()
    dense = measure(model, torch.randn(8, 1, 40), latency=True, repeats=3)
    with torch.no_grad():
        model.net[0].weight.zero_()
    assert count_nonzero_parameters(model) == dense["params"] - model.net[0].weight.numel()
    assert dense["size_bytes"] == serialized_bytes(model) > 4 * dense["params"]
    assert dense["macs"] > 0 and dense["latency_ms"] > 0


def test_report_writes_json_and_wandb_table_and_summary(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    report = CompressionReport(latency_batch_size=32, output_path=str(tmp_path / "r.json"))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=WandbLogger(offline=True, save_dir=str(tmp_path)),
        callbacks=[report],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(small_model(), datamodule=small_data())
    wandb.finish()
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["before"]["params"] == saved["after"]["params"]
    assert saved["after"]["latency_ms"] > 0 and "accuracy" in saved["after"]
    run = read_run(tmp_path)
    assert run.summary["slim/report/deployed/params"] == saved["after"]["params"]
    table = run.tables()["slim/report/table"]
    assert ["parameters", saved["before"]["params"], saved["after"]["params"], "same"] in table["data"]


def test_report_warns_about_a_metric_that_is_never_logged(tmp_path):
    report = CompressionReport(
        accuracy_metric="val/accuracy", measure_latency=False, output_path=str(tmp_path / "r.json")
    )
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[report],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="val/accuracy.*never logged.*val/acc"):
        trainer.fit(small_model(), datamodule=small_data())
    assert "accuracy" not in report.after and report.after["params"] > 0  # the rest is still reported


def test_report_rejects_bad_arguments():
    with pytest.raises(ValueError, match="latency_batch_size=0"):
        CompressionReport(latency_batch_size=0)


class _DictBatchModule(pl.LightningModule):
    """A user module whose batches are dicts with keys the report cannot guess."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch["features"]), batch["label_id"])

    def train_dataloader(self):
        data = [{"features": torch.randn(4), "label_id": torch.tensor(i % 2)} for i in range(16)]
        return torch.utils.data.DataLoader(data, batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_report_warns_about_a_model_it_cannot_measure_and_reports_the_rest(tmp_path):
    report = CompressionReport(accuracy_metric=None, output_path=str(tmp_path / "r.json"))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[report],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="cannot find the inputs.*features"):
        trainer.fit(_DictBatchModule())
    assert report.after["params"] == 10 and "macs" not in report.after and "latency_ms" not in report.after
    assert json.loads((tmp_path / "r.json").read_text())["after"]["size_bytes"] > 0
