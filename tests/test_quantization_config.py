"""QuantizationConfig: validated up front with errors that name the value and what is allowed, taken by
the callback as ``config=`` or as keyword arguments, and built from the shipped YAML configs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lightning_slim import QuantizationAwareTraining, QuantizationConfig, configs
from lightning_slim.cli import main


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(weight_bits=3), r"weight_bits=3 is not supported; allowed: \[8, 4\]"),
        (dict(activation_bits=4), "activation_bits=4 is not supported; allowed: 8 or None"),
        (dict(runtime="tensorrt"), r"runtime='tensorrt' is not one of \('onnxruntime', 'torchao'\)"),
        (dict(activation_mode="per_tensor"), r"activation_mode='per_tensor' is not one of \('static', 'dynamic'\)"),
        (dict(group_size=1), "group_size=1 must be an integer >= 2"),
        (dict(fold_bn="yes"), "fold_bn='yes' must be true or false"),
        (dict(targets="Linear"), "targets='Linear' must be a list of strings"),
        (dict(unit="batch"), r"unit='batch' is not one of \('epoch', 'step'\)"),
        (dict(start_after=2, freeze_ranges_after=1), "freeze_ranges_after=1 comes before start_after=2"),
        (dict(export_inputs=[]), r"export_inputs=\[\] must be a non-empty list of batch keys"),
        (dict(export_module=3), "export_module=3 must be a module path"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(options, match):
    with pytest.raises(ValueError, match=match):
        QuantizationConfig(**options)


def test_the_callback_takes_a_config_or_its_fields_not_both():
    config = QuantizationConfig(runtime="torchao", targets=["Linear"], start_after=0, unit="step")
    assert QuantizationAwareTraining(config=config).config == config
    assert QuantizationAwareTraining(config=dataclasses.asdict(config)).config == config  # a YAML mapping
    assert QuantizationAwareTraining(runtime="torchao", targets=["Linear"], start_after=0, unit="step").config == config
    assert QuantizationAwareTraining(config=config).backend.name == "torchao"
    with pytest.raises(
        ValueError, match=r"either in config or as arguments, not both \(also given: \['weight_bits'\]\)"
    ):
        QuantizationAwareTraining(weight_bits=4, config=config)
    with pytest.raises(ValueError, match="config has no option 'bits'; its options are"):
        QuantizationAwareTraining(config={"bits": 4})


CLI = ["--model", "lightning_slim.MNIST1DMLP", "--data", "lightning_slim.MNIST1DDataModule"]
CLI += [
    "--data.num_samples=200",
    "--seed_everything=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.parametrize("name", ["quantization", "quantization_int4"])
def test_shipped_yaml_builds_the_config_it_gives(name, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-slim"])
    given = yaml.safe_load(configs.path(name).read_text())["trainer"]["callbacks+"][0]["init_args"]
    cli = main(["--config", name, *CLI, f"--trainer.default_root_dir={tmp_path}"], run=False)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
    assert cb.config == QuantizationConfig(**given)
    # the same options as one `config:` mapping build the same config
    nested = {"trainer": {"callbacks+": [{"class_path": "lightning_slim.QuantizationAwareTraining"}]}}
    nested["trainer"]["callbacks+"][0]["init_args"] = {"config": given}
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(nested))
    cli = main(["--config", str(path), *CLI, f"--trainer.default_root_dir={tmp_path}"], run=False)
    (again,) = [c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
    assert again.config == cb.config
