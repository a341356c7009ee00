"""Pruning's and selection's dataclass configs: the callback built from keyword shortcuts, from a config
object, from its dict and from YAML holds the same config; giving both is refused; bad values are refused
when the config is built, naming the value; ``structured=True`` is deprecated for ``pattern="channels"``."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import yaml

from lightning_slim import IterativeMagnitudePruning, OnlineDataSelection, configs
from lightning_slim.cli import main
from lightning_slim.pruning import OneShotSchedule, PruningConfig
from lightning_slim.selection import JointSelection, SelectionConfig, SelectionWindow

TINY = [
    "--model",
    "lightning_slim.MNIST1DCNN",
    "--model.channels=8",
    "--data",
    "lightning_slim.MNIST1DDataModule",
    "--data.num_samples=200",
    "--seed_everything=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]


def test_pruning_config_is_the_same_whichever_way_it_is_given():
    options = dict(
        schedule={"kind": "one_shot", "sparsity": 0.5, "at": 1}, pattern="2:4", importance="wanda", exclude=["net.0"]
    )
    by_keywords = IterativeMagnitudePruning(**options).config
    assert IterativeMagnitudePruning(config=PruningConfig(**options)).config == by_keywords
    assert IterativeMagnitudePruning(config=options).config == by_keywords
    # the schedule is held parsed: its dict and its object are one config
    assert PruningConfig(**{**options, "schedule": OneShotSchedule(sparsity=0.5, at=1)}) == by_keywords
    assert by_keywords.schedule == OneShotSchedule(sparsity=0.5, at=1)
    # the callback acts on what the config says
    cb = IterativeMagnitudePruning(config=options)
    assert (cb.events, str(cb.pattern), cb.scope) == ([(1, 0.5)], "2:4", "row")


def test_selection_config_is_the_same_whichever_way_it_is_given():
    options = dict(keep=0.25, score="hard", joint={"num_chunks": 2}, window={"start_step": 3, "outside": "full"})
    by_keywords = OnlineDataSelection(**options).config
    assert OnlineDataSelection(config=SelectionConfig(**options)).config == by_keywords
    assert OnlineDataSelection(config=options).config == by_keywords
    # the groups are held as their dataclasses, and the callback reads them
    assert by_keywords.joint == JointSelection(num_chunks=2)
    assert by_keywords.window == SelectionWindow(start_step=3, outside="full")
    cb = OnlineDataSelection(config=options)
    assert (cb.keep, cb.config.window.contains(2), cb.config.window.contains(3)) == (0.25, False, True)
    assert SelectionConfig(joint=True).joint == JointSelection() and SelectionConfig(joint=False).joint is None


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: IterativeMagnitudePruning(config=PruningConfig(), rewind="lr"),
            r"not both \(also given: \['rewind'\]\)",
        ),
        (lambda: OnlineDataSelection(keep=0.5, config={"keep": 0.25}), r"not both \(also given: \['keep'\]\)"),
        (lambda: PruningConfig(example_input_dtype="int8"), "example_input_dtype='int8' is not one of"),
        (lambda: PruningConfig(targets="Linear"), "targets='Linear' must be a list of strings"),
        (lambda: PruningConfig(pattern="4:2"), "pattern='4:2' is not one of"),
        (lambda: PruningConfig(schedule={"kind": "cubic"}), "schedule kind='cubic' is not one of"),
        (lambda: IterativeMagnitudePruning(config={"sparsity": 0.5}), "config has no option 'sparsity'"),
        (lambda: SelectionConfig(keep=0.0), r"keep=0.0 is outside the allowed range \(0, 1\]"),
        (lambda: SelectionConfig(selection="best"), "selection='best' is not one of"),
        (lambda: SelectionConfig(seed=-1), "seed=-1 must be an integer >= 0"),
        (lambda: SelectionConfig(window={"stop": 3}), "window has no option 'stop'"),
        (lambda: SelectionConfig(reference="teacher", reference_losses="x.pt"), "either reference"),
        (lambda: OnlineDataSelection(reference="student"), "reference='student': the only string allowed is 'teacher'"),
    ],
)
def test_bad_configs_are_refused_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_reference_of_another_kind_is_refused_when_built():
    with pytest.raises(TypeError, match="reference must be an nn.Module, 'teacher' or a checkpoint dict; got int"):
        SelectionConfig(reference=3)


def test_structured_is_deprecated_for_pattern_channels():
    with pytest.warns(FutureWarning, match="use pattern='channels'"):
        old = IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.3}, structured=True)
    assert old.config == IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.3}, pattern="channels").config
    assert old.structured and old.config.structured  # derived from the pattern, not stored beside it
    assert "structured" not in {f.name for f in dataclasses.fields(PruningConfig)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped structural config uses the pattern: no warning
        spec = yaml.safe_load(configs.path("pruning_structured").read_text())["trainer"]["callbacks+"][0]
        assert IterativeMagnitudePruning(**spec["init_args"]).structured


@pytest.mark.parametrize(
    "name", [n for n in configs.list_configs() if n.startswith(("pruning", "selection", "recipe"))]
)
def test_shipped_configs_build_the_config_their_values_say(name):
    """Each shipped YAML's init_args, given as keyword shortcuts, make the same config as given as a config."""
    specs = yaml.safe_load(configs.path(name).read_text())["trainer"]["callbacks+"]
    for spec in specs:
        cls = {"IterativeMagnitudePruning": PruningConfig, "OnlineDataSelection": SelectionConfig}.get(
            spec["class_path"].rsplit(".", 1)[1]
        )
        if cls is not None:
            callback = {PruningConfig: IterativeMagnitudePruning, SelectionConfig: OnlineDataSelection}[cls]
            assert callback(**spec["init_args"]).config == cls(**spec["init_args"])


