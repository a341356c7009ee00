import copy

from cases import Case
from lightning_slim.pruning import IterativeMagnitudePruning
from lightning_slim.pruning.functional import global_sparsity, select_layers

# lottery ticket with late rewinding: train an epoch, prune half, rewind to step 2, twice
SCHEDULE = {"kind": "imp", "rounds": 2, "rate": 0.5, "every": 1, "unit": "epoch"}


def _callback():
    return IterativeMagnitudePruning(schedule=SCHEDULE, rewind="step", rewind_step=2)


def _sparsity(module):
    return global_sparsity({n: m.weight for n, m in select_layers(module).items()})


def _check(trainer, module, cb):
    assert cb.round == 2
    # global magnitude pruning zeroes exactly round(0.75 n) of the n = 2,416 Conv/Linear weights (a stable sort, no
    # float sums: the same count on any CPU), so |error| < 1/(2n) = 2e-4; 1e-3 leaves room for a kept weight trained to
    # exactly 0.0, and a wrong round count (0.5, 0.875) misses by 0.125
    assert abs(_sparsity(module) - 0.75) < 1e-3  # counted over every Conv/Linear weight, classifier included
    for name, mask in cb.masks.items():
        weight = dict(module.named_modules())[name].weight
        assert not weight[~mask].any(), name
    assert [row[0] for row in cb.curve] == [0, 1, 2] and cb.curve[-1][1] == cb.report_rows()["sparsity"]
    exported = cb.export(copy.deepcopy(module))  # plain tensors: no hooks, no weight_orig / mask buffers
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in exported.modules())
    assert exported.state_dict().keys() == module.state_dict().keys()
    # the export keeps exactly those zeros: the same integer count as above
    assert abs(_sparsity(exported) - 0.75) < 1e-3


def _check_module(module):
    # ddp_spawn hands back the weights after 2 epochs: one round of 50%
    assert abs(_sparsity(module) - 0.5) < 1e-3


CASES = [
    Case(
        name="pruning",
        callback=_callback,
        check=_check,
        check_module=_check_module,
        wandb_keys=(
            "slim/pruning/sparsity",
            "slim/pruning/sparsity/net.0",
            "slim/pruning/round",
            "slim/pruning/accuracy_vs_sparsity/nrows",
            "slim/pruning/accuracy_vs_sparsity_plot_table/nrows",
            "slim/pruning/final_sparsity",
        ),
    )
]
