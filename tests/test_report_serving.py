"""The report tells the truth about what is shipped: the bytes of the ONNX file, and the deployed int8
model timed beside the same trained model in fp32 eager and fp32 in ONNX Runtime, at batch 1 and at a
serving batch, with the CPU's int8 capability."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import torch
from cases import small_data

from lightning_slim import CompressionReport, QuantizationAwareTraining
from lightning_slim.demos.models import MNIST1DCNN
from lightning_slim.quantization import functional as quantization
from lightning_slim.quantization.serving import OrtModel
from lightning_slim.reporting.measure import cpu_int8_capability


def test_report_times_int8_beside_fp32_eager_and_fp32_in_the_runtime(tmp_path):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_after=1)
    report = CompressionReport(latency_batch_size=64, output_path=str(tmp_path / "report.json"))
    module = MNIST1DCNN(channels=32)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[qat, report],
    )
    trainer.fit(module, datamodule=small_data())
    deployed = report.exported_model
    assert isinstance(deployed, OrtModel)
    # size is the ONNX file a user ships, not a state dict around it
    onnx_file = len(deployed.onnx_bytes)
    assert report.after["size_bytes"] == report.serving["deployed_bytes"] == onnx_file
    assert report.serving["fp32_eager_bytes"] == report.before["size_bytes"]  # same architecture, float weights
    assert report.serving["cpu"] == cpu_int8_capability()
    # a file has no parameters: they are counted on the trained float weights it was converted from
    assert report.after["params"] == report.before["params"] and report.after["macs"] == report.before["macs"]
    assert 0 < report.after["nonzero_params"] <= report.after["params"]
    for batch in (1, 64):
        row = report.serving[f"batch_{batch}"]
        forms = ("fp32_eager", "fp32_runtime", "deployed")
        assert set(row) == {f"{n}_ms" for n in forms} | {f"{n}_iqr_ms" for n in forms} | {
            "speedup_vs_fp32_eager",
            "speedup_vs_fp32_runtime",
        }
        assert all(row[f"{n}_ms"] > 0 and row[f"{n}_iqr_ms"] >= 0 for n in forms)
        assert row["speedup_vs_fp32_eager"] == row["fp32_eager_ms"] / row["deployed_ms"]
    # the "fp32 eager" column is the trained float model, not its fake-quantized form
    float_copy = copy.deepcopy(module).eval()
    quantization.unprepare(float_copy)
    baselines = qat.float_baselines(copy.deepcopy(module), report.example_input)
    x = report.example_input[:8]  # the latency batch of 64 rows (given): a tensor
    with torch.no_grad():
        assert torch.equal(baselines["fp32_eager"](x), float_copy(x))
        assert not quantization.fake_quantized_layers(baselines["fp32_eager"])
        # float32 in onnxruntime vs torch: only summation order differs (dots of <= 160 terms, values ~1: <= 1e-5)
        torch.testing.assert_close(baselines["fp32_runtime"](x), float_copy(x), atol=1e-4, rtol=1e-4)
    # without timing, no fp32 ONNX export is built (it only serves the side-by-side latency)
    assert set(qat.float_baselines(copy.deepcopy(module), report.example_input, runtime=False)) == {"fp32_eager"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["serving"]["batch_64"]["deployed_ms"] == report.serving["batch_64"]["deployed_ms"]


def test_no_serving_rows_without_a_converting_technique(tmp_path):
    report = CompressionReport(latency_batch_size=8, output_path=str(tmp_path / "report.json"))
    pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[report],
    ).fit(MNIST1DCNN(channels=8), datamodule=small_data())
    assert report.serving == {} and "serving" not in json.loads((tmp_path / "report.json").read_text())
