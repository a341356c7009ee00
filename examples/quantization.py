"""Quantization-aware training of an existing LightningModule, then a real int8 model on disk.

    python examples/quantization.py

The module (a BatchNorm CNN for MNIST-1D) is ordinary user code; the callback does the rest:
one float warm-up epoch, int8 fake quantization of what ONNX Runtime will compute (static uint8
activation ranges, per-channel 7-bit weights, BN folded into the convolutions), ranges and BN
statistics frozen for the last epoch, and at the end an ONNX file that ``onnxruntime`` alone
runs with its int8 kernels -- no torch, no lightning-slim, no model class.
(``runtime="torchao"`` instead writes a ``torch.export`` program for CUDA / VNNI hosts.)
"""

import lightning.pytorch as pl
import numpy as np

from lightning_slim import MNIST1DCNN, CompressionReport, MNIST1DDataModule, QuantizationAwareTraining
from lightning_slim.quantization import cpu_int8_capability, fused_ops


def main():
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(
        targets=["Conv1d", "Linear"],  # or module names / "re:net\\.[0-3]"
        exclude=[],  # e.g. a sensitive first layer: ["net.0"]
        start_after=1,
        freeze_ranges_after=4,
        freeze_bn_after=4,
        unit="epoch",
        export_path="int8_model/mnist1d_cnn.onnx",
    )
    report = CompressionReport(accuracy_metric="val/acc")  # fp32 vs int8: size, latency, accuracy
    model = MNIST1DCNN(channels=32, batch_norm=True, lr=1e-2, lr_schedule="cosine")
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", callbacks=[qat, report], logger=False)
    trainer.fit(model, datamodule=MNIST1DDataModule(num_samples=10000, batch_size=128))

    # deploy: only onnxruntime is needed to run the int8 file
    import onnxruntime as ort

    session = ort.InferenceSession(qat.saved_path)
    x = np.random.default_rng(0).standard_normal((4, 1, 40), dtype=np.float32)
    print("int8 predictions:", session.run(None, {session.get_inputs()[0].name: x})[0].argmax(-1).tolist())
    print("ORT runs:", fused_ops(qat.saved_path), "on", cpu_int8_capability())
    print("int8 accuracy:", report.after.get("export_accuracy"), "fake-quant val/acc:", report.after.get("accuracy"))


if __name__ == "__main__":
    main()