def test_a_config_mapping_in_yaml_builds_the_callback(tmp_path, monkeypatch):
    """LightningCLI: ``config:`` as one mapping under init_args reaches the callback as its dataclass."""
    monkeypatch.setattr("sys.argv", ["lightning-slim"])  # the command's own arguments: only those given
    path = tmp_path / "slim.yaml"
    pruning = {"schedule": {"kind": "one_shot", "sparsity": 0.5, "at": 1}, "pattern": "channels", "scope": "layer"}
    selection = {"keep": 0.5, "score": "uniform", "window": {"start_step": 2}}
    callbacks = [
        {"class_path": "lightning_slim.IterativeMagnitudePruning", "init_args": {"config": pruning}},
        {"class_path": "lightning_slim.OnlineDataSelection", "init_args": {"config": selection}},
    ]
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": callbacks}}))
    cli = main(["--config", str(path), *TINY, f"--trainer.default_root_dir={tmp_path}"], run=False)
    built = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    assert built["IterativeMagnitudePruning"].config == PruningConfig(**pruning)
    assert built["OnlineDataSelection"].config == SelectionConfig(**selection)


@pytest.mark.parametrize(
    ("callback", "config"),
    [
        ("IterativeMagnitudePruning", "lightning_slim.pruning.PruningConfig"),
        ("OnlineDataSelection", "lightning_slim.selection.SelectionConfig"),
        ("QuantizationAwareTraining", "lightning_slim.QuantizationConfig"),
        ("KnowledgeDistillation", "lightning_slim.distillation.DistillationConfig"),
        ("LowRankFactorization", "lightning_slim.factorization.FactorizationConfig"),
    ],
)
def test_every_keyword_shortcut_is_a_config_field(callback, config):
    """config_from reads the constructor's locals() by the config's field names: a keyword argument that
    is no field would be dropped without a word."""
    import dataclasses
    import inspect

    from lightning_slim.core.loading import import_object

    params = set(inspect.signature(import_object(f"lightning_slim.{callback}")).parameters) - {"config", "structured"}
    fields = {f.name for f in dataclasses.fields(import_object(config)) if f.init}
    assert params <= fields, params - fields
