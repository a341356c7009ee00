from functools import partial

from cases import Case, small_data
from lightning_slim.selection import OnlineDataSelection

# RHO-LOSS on noisy labels: a reference trained on the clean holdout, its losses cached by index
REFERENCE = {
    "class_path": "lightning_slim.MNIST1DCNN",
    "init_args": {"channels": 16},
    "train_on_holdout": {"epochs": 10, "lr": 0.03},
}


def _callback():
    return OnlineDataSelection(
        keep=0.25, score="learnability", reference=REFERENCE, cache_reference=True, histogram_every_n_steps=5
    )


def _check(trainer, module, cb):
    s = cb.ledger.summary()
    assert s["examples_trained"] == sum(max(1, round(0.25 * n)) for n in (100,) * 5 + (60,)) * trainer.current_epoch
    assert s["examples_seen"] == 560 * trainer.current_epoch
    assert s["scoring_forwards"] == s["examples_seen"]
    assert s["reference_forwards"] == 560  # each training example's reference loss computed once
    assert cb.ledger.reference_train_examples == 10 * 240
    noisy = cb.ledger.noisy_summary()
    # integer counts: data.corrupt_labels flips exactly round(0.3 n) training labels and every example is scored each
    # epoch, so the fraction is 0.3 up to 1/(2n) on any CPU; 0.01 fails a ledger that drops or double-counts a batch of
    # 100
    assert abs(noisy["noisy_fraction_seen"] - 0.3) < 0.01
    assert noisy["noisy_fraction_selected"] < 0.2, noisy  # learnability avoids corrupted labels (base rate 0.3)
    assert cb.report_rows()["compute_units"] == s["compute_units"]


CASES = [
    Case(
        name="selection",
        callback=_callback,
        data=partial(small_data, label_noise=0.3, holdout_fraction=0.3, with_index=True, seed=1),
        check=_check,
        wandb_keys=(
            "slim/selection/examples_trained",
            "slim/selection/compute_units",
            "slim/selection/noisy_fraction_selected",
            "slim/selection/scores/values",
            "slim/selection/compute_ratio",
        ),
        cli_args=("--data.holdout_fraction=0.3", "--data.with_index=true", "--data.label_noise=0.3", "--data.seed=1"),
    )
]
