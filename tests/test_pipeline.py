"""All four techniques in one Trainer on one model (issue 7): the order of their effects, the
export, combinations that are refused, the combined LightningCLI recipes, and real DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cases import small_data  # noqa: E402

from lightning_slim.batches import batch_size  # noqa: E402
from lightning_slim.core.compose import IncompatibleCallbacksError  # noqa: E402
from lightning_slim.demos.models import MNIST1DCNN, MNIST1DTeacherCNN  # noqa: E402
from lightning_slim.demos.pipeline import compression_callbacks, find  # noqa: E402
from lightning_slim.quantization.export import int8_weights  # noqa: E402


class RecordingCNN(MNIST1DCNN):
    """The user's module, unchanged but for recording the batch sizes its training_step sees."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.step_sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        self.step_sizes.append(batch_size(batch))
        return super().training_step(batch, batch_idx)


def teacher() -> nn.Module:
    torch.manual_seed(1234)
    return MNIST1DTeacherCNN(channels=32).eval()


def pipeline_fit(tmp_path, reverse: bool = False, epochs: int = 3, **trainer_kwargs):
    pl.seed_everything(0)
    data = small_data(with_index=True, batch_size=200)
    student = RecordingCNN(channels=16)
    callbacks = compression_callbacks(
        teacher(), epochs, keep=0.5, sparsity=0.5, report_path=str(tmp_path / "report.json"), measure_latency=False
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks[::-1] if reverse else callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        **trainer_kwargs,
    )
    trainer.fit(student, datamodule=data)
    return trainer, student


def test_all_four_in_one_trainer(tmp_path):
    trainer, student = pipeline_fit(tmp_path)
    # selection ran first: the user's step trained on half of every 200-example super-batch (the first
    # call is distillation's check before training: the user's step on a 2-example sample batch)
    assert student.step_sizes == [2] + [100] * 12
    # distillation added its term on that sub-batch (its teacher ran once per example, cached)
    kd = find(trainer, "distillation")
    assert kd.counts["student_examples"] == 1200 and kd.counts["teacher_examples"] <= 800
    assert torch.isfinite(trainer.callback_metrics["slim/distillation/kd_loss"])
    # pruning: the trained float weights are exactly zero where masked, at the target sparsity
    pruning = find(trainer, "pruning")
    # global magnitude pruning zeroes exactly round(0.5 n) of the student's n = 2,416 weights (integer count, any CPU):
    # error < 2e-4 plus kept weights trained to exactly 0; 0.01 still fails a schedule one step short
    assert abs(pruning.report_rows()["sparsity"] - 0.5) < 0.01
    for name, mask in pruning.masks.items():
        assert not student.get_submodule(name).weight[~mask.bool()].any(), name
    # the export: pruning made permanent, then int8; masked positions are exact int8 zeros
    report = find(trainer, "report")
    shipped = int8_weights(report.exported_model)  # the int8 initializers of the ONNX file
    assert set(pruning.masks) <= set(shipped)
    for name, mask in pruning.masks.items():
        assert shipped[name].dtype == torch.int8, name
        assert not shipped[name][~mask.bool().reshape(mask.shape[0], -1)].any(), name
    # (a 2.4k-parameter model: per-tensor serialization overhead, not the weights, dominates its bytes)
    assert report.after["size_bytes"] < report.before["size_bytes"]
    # the int8 model predicts like the fake-quantized model Lightning validated, up to rounding ties (below)
    assert abs(report.after["export_accuracy"] - report.after["accuracy"]) < 0.02
    assert set(report.techniques) == {"selection", "distillation", "pruning", "quantization"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["techniques"]["selection"]["examples_trained"] == 1200
    assert "training_step" not in student.__dict__


def test_order_of_effects_does_not_depend_on_the_callback_list(tmp_path):
    _, forward = pipeline_fit(tmp_path / "a", epochs=3)
    _, backward = pipeline_fit(tmp_path / "b", epochs=3, reverse=True)
    for (k, a), b in zip(forward.state_dict().items(), backward.state_dict().values()):
        # exact: both runs execute the same operations on the same CPU in one process (same kernels, same order); a
        # different order of effects changes the weights far above one ulp
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: [
                __import__("lightning_slim").IterativeMagnitudePruning(),
                __import__("lightning_slim").IterativeMagnitudePruning(),
            ],
            "more than one 'pruning'",
        ),
        (
            lambda: [__import__("lightning_slim").OnlineDataSelection(keep=0.5, reference="teacher")],
            "needs a .teacher. that another callback provides",
        ),
        (
            lambda: [
                __import__("lightning_slim").IterativeMagnitudePruning(
                    {"kind": "one_shot", "sparsity": 0.5, "at": 2}, pattern="channels", targets=["Conv1d"]
                ),
                __import__("lightning_slim").QuantizationAwareTraining(start_after=1),
            ],
            "changes the model.s structure until epoch 2, but QuantizationAwareTraining needs it fixed from epoch 1",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_before_training(build, match, tmp_path):
    student = MNIST1DCNN(channels=16)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    # two callbacks of one type: Lightning refuses them itself (duplicate state_key) at construction
    with pytest.raises((IncompatibleCallbacksError, RuntimeError), match=f"{match}|more than one stateful"):
        trainer = pl.Trainer(
            max_epochs=1,
            callbacks=build(),
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(student, datamodule=small_data(with_index=True))
    assert "training_step" not in student.__dict__
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "callbacks").glob("recipe_*.yaml")))
def test_combined_recipes_run_through_lightning_cli(recipe, tmp_path, monkeypatch):
    from cases.distillation import teacher_checkpoint

    from lightning_slim.cli import main

    monkeypatch.chdir(tmp_path)  # recipes name the teacher checkpoint relative to the working folder
    (tmp_path / "checkpoints").mkdir()
    os.symlink(teacher_checkpoint(), tmp_path / "checkpoints" / "teacher.ckpt")
    monkeypatch.setattr("sys.argv", ["lightning_slim.cli"])
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "callbacks" / recipe),
            "--model",
            "lightning_slim.MNIST1DCNN",
            "--model.channels=16",
            "--data",
            "lightning_slim.MNIST1DDataModule",
            "--data.num_samples=1000",
            "--data.with_index=true",
            "--data.batch_size=200",
            "--data.holdout_fraction=0.2",
            "--trainer.max_epochs=3",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--seed_everything=0",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    techniques = {getattr(cb, "technique", None) for cb in cli.trainer.callbacks}
    assert len(techniques & {"pruning", "quantization", "distillation", "selection"}) >= 2, techniques
    assert cli.trainer.global_step > 0 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_channel_pruning_then_qat_on_the_smaller_model(tmp_path):
    from lightning_slim import CompressionReport, IterativeMagnitudePruning, QuantizationAwareTraining

    pl.seed_everything(0)
    report = CompressionReport(measure_latency=False, output_path=str(tmp_path / "r.json"))
    callbacks = [
        IterativeMagnitudePruning(
            {"kind": "one_shot", "sparsity": 0.5, "at": 1}, pattern="channels", targets=["Conv1d"], scope="layer"
        ),
        QuantizationAwareTraining(start_after=2),
        report,
    ]
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(MNIST1DCNN(channels=16), datamodule=small_data())
    assert report.after["params"] < 0.4 * report.before["params"]  # half the channels of each conv
    # int8 export vs the fake-quantized model on the 200 test examples: only rounding ties (a value within float error
    # of an int8 rounding boundary moves one step) flip a prediction near a class boundary; 0.02 allows 3 of 200 such
    # flips, on any CPU; a wrong scale or layout costs far more
    assert abs(report.after["export_accuracy"] - report.after["accuracy"]) < 0.02


