"""The torchao backend through its interface: what it refuses, the layers it swaps in, and the int8
modules it converts to (torchao's ``Int8Tensor`` weights), saved as a ``torch.export`` program."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_slim.quantization import QuantizationConfig, backend, load_int8, select_layers
from lightning_slim.quantization import functional as F
from lightning_slim.quantization.backends import backend_of, backend_of_artifact
from lightning_slim.quantization.export_call import as_export_call
from lightning_slim.reporting.measure import Artifact

AO = backend("torchao")
X = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(activation_mode="static"), "activation_mode='static' needs runtime='onnxruntime'"),
        (dict(weight_bits=4, freeze_ranges_after=2), "freeze_ranges_after with runtime='torchao'.*weight_bits=8"),
    ],
)
def test_refuses_what_torchao_cannot_do(options, match):
    with pytest.raises(ValueError, match=match):
        QuantizationConfig(runtime="torchao", **options)


def test_refuses_layers_its_kernels_cannot_take():
    with pytest.raises(ValueError, match="groups=2 convolutions are not supported"):
        AO.check_layer("conv", nn.Conv1d(4, 4, 3, groups=2), QuantizationConfig(runtime="torchao"))
    int4 = QuantizationConfig(runtime="torchao", weight_bits=4, group_size=32)
    with pytest.raises(ValueError, match="group_size=32 does not divide its input width 16"):
        AO.check_layer("0", nn.Linear(16, 4), int4)


def test_converts_to_int8_modules_that_compute_what_training_simulated(tmp_path):
    from torchao.quantization import Int8Tensor
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    model = mlp()
    params = [id(p) for p in model.parameters()]
    config = QuantizationConfig(runtime="torchao")
    F.prepare_qat(model, select_layers(model), config)
    assert isinstance(model[0], FakeQuantizedLinear) and [id(p) for p in model.parameters()] == params
    assert AO.prepared(model) and not backend("onnxruntime").prepared(model) and backend_of(model) is AO
    F.set_fake_quant(model, True)
    with torch.no_grad():
        fake = model(X)
    int8 = AO.convert(copy.deepcopy(model), None)
    assert isinstance(int8[0].weight, Int8Tensor) and not isinstance(int8, Artifact)
    assert backend_of_artifact(int8) is AO
    weights = AO.int8_weights(int8)
    assert set(weights) == {"0", "2"} and all(q.dtype == torch.int8 for q in weights.values())
    with torch.no_grad():
        real = int8(X)
    # the same per-token / per-channel grids; torch._int_mm and the float simulation differ by rounding
    # ties only (one step of a layer's scale at most, well under 1% of the output's range)
    assert float((real - fake).abs().max()) < 1e-2 * float(fake.abs().max())
    path = AO.save(int8, as_export_call(X[:4]), tmp_path / "int8.pt2")
    torch.testing.assert_close(load_int8(path)(X), real)  # the program runs the same kernels


def test_refuses_ranges_observed_for_onnxruntime():
    assert AO.observed_ranges({}) == {}
    with pytest.raises(ValueError, match=r"activation ranges for \['0'\] \(a runtime='onnxruntime' run\)"):
        AO.load_observed_ranges({}, {"0": {"min": torch.zeros(()), "max": torch.ones(())}})
