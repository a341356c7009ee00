"""The pieces every technique shares (one of each): the per-index cache, output extraction, the
eval-mode helper, the loader and the validators."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_slim.core.arguments import as_config, check_fraction
from lightning_slim.core.loading import build_module, find_class
from lightning_slim.distillation.configs import FeatureDistillation
from lightning_slim.index_cache import IndexCache
from lightning_slim.modules import evaluating, output_tensor


def test_index_cache_store_lookup_grow_and_state():
    cache = IndexCache()
    cache.store(torch.tensor([0, 2]), {"logits": torch.tensor([[1.0], [3.0]]), "feat": torch.ones(2, 2, 3)})
    assert cache.lookup(torch.tensor([1])) is None and cache.lookup(torch.tensor([7])) is None
    cache.store(torch.tensor([9, 1]), {"logits": torch.tensor([[10.0], [2.0]]), "feat": torch.zeros(2, 2, 3)})
    hit = cache.lookup(torch.tensor([2, 9, 0]))
    assert hit["logits"].flatten().tolist() == [3.0, 10.0, 1.0] and hit["feat"].shape == (3, 2, 3)
    assert cache.missing(torch.tensor([0, 3, 9, 50])).tolist() == [False, True, False, True]
    assert len(cache) == 4 and cache.nbytes >= 4 * (1 + 6) * 4
    other = IndexCache()
    other.load_state_dict(cache.state_dict())
    assert torch.equal(other.lookup(torch.tensor([1]))["logits"], torch.tensor([[2.0]]))
    reserved = IndexCache()
    reserved.reserve(100)
    reserved.store(torch.tensor([99]), {"logits": torch.ones(1, 10)})
    assert reserved.nbytes == 100 * 10 * 4 + 100  # exactly the training set, no growth slack
    # an integer: isclose is exact here
    assert math.isclose(len(reserved), 1)
    dense = IndexCache.from_tensor("loss", torch.tensor([0.5, float("nan"), 0.2]))
    assert dense.missing(torch.arange(3)).tolist() == [False, True, False]


def test_output_tensor_finds_logits_in_common_containers():
    x = torch.randn(2, 3)
    assert output_tensor(x) is x
    assert output_tensor({"logits": x, "h": 1}) is x
    assert output_tensor((x, "aux")) is x
    assert output_tensor(type("ModelOutput", (), {"logits": x})()) is x
    with pytest.raises(TypeError, match="pass a function"):
        output_tensor("text")


def test_evaluating_restores_every_submodule_mode_and_gradients():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2)).train()
    net[1].eval()
    with evaluating(net) as m:
        assert not any(x.training for x in m.modules()) and not torch.is_grad_enabled()
    assert [x.training for x in net.modules()] == [True, True, False, True] and torch.is_grad_enabled()
    with evaluating(net, no_grad=False):
        assert torch.is_grad_enabled()


def test_one_loader_and_one_grammar_of_class_names(tmp_path):
    assert find_class("Linear") is nn.Linear and find_class("torch.nn.Linear") is nn.Linear
    assert find_class("net.0") is None and find_class("no.such.Thing") is None
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "w.pt")
    before = torch.random.get_rng_state()
    model = build_module("torch.nn.Linear", {"in_features": 3, "out_features": 2}, tmp_path / "w.pt")
    assert torch.equal(torch.random.get_rng_state(), before)  # building does not move the global RNG
    assert torch.equal(model.weight, torch.load(tmp_path / "w.pt")["weight"])
    with pytest.raises(ValueError, match="is not an nn.Module subclass"):
        build_module("torch.optim.SGD")


def test_validators_and_configs_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"keep=0 is outside the allowed range \(0, 1\]"):
        check_fraction("keep", 0, low_open=True, high_closed=True)
    assert as_config(FeatureDistillation, {"pairs": {"a": "b"}}, "features").pairs == {"a": "b"}
    with pytest.raises(TypeError, match="features must be a FeatureDistillation or a dict"):
        as_config(FeatureDistillation, ["a"], "features")
