"""The smallest use of lightning-slim: an existing LightningModule, a plain Trainer, one callback.

python examples/quickstart.py
"""

import lightning.pytorch as pl

from lightning_slim import MNIST1DCNN, CompressionReport, MNIST1DDataModule

if __name__ == "__main__":
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[CompressionReport(accuracy_metric="val/acc")], logger=False)
    trainer.fit(MNIST1DCNN(), datamodule=MNIST1DDataModule(num_samples=5000))
