"""The pure-PyTorch core of pruning: target selection, masks, schedules, rewinding, structure."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_slim.demos.models import MNIST1DCNN
from lightning_slim.pruning import IterativeMagnitudePruning
from lightning_slim.pruning import functional as F
from lightning_slim.pruning import rewind as R
from lightning_slim.pruning import structured as S
from lightning_slim.pruning.schedules import GradualSchedule, IMPSchedule, parse_schedule


def test_select_layers_by_type_path_regex_and_exclude():
    model = MNIST1DCNN(channels=8)
    assert list(F.select_layers(model)) == ["net.0", "net.2", "net.4", "net.7"]
    assert list(F.select_layers(model, ["Conv1d"])) == ["net.0", "net.2", "net.4"]
    assert list(F.select_layers(model, ["torch.nn.Linear", "net.2"])) == ["net.2", "net.7"]
    assert list(F.select_layers(model, [r"re:net\.[0-4]"], exclude=["net.2"])) == ["net.0", "net.4"]
    assert list(F.select_layers(model, ["Conv2d", "Linear"])) == ["net.7"]  # a class the model lacks is fine
    for bad in (["net.9"], ["re:head.*"], ["Conv1D"]):  # path, regex, misspelt class
        with pytest.raises(ValueError, match="matches no module"):
            F.select_layers(model, bad)
    with pytest.raises(ValueError, match="exclude entry 'net.9'"):
        F.select_layers(model, exclude=["net.9"])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_masks_hit_the_target_and_only_grow(scope):
    torch.manual_seed(0)
    weights = {"a": torch.randn(30, 20), "b": torch.randn(10, 5) * 3}
    masks = F.magnitude_masks(weights, 0.6, scope)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    if scope == "layer":
        # per layer: exactly round(0.6 n) of each layer's n weights (integer count, any CPU): 360 of 600 and 30 of 50,
        # so exactly 0.6; a mask of another layer's size would miss by >= 1/50 = 0.02
        assert all(abs((~m).float().mean().item() - 0.6) < 0.01 for m in masks.values())
    else:  # the smallest magnitudes go, wherever they are
        kept = torch.cat([w[m] for w, m in zip(weights.values(), masks.values())]).abs().min()
        gone = torch.cat([w[~m] for w, m in zip(weights.values(), masks.values())]).abs().max()
        assert gone <= kept
    # a later round on re-grown weights never revives a pruned weight
    regrown = {k: torch.randn_like(w) * 10 for k, w in weights.items()}
    later = F.magnitude_masks(regrown, 0.8, scope, masks)
    assert all(not (later[k] & ~masks[k]).any() for k in masks)
    # ties are broken the same way every time (identical masks on every rank)
    tied = {"a": torch.ones(100)}
    assert torch.equal(F.magnitude_masks(tied, 0.5)["a"], F.magnitude_masks(tied, 0.5)["a"])
    with pytest.raises(ValueError, match=r"sparsity=1.0 is outside the allowed range \[0, 1\)"):
        F.magnitude_masks(weights, 1.0)


def test_schedules_are_data_and_validate():
    assert parse_schedule({"kind": "imp", "rounds": 2, "rate": 0.5, "every": 3, "unit": "step"}).events() == [
        (3, 0.5),
        (6, 0.75),
    ]
    imp = IMPSchedule(rounds=4, rate=None, final_sparsity=0.9375)
    assert [round(s, 6) for _, s in imp.events()] == [0.5, 0.75, 0.875, 0.9375]
    gradual = GradualSchedule(final_sparsity=0.8, initial_sparsity=0.2, start=10, end=50, every=10)
    events = gradual.events()
    assert [t for t, _ in events] == [10, 20, 30, 40, 50]
    # the cubic schedule's ends, float64 arithmetic: equal up to rounding (default rel=1e-6)
    assert events[0][1] == pytest.approx(0.2) and events[-1][1] == pytest.approx(0.8)
    assert all(b >= a for (_, a), (_, b) in itertools.pairwise(events))
    assert parse_schedule({"kind": "one_shot", "sparsity": 0.3}).events() == [(0, 0.3)]
    for bad, match in [
        ({"kind": "imp", "rate": 1.0}, "rate=1.0 is outside"),
        ({"kind": "one_shot", "sparsity": -0.1}, "sparsity=-0.1 is outside"),
        ({"kind": "gradual", "final_sparsity": 1.5}, "final_sparsity=1.5 is outside"),
        ({"kind": "imp", "rounds": 0}, "rounds=0 must be"),
        ({"kind": "imp", "unit": "batch"}, "unit='batch' is not one of"),
        ({"kind": "imp", "every_n": 2}, r"unknown imp schedule keys \['every_n'\]"),
        ({"kind": "cubic"}, "kind='cubic' is not one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_schedule(bad)


def test_callback_rejects_bad_arguments_at_construction():
    for kwargs, match in [
        (dict(scope="model"), "scope='model'"),
        (dict(rewind="weights"), "rewind='weights'"),
        (dict(rewind="step", rewind_step=-1), "rewind_step=-1"),
        (dict(schedule={"kind": "one_shot", "sparsity": 1.0}), r"outside the allowed range \[0, 1\)"),
        (
            dict(schedule={"kind": "imp", "every": 5, "unit": "step"}, rewind="step", rewind_step=6),
            "rewind_step=6 is later than the first pruning at step 5",
        ),
        (dict(pattern="channels", rewind="init"), "not supported with pattern=.channels."),
        (dict(schedule={"kind": "gradual"}, rewind="lr"), "gradual"),
    ]:
        with pytest.raises(ValueError, match=match):
            IterativeMagnitudePruning(**kwargs)


def test_optimizer_state_is_zeroed_where_masked():
    w = nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.randn(4, 4)
    opt.step()
    mask = torch.rand(4, 4) > 0.5
    F.mask_optimizer_state(opt, [(w, mask.float())])
    for key in ("exp_avg", "exp_avg_sq"):
        assert not opt.state[w][key][~mask].any() and opt.state[w][key][mask].all()


def test_rewind_restores_weights_optimizer_and_schedule_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            net(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()
            sched.step()

    train(3)
    snap = R.take_snapshot("step", net, [opt], [sched])
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    saved_opt = {i: s["momentum_buffer"].clone() for i, s in opt.state_dict()["state"].items()}
    train(5)
    R.restore("step", snap, net, [opt], [sched])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    assert all(torch.equal(opt.state_dict()["state"][i]["momentum_buffer"], v) for i, v in saved_opt.items())
    # the restored learning rate: float64 scheduler arithmetic, rounding only
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    train(2)  # training after a rewind must not write into the snapshot
    assert torch.equal(snap["module"]["0.weight"], saved["0.weight"])
    # learning-rate rewinding: the schedule goes back, the weights stay
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    lr_snap = R.take_snapshot("lr", net, [opt], [sched])
    train(4)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    R.restore("lr", lr_snap, net, [opt], [sched])
    assert sched.last_epoch == 5 and all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())


def test_structure_round_trip_and_unprunable_layers():
    model = MNIST1DCNN(channels=16, batch_norm=True)
    x = torch.randn(4, 1, 40)
    layers = F.select_layers(model, ["Conv1d"])
    S.check_prunable(model, model.example_input_array, layers)
    S.channel_prune(model, model.example_input_array, layers.values(), 0.5)
    assert [m.out_channels for m in layers.values()] == [8, 8, 8] and model.net[-1].in_features == 40
    fresh = MNIST1DCNN(channels=16, batch_norm=True)
    assert S.restructure(fresh, S.structure_of(model)) > 0
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))

    class Gate(nn.Module):  # a custom layer with a weight that torch-pruning has no pruner for
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, 40))

        def forward(self, x):
            return x * self.weight

    odd = nn.Sequential(Gate(), nn.Flatten(), nn.Linear(40, 10))
    with pytest.raises(ValueError, match=r"cannot handle layer '0' \(Gate\)"):
        S.check_prunable(odd, torch.zeros(1, 1, 40), F.select_layers(odd, ["0"]))


def test_docstring_examples_run():
    import doctest

    from lightning_slim.pruning import callback, functional, rewind, schedules, structured

    for module in (functional, schedules, rewind, structured, callback):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
