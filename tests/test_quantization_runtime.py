"""The onnxruntime runtime beyond static ranges: per-token dynamic activations computed by the file
exactly as training simulates them, full-range int8 weights that stay exact on AVX2-only CPUs, the
runtime's packages checked before training (a plain ``pip install lightning-slim``), and a quiet
exporter (issue 20)."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from cases import small_data
from test_quantization_onnx import trainer
from torch import nn

from lightning_slim import MNIST1DCNN
from lightning_slim.quantization import (
    QuantizationAwareTraining,
    QuantizationConfig,
    fused_ops,
    select_layers,
    serving,
    to_runtime,
)
from lightning_slim.quantization import functional as F
from lightning_slim.quantization.dynamic import quantize_rows
from lightning_slim.quantization.export import int8_weights


class TokenMLP(nn.Module):
    """Token rows of very different scales (as a pretrained transformer's): (batch, tokens, width)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def token_rows(n: int = 6, tokens: int = 40, width: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 2, tokens)[None, :, None]  # four orders of magnitude between rows
    return torch.randn(n, tokens, width, generator=g) * scales


def test_dynamic_activations_are_per_token_and_the_file_computes_what_training_simulates():
    x = token_rows()
    model = TokenMLP()
    F.prepare_qat(model, select_layers(model), QuantizationConfig(activation_mode="dynamic", reduce_range=False))
    F.set_fake_quant(model, True)
    int8 = to_runtime(copy.deepcopy(model).eval(), x[:2])
    ops = fused_ops(int8.onnx_bytes)
    assert ops.get("MatMulIntegerToFloat") == 2 and ops.get("QuantizeLinear") == 2, ops  # u8 x s8, per row
    assert not {"MatMul", "FusedMatMul", "DequantizeLinear"} & set(ops), ops  # no float product, no float weight
    assert all(int(q.abs().max()) == 127 for q in int8_weights(int8).values())  # full-range int8 weights
    with torch.no_grad():
        fake = model(x)
    real = int8(x)
    # a token row whose input sits at a rounding boundary within float error (after GELU, which ORT and
    # torch compute differently in the last bits) moves by one step: most rows agree to float error
    close = [
        torch.allclose(real[:, i], fake[:, i], rtol=0, atol=1e-5 * float(fake[:, i].abs().max())) for i in range(40)
    ]
    assert sum(close) >= 36, close

    one = nn.Sequential(nn.Linear(64, 256))  # no float op before the integers: every row agrees
    F.prepare_qat(one, ["0"], QuantizationConfig(activation_mode="dynamic", reduce_range=False))
    F.set_fake_quant(one, True)
    with torch.no_grad():
        fake_one = one.eval()(x)
    real_one = to_runtime(copy.deepcopy(one), x[:2])(x)
    for i in range(x.shape[1]):  # each token at its own scale; integers exact, the float products summed in
        # another order: relative 1e-5 of the row's outputs bounds float32 error of a 64-term sum
        torch.testing.assert_close(
            real_one[:, i], fake_one[:, i], rtol=0, atol=1e-5 * float(fake_one[:, i].abs().max())
        )
    reference = copy.deepcopy(model)
    F.unprepare(reference)  # the same weights in float
    static = copy.deepcopy(reference)  # one range per tensor is what the rows' spread of scales cannot hold
    F.prepare_qat(static, select_layers(static), QuantizationConfig(reduce_range=False))
    with torch.no_grad():
        static.train()(x)
        F.set_fake_quant(static, True)
        float_out, static_out = reference.eval()(x), static.eval()(x)
    small = slice(0, 10)  # the quietest tokens: lost in a per-tensor range, kept by per-token ranges
    err_dynamic = (fake[:, small] - float_out[:, small]).abs().max()
    err_static = (static_out[:, small] - float_out[:, small]).abs().max()
    assert err_dynamic * 10 < err_static, (float(err_dynamic), float(err_static))


def test_ort_quantizes_each_row_bit_for_bit_as_torch():
    """The one step ORT computes for us: QuantizeLinear per row (axis 0) must give torch's integers,
    ties included (it divides; torch's x * (1 / s) would differ on 1.6% of values at ties)."""
    from onnx import TensorProto, helper

    x = token_rows(n=1, tokens=256).reshape(256, 64)
    q, z, s = quantize_rows(x)
    x[:, :16] = (torch.randint(-100, 100, (256, 16)).float() + 0.5) * s  # exact ties
    q, z, s = quantize_rows(x)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=0)],
        "rows",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 64]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [256]),
            helper.make_tensor_value_info("z", TensorProto.UINT8, [256]),
        ],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [256, 64])],
    )
    session = serving.session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString())
    got = session.run(None, {"x": x.numpy(), "s": s[:, 0].numpy(), "z": z[:, 0].to(torch.uint8).numpy()})[0]
    np.testing.assert_array_equal(got, q.to(torch.uint8).numpy())


