"""The onnxruntime backend through its interface: what it refuses, the layers it swaps in, and the
int8 artifact it converts to, saves and reads back (a real ONNX file run by ONNX Runtime)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_slim.quantization import OrtModel, QuantizationConfig, backend, load_int8, select_layers
from lightning_slim.quantization import functional as F
from lightning_slim.quantization.backends import backend_of, backend_of_artifact
from lightning_slim.quantization.export_call import as_export_call
from lightning_slim.quantization.static import StaticLinear
from lightning_slim.reporting.measure import Artifact, shipped_bytes

ORT = backend("onnxruntime")
X = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def prepared(config: QuantizationConfig) -> nn.Module:
    model = mlp()
    F.prepare_qat(model, select_layers(model), config)
    with torch.no_grad():
        model.train()(X)  # the observers' ranges
    F.set_fake_quant(model, True)
    return model.eval()


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(weight_bits=4), r"weight_bits=4 with runtime='onnxruntime' is weight-only"),
        (dict(weight_bits=4, activation_bits=None, group_size=24), "group_size=24 must be a power of two >= 16"),
    ],
)
def test_refuses_what_onnxruntime_cannot_serve(options, match):
    with pytest.raises(ValueError, match=match):
        QuantizationConfig(**options)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(activation_bits=None, weight_bits=8, group_size=16), "no weight-only int8 convolution"),
        (dict(activation_mode="dynamic"), "activation_mode='dynamic' quantizes Linear layers"),
    ],
)
def test_refuses_convolutions_it_has_no_kernel_for(options, match):
    with pytest.raises(ValueError, match=match):
        ORT.check_layer("conv", nn.Conv1d(1, 4, 3), QuantizationConfig(**options))


def test_swaps_in_static_layers_that_keep_the_parameters():
    model = mlp()
    params = [id(p) for p in model.parameters()]
    F.prepare_qat(model, ["0", "2"], QuantizationConfig())
    assert isinstance(model[0], StaticLinear) and [id(p) for p in model.parameters()] == params
    assert ORT.prepared(model) and not backend("torchao").prepared(model) and backend_of(model) is ORT


def test_converts_to_an_int8_onnx_artifact_that_computes_what_training_simulated(tmp_path):
    model = prepared(QuantizationConfig())
    call = as_export_call(X[:4])
    int8 = ORT.convert(copy.deepcopy(model), call)
    assert isinstance(int8, OrtModel) and isinstance(int8, Artifact) and backend_of_artifact(int8) is ORT
    weights = ORT.int8_weights(int8)
    assert set(weights) == {"0", "2"}
    for name, q in weights.items():  # 7-bit weights (reduce_range): AVX2's u8 x s8 kernels never saturate
        assert q.dtype == torch.int8 and 0 < int(q.abs().max()) <= 64, name
    with torch.no_grad():
        fake, real = model(X), int8(X)
    # the same integer arithmetic up to rounding ties: a value within float error of a rounding boundary
    # moves one quantization step (about 1/64 of a layer's range), on any CPU's kernels
    assert float((fake - real).abs().max()) < 0.05 * float(fake.abs().max())
    path = ORT.save(int8, call, tmp_path / "int8.onnx")
    assert path.stat().st_size == shipped_bytes(int8)
    torch.testing.assert_close(load_int8(path)(X), real)  # the file is the model: same session, same numbers


def test_observed_ranges_round_trip_into_a_fresh_model():
    model = prepared(QuantizationConfig())
    ranges = ORT.observed_ranges(F.fake_quantized_layers(model))
    assert set(ranges) == {"0", "2"} and all(float(r["max"]) > float(r["min"]) for r in ranges.values())
    fresh = mlp()
    F.prepare_qat(fresh, ["0", "2"], QuantizationConfig())
    ORT.load_observed_ranges(F.fake_quantized_layers(fresh), ranges)
    F.set_fake_quant(fresh, True)
    with torch.no_grad():
        # same weights, same ranges, same kernels: the same fake-quantized function, bit for bit
        torch.testing.assert_close(fresh.eval()(X), model(X), rtol=0, atol=0)
