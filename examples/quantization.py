"""Quantization-aware training of an existing LightningModule, then a real int8 model on disk.

    python examples/quantization.py

The module (a BatchNorm CNN for MNIST-1D) is ordinary user code; the callback does the rest:
one float warm-up epoch, int8 fake quantization (BN folded into the convolutions), ranges and
BN statistics frozen for the last epochs, and at the end an int8 ``torch.export`` program
that loads with ``torch.export.load(path).module()`` -- no lightning-slim, no model class.
"""
import lightning.pytorch as pl
import torch

from lightning_slim import CompressionReport, MNIST1DCNN, MNIST1DDataModule, QuantizationAwareTraining


def main():
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(
        targets=["Conv1d", "Linear"],  # or module names / "re:net\\.[0-3]"
        exclude=[],                     # e.g. a sensitive first layer: ["net.0"]
        start_after=1, freeze_ranges_after=4, freeze_bn_after=4, unit="epoch",
        export_path="int8_model/mnist1d_cnn.pt2",
    )
    report = CompressionReport(accuracy_metric="val/acc")  # fp32 vs int8: size, latency, accuracy
    model = MNIST1DCNN(channels=32, batch_norm=True, lr=1e-2, lr_schedule="cosine")
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", callbacks=[qat, report], logger=False)
    trainer.fit(model, datamodule=MNIST1DDataModule(num_samples=10000, batch_size=128))

    # deploy: only torch is needed to load the int8 program
    int8 = torch.export.load(qat.saved_path).module()
    x = torch.randn(4, 1, 40)
    print("int8 predictions:", int8(x).argmax(-1).tolist())
    print("int8 accuracy:", report.after.get("export_accuracy"), "fake-quant val/acc:", report.after.get("accuracy"))


if __name__ == "__main__":
    main()