def _ddp_worker(out: Path) -> None:
    class Probe(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # collectives are safe here
            mine = torch.tensor(
                [sum(float(p.detach().double().abs().sum()) for p in pl_module.parameters())], dtype=torch.float64
            )
            record = {
                "gathered": trainer.strategy.all_gather(mine).flatten().tolist(),
                "step_sizes": pl_module.step_sizes,
            }
            (out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json").write_text(json.dumps(record))

    pl.seed_everything(0)
    callbacks = compression_callbacks(
        teacher(), 3, keep=0.5, sparsity=0.5, report_path=str(out / "report.json"), measure_latency=False
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        callbacks=[*callbacks, Probe()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(RecordingCNN(channels=16), datamodule=small_data(with_index=True, batch_size=200))


def test_pipeline_under_real_ddp_two_processes(tmp_path):
    # strategy="ddp" re-launches the running script for rank 1; inside pytest that would re-run
    # pytest, so this file is also the script, run in a subprocess with a clean environment
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    }
    env["PYTHONWARNINGS"] = "ignore"
    # the script's own folder (tests/) comes first on its path: put this checkout's package before any installed one
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for epoch in range(3):
        r0, r1 = (json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1))
        # both ranks hold the same weights after every epoch (masks, int8 ranges and all)
        assert r0["gathered"] == r1["gathered"] and r0["gathered"][0] == r0["gathered"][1], epoch
    # each rank selected half of its own 200-example super-batches (800 examples / 2 ranks = 2 steps)
    assert r0["step_sizes"] == r1["step_sizes"] == [2] + [100] * 6  # 2: distillation's check before training
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["after"]["nonzero_params"] < 0.6 * report["before"]["params"]


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
