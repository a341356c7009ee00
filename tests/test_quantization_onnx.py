"""The onnxruntime runtime: a QDQ graph ORT really runs in int8, equal to what training simulated,
loadable with onnxruntime alone; int4 packed into MatMulNBits; honest size and speed helpers."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import lightning.pytorch as pl
import numpy as np
import onnx
import pytest
import torch
from cases import small_data
from test_quantization import prune_randomly
from torch import nn

from lightning_slim import MNIST1DCNN, MNIST1DMLP, DigitsCNN, MNIST1DTransformer
from lightning_slim.demos.models import ClassifierModule
from lightning_slim.quantization import (
    QuantizationAwareTraining,
    QuantizationConfig,
    artifact_bytes,
    cpu_int8_capability,
    fp32_onnx,
    fused_ops,
    select_layers,
    to_runtime,
)
from lightning_slim.quantization import (
    functional as F,
)
from lightning_slim.quantization.export import int8_weights, load_int8, save_int8

X = torch.randn(256, 1, 40, generator=torch.Generator().manual_seed(0))


def trainer(tmp_path, callbacks, **kw):
    args = dict(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    return pl.Trainer(callbacks=callbacks, **{**args, **kw})


def prepared(model, x, spec=None):
    """``model`` fake-quantized for onnxruntime with ranges observed on ``x`` (BN statistics too)."""
    F.prepare_qat(model, select_layers(model), spec or QuantizationConfig())
    with torch.no_grad():
        model.train()(x)
    F.set_fake_quant(model, True)
    return model.eval()


def _digits_input():
    return torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "make, x, int8_ops",
    [
        (lambda: MNIST1DCNN(channels=16, batch_norm=True), X, {"QLinearConv": 3, "QGemm": 1}),
        (lambda: DigitsCNN(channels=8, batch_norm=True), _digits_input(), {"QLinearConv": 2, "QGemm": 1}),
        (lambda: MNIST1DMLP(hidden=64), X, {"QGemm": 3}),
        (lambda: MNIST1DTransformer(dim=32), X, {"MatMulIntegerToFloat": 9, "QGemm": 1}),
    ],
    ids=["conv1d_bn", "conv2d_bn", "mlp", "transformer"],
)
def test_onnx_graph_is_int8_fused_by_ort_and_computes_what_training_simulated(make, x, int8_ops):
    model = prepared(make(), x)
    int8 = to_runtime(copy.deepcopy(model), x[:4])
    graph = onnx.load_from_string(int8.onnx_bytes).graph
    assert not {"BatchNormalization", "Unfold", "Im2Col"} & {n.op_type for n in graph.node}  # BN folded, no im2col
    for name, q in int8_weights(int8).items():  # every targeted layer ships int8 weights, 7-bit (reduce_range)
        assert q.dtype == torch.int8 and 32 < int(q.abs().max()) <= 64, name
    assert set(int8_weights(int8)) == set(F.fake_quantized_layers(model))
    ops = fused_ops(int8.onnx_bytes)  # the graph ORT runs: each quantized layer is an integer kernel
    assert {k: ops.get(k, 0) for k in int8_ops} == int8_ops, ops
    assert not {"Conv", "Gemm"} & set(ops), ops  # no float conv / GEMM left
    assert "DequantizeLinear" not in ops, ops  # nothing is dequantized at every call (biases included)
    shipped = {t.name for t in graph.initializer}
    assert not {n for n in shipped if n.endswith(".s_b")}, shipped  # bias scales derived, not stored
    with torch.no_grad():
        fake, real = model(x), int8(x)
    # equal up to rounding ties (a value within float error of a rounding boundary moves one step)
    diff = (fake - real).abs()
    # a tie moves one activation one int8 step (1/255 of its range) and propagates: bounded by 5% of the largest logit;
    # outside ties the two compute the same integers, so all but < 5% of the outputs agree within 1e-4 (float
    # accumulation order over <= 128-term dots of values ~1: ~1e-5) and the classes agree on >= 97%
    assert float(diff.max()) < 0.05 * float(fake.abs().max()), float(diff.max())
    assert float((diff > 1e-4).float().mean()) < 0.05
    assert (fake.argmax(-1) == real.argmax(-1)).float().mean() >= 0.97


def test_trained_qat_model_and_its_ort_artifact_agree(tmp_path):
    pl.seed_everything(0)
    data = small_data(num_samples=4000)
    cb = QuantizationAwareTraining(start_after=1, freeze_ranges_after=2, freeze_bn_after=2)
    module = MNIST1DCNN(channels=32, batch_norm=True, lr=1e-2)
    trainer(tmp_path, [cb], max_epochs=3).fit(module, datamodule=data)
    x, y = data.x_test, data.y_test
    with torch.no_grad():
        fake = cb.fake_quantized(copy.deepcopy(module))(x)
    real = cb.export(copy.deepcopy(module))(x)
    agreement = float((fake.argmax(-1) == real.argmax(-1)).float().mean())  # bounded below
    fake_acc, real_acc = [float((o.argmax(-1) == y).float().mean()) for o in (fake, real)]
    print(
        f"argmax agreement {agreement:.4f}, max logit difference {float((fake - real).abs().max()):.4f}, "
        f"accuracy fake-quant {fake_acc:.4f} / onnxruntime {real_acc:.4f}"
    )
    # 800 test examples: rounding ties (a value within float error of an int8 boundary moves one step; which
    # values tie depends on the CPU's summation order) can only flip predictions within about a step of a class
    # boundary: at most 4 flips (0.995) and 2 net (0.003); a wrong export flips most. 0.5: it learnt (chance 0.1)
    assert agreement >= 0.995 and abs(fake_acc - real_acc) <= 0.003 and real_acc > 0.5


def test_artifact_runs_with_onnxruntime_alone(tmp_path):
    pl.seed_everything(0)
    path = tmp_path / "int8.onnx"
    cb = QuantizationAwareTraining(start_after=1, export_path=str(path))
    module = MNIST1DCNN(channels=8, batch_norm=True)
    trainer(tmp_path, [cb], max_epochs=2).fit(module, datamodule=small_data())
    assert cb.saved_path == str(path) and artifact_bytes(path) == path.stat().st_size
    x = torch.randn(5, 1, 40)
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1]); "
        "np.save(sys.argv[3], s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[2])})[0]); "
        "assert not {'torch', 'lightning_slim'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    expected = cb.export(copy.deepcopy(module))(x)
    # another process on the same onnxruntime and CPU: the same kernels, a few ulps at most (float32 defaults)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), expected)
    torch.testing.assert_close(load_int8(path)(x), expected)  # the generic loader knows the file


def test_int4_weight_only_is_packed_into_matmulnbits_and_six_times_smaller(tmp_path):
    model = prepared(MNIST1DMLP(hidden=512), X, QuantizationConfig(weight_bits=4, activation_bits=None, group_size=64))
    int4 = to_runtime(copy.deepcopy(model), X[:4])
    nodes = [n for n in onnx.load_from_string(int4.onnx_bytes).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3 and all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nodes)
    assert all(int(q.abs().max()) == 7 for q in int8_weights(int4).values())
    fp32 = fp32_onnx(MNIST1DMLP(hidden=512), X[:4])
    int4_path, fp32_path = save_int8(int4, X[:4], tmp_path / "int4.onnx"), fp32.save(tmp_path / "fp32.onnx")
    assert artifact_bytes(int4_path) * 6 <= artifact_bytes(fp32_path), (
        artifact_bytes(int4_path),
        artifact_bytes(fp32_path),
    )
    with torch.no_grad():  # weight-only, float activations: the same arithmetic as training
        # float activations times the dequantized weights: torch's and onnxruntime's float32 kernels differ only in
        # summation order over <= 512-term dots of values ~1: <= 512 * 2**-24 = 3e-5 worst case; 1e-4 holds on any CPU
        torch.testing.assert_close(int4(X), model(X), atol=1e-4, rtol=1e-4)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 96, width: int = 256):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.relu(self.embed(ids)))


def test_int4_embedding_is_a_packed_table_gathered_by_ort():
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    model = TinyLM()
    F.prepare_qat(
        model,
        select_layers(model, ["Linear", "Embedding"]),
        QuantizationConfig(weight_bits=4, activation_bits=None, group_size=32),
    )
    F.set_fake_quant(model, True)
    int4 = to_runtime(copy.deepcopy(model), ids[:2])
    graph = onnx.load_from_string(int4.onnx_bytes).graph
    (gather,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert {a.name: a.i for a in gather.attribute} == {
        "bits": 4,
        "block_size": 32,
        "gather_axis": 0,
        "quantize_axis": 1,
    }
    tables = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    packed = tables[gather.input[0]]
    assert packed.dtype == np.uint8 and packed.shape == (96, 128)  # two 4-bit weights per byte
    assert not [t for t in tables.values() if t.dtype == np.float32 and t.size >= 96 * 256]  # no float table
    with torch.no_grad():  # the gathered rows are exactly the fake-quantized ones
        # a gather of the same dequantized rows (no sums): equal up to the one rounding of scale * q, ~1e-7
        torch.testing.assert_close(int4(ids), model(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="group_size=512 does not divide its input width 256"):
        F.prepare_qat(
            TinyLM(),
            select_layers(TinyLM(), ["Embedding"]),
            QuantizationConfig(weight_bits=4, activation_bits=None, group_size=512),
        )


def test_biases_the_exporter_shares_keep_one_float_table_per_layer():
    # equal initializers (here: zero biases) are shared by the exporter; each layer's bias has its own scale
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    for layer in (model[0], model[2]):
        nn.init.zeros_(layer.bias)
    x = torch.randn(8, 5, 16, generator=torch.Generator().manual_seed(0))  # 3-D: MatMul + Add in ONNX
    prepared(model, x)
    int8 = to_runtime(copy.deepcopy(model), x[:2])
    names = [t.name for t in onnx.load_from_string(int8.onnx_bytes).graph.initializer]
    assert len(names) == len(set(names)), names
    with torch.no_grad():
        # same integers, float32 kernels of two libraries: summation order over short dots, ~1e-6; 1e-4 leaves 100x
        torch.testing.assert_close(int8(x), model(x), atol=1e-4, rtol=1e-4)


def test_pruned_zeros_are_exact_int8_zeros_in_the_onnx_file():
    model = MNIST1DCNN(channels=16, batch_norm=True)
    masks = prune_randomly(model)
    weights = int8_weights(to_runtime(prepared(model, X), X[:4]))
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert not weights[name][~rows].any() and weights[name][rows].count_nonzero() > 0.9 * rows.sum(), name


def test_reduce_range_off_uses_the_full_int8_weight_range():
    model = prepared(MNIST1DMLP(hidden=64), X, QuantizationConfig(reduce_range=False))
    assert max(int(q.abs().max()) for q in int8_weights(to_runtime(model, X[:4])).values()) == 127


class EncoderClassifier(ClassifierModule):
    """A user-style nn.TransformerEncoder classifier (batch_first, with the inference fast path)."""

    def __init__(self, dim: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(1, 1, 40)
        self.embed = nn.Linear(5, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.reshape(x.shape[0], 8, 5))).mean(1))


class CountValidationCalls(pl.Callback):
    def __init__(self):
        self.calls = 0

    def on_validation_start(self, trainer, module):
        layer = module.encoder.layers[0].linear1
        assert F.is_fake_quantized(layer) and layer.weight_fake_quantizer.enabled
        layer.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_transformer_encoder_validates_through_fake_quant_and_names_what_stays_float(tmp_path):
    pl.seed_everything(0)
    assert torch.backends.mha.get_fastpath_enabled()
    cb, counter = QuantizationAwareTraining(start_after=0), CountValidationCalls()
    module = EncoderClassifier()
    with pytest.warns(
        UserWarning,
        match=r"nn.MultiheadAttention \['encoder.layers.0.self_attn', "
        r"'encoder.layers.1.self_attn'\].*stay float",
    ):
        trainer(tmp_path, [cb, counter], max_epochs=1).fit(module, datamodule=small_data())
    assert counter.calls > 0  # the fast path (which reads linear1.weight directly) was off in validation
    assert "encoder.layers.1.self_attn" in cb.report_rows()["skipped"]
    assert torch.backends.mha.get_fastpath_enabled()  # restored after fit
    int8 = cb.export(copy.deepcopy(module))
    assert {"encoder.layers.0.linear1", "encoder.layers.1.linear2", "head"} <= set(int8_weights(int8))
    with torch.no_grad():
        expected = cb.fake_quantized(copy.deepcopy(module))(X)
    # rounding ties (see above) flip at most 3% of the predictions, on any CPU; a wrong export flips most
    assert (int8(X).argmax(-1) == expected.argmax(-1)).float().mean() >= 0.97


def test_int8_in_onnxruntime_is_faster_than_fp32_eager_on_a_wide_mlp():
    # the claim every CPU holds: at batch 1 the 1024-wide MLP is weight-bound and int8 weights are 4x
    # fewer bytes (measured 3.5x on an AVX2-only host, 2.6x with VNNI; at batch 256 an AVX2-only CPU's
    # int8 GEMM is no faster than its fp32 GEMM, so no claim is made there). Margin 1.3x.
    torch.set_num_threads(1)
    x = torch.randn(256, 1, 40)
    fp32 = MNIST1DMLP(hidden=1024).eval()
    int8 = to_runtime(prepared(copy.deepcopy(fp32), x), x[:4])
    x = x[:1]
    times = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for _ in range(20):
            fp32(x), int8(x)
        for _ in range(200):
            for name, m in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - start)
    assert 1.3 * np.median(times["int8"]) < np.median(times["fp32"]), times


def test_cpu_int8_capability_reads_the_flags():
    avx2 = "model name\t: Some CPU\nflags\t\t: fpu sse avx avx2 fma\n"
    vnni = "model name\t: EPYC\nflags\t\t: avx2 avx512f avx512_vnni avx_vnni amx_tile amx_int8\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp\n"
    assert cpu_int8_capability(avx2) == {
        "model": "Some CPU",
        "avx2": True,
        "avx512_vnni": False,
        "avx_vnni": False,
        "amx": False,
        "arm_dotprod": False,
    }
    assert cpu_int8_capability(vnni)["avx512_vnni"] and cpu_int8_capability(vnni)["amx"]
    assert cpu_int8_capability(arm)["arm_dotprod"] and not cpu_int8_capability(arm)["avx2"]


def test_importing_and_configuring_qat_loads_no_onnx_or_torchao():
    code = (
        "import sys; from lightning_slim import QuantizationAwareTraining as Q; Q(); "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript', 'torchao') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