def test_full_range_weights_are_marked_and_served_exactly_on_saturating_cpus():
    x = token_rows()[:2]
    full = TokenMLP()
    F.prepare_qat(full, select_layers(full), QuantizationConfig(activation_mode="dynamic", reduce_range=False))
    F.set_fake_quant(full, True)
    int8 = to_runtime(full.eval(), x)
    metadata = {p.key: p.value for p in onnx.load_from_string(int8.onnx_bytes).metadata_props}
    assert int8.full_range and metadata[serving.FULL_RANGE_KEY] == "full_range"
    assert serving.OrtModel(int8.onnx_bytes).full_range  # read back from the file
    reduced = TokenMLP()
    F.prepare_qat(reduced, select_layers(reduced), QuantizationConfig(activation_mode="dynamic"))
    F.set_fake_quant(reduced, True)
    assert not to_runtime(reduced.eval(), x).full_range  # 7-bit weights: never saturate
    avx2 = {"avx2": True, "avx512_vnni": False, "avx_vnni": False, "amx": False}
    assert serving.saturating_cpu(avx2)
    assert not serving.saturating_cpu({**avx2, "avx512_vnni": True}) and not serving.saturating_cpu(
        {**avx2, "amx": True}
    )
    options = serving.session(int8.onnx_bytes, full_range=True).get_session_options()
    try:
        precise = options.get_session_config_entry("session.x64quantprecision")
    except RuntimeError:  # (ORT raises for a key that was never set)
        precise = ""
    assert precise == ("1" if serving.saturating_cpu() else "")  # this CPU: only where its kernels saturate


def test_dynamic_mode_refuses_convolutions_before_training():
    cb = QuantizationAwareTraining(activation_mode="dynamic", start_after=1)
    with pytest.raises(
        ValueError, match=r"activation_mode='dynamic' quantizes Linear layers.*exclude the convolutions"
    ):
        trainer(None, [cb], max_epochs=1).fit(MNIST1DCNN(channels=8), datamodule=small_data())
    with pytest.raises(ValueError, match=r"activation_mode='static' needs runtime='onnxruntime'"):
        QuantizationAwareTraining(runtime="torchao", activation_mode="static")


# --- issue 20: a plain install and a quiet exporter --------------------------------------------------------
@pytest.mark.parametrize(
    ("runtime", "missing", "extra"),
    [("onnxruntime", "onnxscript", "onnx"), ("onnxruntime", "onnxruntime", "onnx"), ("torchao", "torchao", "torchao")],
)
def test_a_missing_runtime_package_is_named_with_its_extra_before_training(monkeypatch, runtime, missing, extra):
    """Failed before: the default QAT trained every epoch, then on_fit_end raised
    ModuleNotFoundError: No module named 'onnxscript' (via the report's export)."""
    monkeypatch.setitem(sys.modules, missing, None)  # what an environment without the package finds
    steps = []
    module = MNIST1DCNN(channels=8)
    module.on_train_batch_start = lambda *a: steps.append(1)
    cb = QuantizationAwareTraining(runtime=runtime, start_after=1)
    with pytest.raises(ModuleNotFoundError, match=rf"{missing}.*pip install \"lightning-slim\[{extra}\]\""):
        trainer(None, [cb], max_epochs=1).fit(module, datamodule=small_data())
    assert not steps


def test_the_exporter_prints_nothing_about_torchvision():
    """Failed before: every ONNX export logged 'torchvision is not installed. Skipping torchvision::nms'
    (and three more ops) four times. A fresh process: the exporter's registry is built once per process."""
    code = (
        "import torch; from torch import nn; from lightning_slim.quantization import functional as F, to_runtime\n"
        "m = nn.Sequential(nn.Linear(8, 8)); F.prepare_qat(m, ['0'], F.QuantizationConfig())\n"
        "m.train()(torch.randn(4, 8)); F.set_fake_quant(m, True); to_runtime(m.eval(), torch.randn(4, 8))\n"
        "print('exported')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "exported" in done.stdout, done.stderr[-2000:]
    assert "torchvision" not in done.stdout + done.stderr


def test_export_path_and_the_report_export_the_trained_model_once(tmp_path, monkeypatch):
    """Scale (issue 19): at the end of fit the callback's export_path and CompressionReport each exported
    the same trained model (two ONNX exports: minutes on a 135M model). Same model, same file: once."""
    from lightning_slim import MNIST1DMLP, CompressionReport
    from lightning_slim.quantization.backends.onnxruntime import OnnxRuntimeBackend

    exports = []
    convert = OnnxRuntimeBackend.convert

    def counted(self, model, example):
        exports.append(1)
        return convert(self, model, example)

    monkeypatch.setattr(OnnxRuntimeBackend, "convert", counted)
    cb = QuantizationAwareTraining(start_after=0, export_path=str(tmp_path / "int8.onnx"))
    module = MNIST1DMLP(hidden=32)
    trainer(tmp_path, [cb, CompressionReport(measure_latency=False)], max_epochs=1).fit(module, datamodule=small_data())
    assert len(exports) == 1 and (tmp_path / "int8.onnx").exists()
    cb.export(copy.deepcopy(module))
    cb.export(copy.deepcopy(module))
    assert len(exports) == 2  # (the cache lives through one fit's end; after fit, one more export, kept)
    changed = copy.deepcopy(module)
    with torch.no_grad():
        next(changed.parameters()).add_(0.1)  # another model: another export
    cb.export(changed)
    assert len(exports) == 3
