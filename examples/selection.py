"""Train on the learnable part of noisy data: RHO-LOSS-style selection with OnlineDataSelection.

    python examples/selection.py            # about a minute on 2 CPU cores

MNIST-1D with 30% of the training labels corrupted. A reference model is trained on the clean
holdout split first, its per-example losses are cached by example index, and every training step
keeps the 25% of a 128-example super-batch whose learner loss most exceeds the reference's loss.
The user's LightningModule (here the library's demo CNN) is unchanged.
"""

import lightning.pytorch as pl

from lightning_slim import MNIST1DCNN, CompressionReport, MNIST1DDataModule, OnlineDataSelection
from lightning_slim.selection import train_reference


def main(max_epochs: int = 8) -> None:
    pl.seed_everything(1)
    # batch_size is the super-batch: the callback hands 25% of it to training_step
    data = MNIST1DDataModule(
        num_samples=20000, label_noise=0.3, holdout_fraction=0.3, with_index=True, batch_size=128, seed=1
    )
    # 1. the reference: the same kind of model, trained once on the clean holdout
    reference, reference_examples = train_reference(MNIST1DCNN(channels=64, lr_schedule="cosine"), data, max_epochs=12)
    # 2. selection: learnability = learner loss - reference loss, top 25% of each super-batch
    selection = OnlineDataSelection(
        keep=0.25,
        score="learnability",
        reference=reference,
        cache_reference=True,
        reference_train_examples=reference_examples,
    )
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[selection, CompressionReport(measure_latency=False)],
    )
    trainer.fit(MNIST1DCNN(channels=32, lr_schedule="cosine"), datamodule=data)
    rows = selection.report_rows()
    print(
        f"val/acc {float(trainer.callback_metrics['val/acc']):.3f}; trained on {rows['examples_trained']} of "
        f"{rows['examples_seen']} examples seen; corrupted labels among them "
        f"{rows['noisy_fraction_selected']:.1%} (base rate {rows['noisy_fraction_seen']:.1%}); "
        f"compute {rows['compute_ratio']:.2f}x plain training of the same steps, "
        f"{rows['compute_units_with_reference']:,} units with the reference"
    )


if __name__ == "__main__":
    main()
