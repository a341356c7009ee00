"""The ``lightning-slim`` command and its shipped configs, as a user runs them: every config builds the
callbacks it names with the values it gives, configs compose, a shipped config is found by name, the
structural pruning config works on a module whose layers it does not know, and the W&B config writes
an offline run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cases.distillation import teacher_checkpoint

from lightning_slim import configs
from lightning_slim.cli import main, resolve_configs

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = configs.list_configs()
TINY = [
    "--model",
    "lightning_slim.MNIST1DCNN",
    "--model.channels=16",
    "--data",
    "lightning_slim.MNIST1DDataModule",
    "--data.num_samples=1000",
    "--data.with_index=true",
    "--seed_everything=0",
    "--trainer.enable_progress_bar=false",
]


def listed_callbacks(name: str) -> list[dict]:
    return yaml.safe_load(configs.path(name).read_text())["trainer"].get("callbacks+", [])


def holds(parsed, given) -> bool:
    """Every value the YAML gives is in the parsed config (which adds the defaults of nested configs)."""
    if isinstance(given, dict):
        return all(holds(parsed[key], value) for key, value in given.items())
    return parsed == given


def slim_callbacks(trainer) -> list:
    return [cb for cb in trainer.callbacks if type(cb).__module__.startswith("lightning_slim")]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """The working folder a user runs the command in: the recipes' teacher checkpoint is there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    os.symlink(teacher_checkpoint(), tmp_path / "checkpoints" / "teacher.ckpt")
    monkeypatch.setattr("sys.argv", ["lightning-slim"])
    return tmp_path


def test_every_config_is_shipped_and_appends_its_callbacks():
    assert {p.stem for p in (ROOT / "callbacks").glob("*.yaml")} == set(SHIPPED)
    for name in SHIPPED:
        trainer = yaml.safe_load(configs.path(name).read_text())["trainer"]
        # a plain `callbacks:` list replaces the callbacks of every config given before it
        assert "callbacks" not in trainer, f"{name}.yaml: use `callbacks+:` so that configs compose"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_builds_the_callbacks_it_names(name, in_tmp):
    cli = main(["--config", name, *TINY, f"--trainer.default_root_dir={in_tmp}", "--trainer.logger=false"], run=False)
    listed = listed_callbacks(name)
    built = slim_callbacks(cli.trainer)
    assert [type(cb).__name__ for cb in built] == [s["class_path"].rsplit(".", 1)[1] for s in listed]
    for spec, callback in zip(listed, built):  # the values the YAML gives reach the callback
        parsed = next(c for c in cli.config.trainer.callbacks if c.class_path == spec["class_path"])
        assert holds(parsed.init_args, spec.get("init_args", {})), (name, spec, parsed.init_args)
        assert callback is not None


def test_two_configs_compose(in_tmp):
    """`--config a --config b` keeps the callbacks of both (a second `callbacks:` list used to replace the first)."""
    args = ["fit", "--config", "pruning.yaml", "--config", "compression_report.yaml", *TINY]
    args += [f"--trainer.default_root_dir={in_tmp}", "--trainer.logger=false", "--trainer.max_epochs=2"]
    cli = main(args)
    names = [type(cb).__name__ for cb in slim_callbacks(cli.trainer)]
    assert names == ["IterativeMagnitudePruning", "CompressionReport"], names
    pruning = slim_callbacks(cli.trainer)[0]
    assert pruning.report_rows()["sparsity"] > 0  # the pruning callback really ran
    report_json = next(in_tmp.rglob("compression_report.json"))
    assert "pruning" in report_json.read_text()  # and the report saw it


def test_a_callback_added_on_the_command_line_joins_those_of_the_configs(in_tmp):
    cli = main(
        [
            "--config",
            "quantization.yaml",
            "--trainer.callbacks+=lightning_slim.CompressionReport",
            *TINY,
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert [type(cb).__name__ for cb in slim_callbacks(cli.trainer)] == [
        "QuantizationAwareTraining",
        "CompressionReport",
    ]


def test_config_names_resolve_and_files_win(tmp_path):
    assert resolve_configs(["fit", "--config", "pruning"])[2] == str(configs.path("pruning"))
    local = tmp_path / "pruning.yaml"
    local.write_text("trainer: {}\n")
    assert resolve_configs(["fit", f"--config={local}", "--model", "pruning"]) == [
        "fit",
        f"--config={local}",
        "--model",
        "pruning",  # only --config values are looked up
    ]
    assert resolve_configs(["--config", "no_such_config.yaml"])[1] == "no_such_config.yaml"  # jsonargparse says so


def test_console_command_composes_structural_pruning_and_the_report_on_a_users_module(tmp_path):
    """The installed `lightning-slim` command (here `python -m lightning_slim.cli`, the same entry point),
    in a fresh process: pruning_structured.yaml names no layer, so it prunes a module it has never seen."""
    args = ["fit", "--config", "pruning_structured.yaml", "--config", "compression_report.yaml"]
    args += ["--model", "user_module.Digits", "--data", "user_module.RandomDigits", "--trainer.max_epochs=1"]
    args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_slim.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = next(tmp_path.rglob("compression_report.json")).read_text()
    import json

    rows = json.loads(report)
    params = rows["before"]["params"], rows["after"]["params"]
    assert params[1] < 0.75 * params[0], params  # 30% of the channels of both convs: about half the weights


def test_wandb_config_writes_an_offline_run(in_tmp):
    from wandb_offline import read_run

    cli = main(
        [
            "fit",
            "--config",
            "wandb.yaml",
            "--config",
            "pruning_gradual.yaml",
            *TINY,
            f"--trainer.default_root_dir={in_tmp}",
            "--trainer.max_epochs=1",
            "--trainer.log_every_n_steps=1",
        ]
    )
    import wandb

    wandb.finish()
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    run = read_run(in_tmp / "wandb_runs")  # offline: a run folder on disk, nothing sent
    assert any(k.startswith("slim/pruning/") for k in run.keys()), sorted(run.keys())
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
