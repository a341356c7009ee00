from functools import partial

import torch

from cases import Case, small_model
from lightning_slim.quantization import QuantizationAwareTraining


def _callback():
    # crosses every phase in 3 epochs: float, fake quant (epoch 1), ranges + BN frozen (epoch 2)
    return QuantizationAwareTraining(start_after=1, freeze_ranges_after=2, freeze_bn_after=2)


def _plain(module):
    # after fit the user's float layers are back (same keys, QAT-trained weights)
    assert type(module.net[0]) is torch.nn.Conv1d and type(module.net[-1]) is torch.nn.Linear


def _check(trainer, module, cb):
    _plain(module)
    assert cb.phase == 2 and set(cb.ranges) == set(cb.layers) == {"net.0", "net.3", "net.6", "net.10"}
    assert cb.folded == {"net.0": "net.1", "net.3": "net.4", "net.6": "net.7"}
    assert trainer.callback_metrics["slim/quantization/phase"] == 2
    # int8 per-channel rounding of the weights (elementwise: the same on any CPU): noise rms = max|w_row| / (127 sqrt
    # 12) and max/rms <= sqrt(fan_in) <= sqrt(80) here, so the relative error is <= 0.02 whatever the trained weights;
    # 4-bit weights (16x the step) or a wrong scale exceed 0.05
    assert 0 < float(trainer.callback_metrics["slim/quantization/weight_error_mean"]) < 0.05


CASES = [
    Case(
        name="quantization",
        callback=_callback,
        model=partial(small_model, batch_norm=True),
        check=_check,
        check_module=_plain,
        wandb_keys=(
            "slim/quantization/phase",
            "slim/quantization/weight_bits",
            "slim/quantization/activation_bits",
            "slim/quantization/layer_error/nrows",
            "slim/quantization/weight_error_mean",
        ),
    )
]
