"""Distillation's whole dataclass config: the callback built from keyword shortcuts, from a
``DistillationConfig``, from its dict and from a ``config:`` mapping in YAML (LightningCLI, the shipped
distillation config) holds the same config and acts on it; giving both is refused; bad values are refused
when the config is built, naming the value and what is allowed."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import yaml
from cases.distillation import teacher_checkpoint
from test_technique_configs import TINY  # a tiny MNIST-1D CNN and data, no logger
from torch import nn

from lightning_slim import KnowledgeDistillation, configs
from lightning_slim.cli import main
from lightning_slim.distillation import (
    DistillationConfig,
    DistillationSchedule,
    FeatureDistillation,
    TeacherCacheConfig,
    TokenMask,
)

TEACHER_CLASS = "lightning_slim.MNIST1DTeacherCNN"


def tiny_teacher() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def shipped_distillation_args(name: str = "distillation") -> list[dict]:
    """The init_args of every KnowledgeDistillation a shipped config lists, its checkpoint a real one."""
    specs = yaml.safe_load(configs.path(name).read_text())["trainer"]["callbacks+"]
    return [
        {**spec["init_args"], "teacher_checkpoint": teacher_checkpoint()}
        for spec in specs
        if spec["class_path"].endswith(".KnowledgeDistillation")
    ]


def test_every_constructor_option_is_a_field_of_the_config():
    options = set(inspect.signature(KnowledgeDistillation).parameters) - {"config"}
    assert options == {f.name for f in dataclasses.fields(DistillationConfig)}


def test_distillation_config_is_the_same_whichever_way_it_is_given():
    teacher = tiny_teacher()
    options = dict(
        teacher=teacher,
        alpha=0.8,
        temperature=2.0,
        convention="additive",
        schedule={"start_step": 2, "stop_step": 10, "alpha_final": 0.2},
        features={"pairs": {"net.5": "1"}, "loss": "cosine"},
        tokens={"padding": False},
        cache_teacher={"top_k": 2, "key": "content"},
        seed=3,
    )
    by_keywords = KnowledgeDistillation(**options).config
    assert KnowledgeDistillation(config=DistillationConfig(**options)).config == by_keywords
    assert KnowledgeDistillation(config=options).config == by_keywords
    # the groups are held as their dataclasses, so their dicts and their objects make one config
    assert by_keywords.schedule == DistillationSchedule(start_step=2, stop_step=10, alpha_final=0.2)
    assert by_keywords.features == FeatureDistillation(pairs={"net.5": "1"}, loss="cosine")
    assert by_keywords.tokens == TokenMask(padding=False)
    assert by_keywords.cache_teacher == TeacherCacheConfig(top_k=2, key="content")
    assert DistillationConfig(teacher=teacher, cache_teacher=True).cache_teacher == TeacherCacheConfig()
    assert DistillationConfig(teacher=teacher, cache_teacher=False).cache_teacher is None
    # the callback acts on what the config says: the window, the annealing from alpha to alpha_final,
    # the convention (no 1 - alpha scaling of the task loss under "additive"), the cache it keeps
    cb = KnowledgeDistillation(config=options)
    assert cb.teacher is teacher and not teacher.training
    assert cb.weights_at(1)[0] is False and cb.weights_at(10)[0] is False
    active, alpha, temperature = cb.weights_at(6)  # half-way from step 2 to the anneal's end at stop_step 10
    # approx: a linear schedule evaluated in float64 (one multiply-add), exact up to its rounding, on any CPU
    assert active and alpha == pytest.approx(0.5) and temperature == 2.0
    loss = torch.tensor(3.0)
    assert cb.scale_loss(type("T", (), {"global_step": 6})(), None, loss, None, 0) is loss
    assert cb.cache_keys.key == "content" and cb.runner.config.top_k == 2


def test_a_config_mapping_in_yaml_builds_the_shipped_distillation(tmp_path, monkeypatch):
    """LightningCLI: the shipped distillation config's options as one ``config:`` mapping reach the
    callback as the same ``DistillationConfig`` as the shipped config's keyword shortcuts."""
    monkeypatch.setattr("sys.argv", ["lightning-slim"])  # the command's own arguments: only those given
    (shipped,) = shipped_distillation_args()
    as_config = tmp_path / "as_config.yaml"
    callback = {"class_path": "lightning_slim.KnowledgeDistillation", "init_args": {"config": shipped}}
    as_config.write_text(yaml.safe_dump({"trainer": {"callbacks+": [callback]}}))
    checkpoint = f"--trainer.callbacks.init_args.teacher_checkpoint={teacher_checkpoint()}"
    built = {}
    for how, args in {
        "mapping": ["--config", str(as_config)],
        "keywords": ["--config", "distillation", checkpoint],
    }.items():
        cli = main([*args, *TINY, f"--trainer.default_root_dir={tmp_path}"], run=False)
        (built[how],) = [cb for cb in cli.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    expected = DistillationConfig(**shipped)
    assert built["mapping"].config == expected == built["keywords"].config
    assert expected.cache_teacher == TeacherCacheConfig() and (expected.alpha, expected.temperature) == (0.9, 8.0)
    assert type(built["mapping"].teacher).__name__ == "MNIST1DTeacherCNN"


@pytest.mark.parametrize("name", [n for n in configs.list_configs() if n.startswith(("distillation", "recipe"))])
def test_shipped_configs_build_the_config_their_values_say(name):
    for init_args in shipped_distillation_args(name):
        assert KnowledgeDistillation(**init_args).config == DistillationConfig(**init_args)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: DistillationConfig(teacher=tiny_teacher(), alpha=1.5),
            r"alpha=1.5 is outside the allowed range \[0, 1\]",
        ),
        (
            lambda: DistillationConfig(teacher=tiny_teacher(), temperature=0),
            r"temperature=0 is outside the allowed range \(0, inf\)",
        ),
        (
            lambda: DistillationConfig(teacher=tiny_teacher(), convention="sum"),
            r"convention='sum' is not one of \('weighted', 'additive'\)",
        ),
        (lambda: DistillationConfig(teacher=tiny_teacher(), seed=-1), "seed=-1 must be an integer >= 0"),
        (lambda: DistillationConfig(teacher=tiny_teacher(), schedule={"stop": 3}), "schedule has no option 'stop'"),
        (
            lambda: DistillationConfig(teacher=tiny_teacher(), features={"pairs": {}}),
            "pairs={} must be a non-empty dict",
        ),
        (lambda: DistillationConfig(teacher=tiny_teacher(), cache_teacher={"key": "row"}), "key='row' is not one of"),
        (lambda: DistillationConfig(teacher=tiny_teacher(), tokens={"shift": "left"}), "shift='left' is not one of"),
        (lambda: DistillationConfig(teacher=tiny_teacher(), alpha=0.0), "alpha=0 with no features distils nothing"),
        (
            lambda: DistillationConfig(
                teacher=tiny_teacher(), cache_teacher={"top_k": 4}, schedule={"temperature_final": 1.0}
            ),
            "cache_teacher top_k=4 stores the teacher's distribution at temperature=4.0",
        ),
        (
            lambda: DistillationConfig(teacher=tiny_teacher(), teacher_class=TEACHER_CLASS),
            "either teacher .* or teacher_class",
        ),
        (
            lambda: DistillationConfig(teacher_class=TEACHER_CLASS),
            "no teacher: pass teacher=<nn.Module>, or teacher_checkpoint",
        ),
        (
            lambda: KnowledgeDistillation(config={"teacher": tiny_teacher(), "sparsity": 0.5}),
            "config has no option 'sparsity'",
        ),
        (
            lambda: KnowledgeDistillation(alpha=0.9, config={"teacher": tiny_teacher()}),
            r"not both \(also given: \['alpha'\]\)",
        ),
        (
            lambda: KnowledgeDistillation(teacher=tiny_teacher(), config=DistillationConfig(teacher=tiny_teacher())),
            r"not both \(also given: \['teacher'\]\)",
        ),
    ],
)
def test_bad_configs_are_refused_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"teacher": "my.Teacher"}, "teacher must be an nn.Module, got str"),
        ({"teacher_class": TEACHER_CLASS, "teacher_checkpoint": 3}, "teacher_checkpoint must be a string .*got int"),
        ({"teacher": nn.Linear(2, 2), "teacher_init_args": [8]}, "teacher_init_args must be a dict .*got list"),
        ({"teacher": nn.Linear(2, 2), "schedule": 5}, "schedule must be a DistillationSchedule or a dict .*got int"),
    ],
)
def test_values_of_another_type_are_refused_when_built(options, match):
    with pytest.raises(TypeError, match=match):
        DistillationConfig(**options)
