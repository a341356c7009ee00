"""OnlineDataSelection: the functional core, bad input caught before training, what the user's
training_step receives, the reference sources agreeing exactly, noise avoidance, and JEST."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_slim import MNIST1DCNN, DigitsCNN, DigitsDataModule, MNIST1DDataModule
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.contract import Capability
from lightning_slim.selection import (
    OnlineDataSelection,
    compute_reference_losses,
    example_scores,
    jest_select,
    select_sample,
    select_topk,
    sigmoid_pair_losses,
)
from lightning_slim.selection.functional import chunk_sizes, scoring_mode
from lightning_slim.selection.reference import fit_on_holdout, freeze


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train fastest on one thread, and steadily on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(cb, module, data=None, epochs=1, **kwargs):
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[cb],
        deterministic=True,
    )
    trainer.fit(module, datamodule=data, **kwargs)
    return trainer


def mnist(**kwargs):
    kwargs = {"num_samples": 1000, "batch_size": 100, "seed": 1, **kwargs}
    return MNIST1DDataModule(**kwargs)


class Recorder(MNIST1DCNN):
    """A user's module that records the batch sizes its training_step receives."""

    def __init__(self, **kwargs):
        super().__init__(channels=8, **kwargs)
        self.sizes = []

    def training_step(self, batch, batch_idx):
        self.sizes.append(len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch["x"]))
        return super().training_step(batch, batch_idx)


# --- the functional core -------------------------------------------------------------------------------
def test_scores_and_topk():
    learner, reference = torch.tensor([2.0, 0.1, 3.0, 1.0]), torch.tensor([0.5, 0.1, 2.9, 0.2])
    # one float32 subtraction per entry: 3.0 - 2.9 = 0.1 up to float32 rounding (~1e-7; default rel=1e-6)
    assert example_scores("learnability", learner, reference).tolist() == pytest.approx([1.5, 0.0, 0.1, 0.8])
    assert select_topk(example_scores("learnability", learner, reference), 2).tolist() == [0, 3]
    assert select_topk(example_scores("hard", learner, None), 1).tolist() == [2]
    assert select_topk(example_scores("easy_reference", None, reference), 1).tolist() == [1]
    assert example_scores(lambda learner_loss, r: learner_loss * 0 + 7, learner, None).tolist() == [7.0] * 4


def test_sampling_is_seeded_without_replacement_and_follows_scores():
    scores = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    draw = lambda seed: select_sample(scores, 3, torch.Generator().manual_seed(seed))
    assert draw(5).tolist() == draw(5).tolist()
    picks = [draw(s) for s in range(200)]
    assert all(len(set(p.tolist())) == 3 for p in picks)
    assert sum(0 in p.tolist() for p in picks) > 190  # softmax weight of example 0 is ~0.92
    cold = [select_sample(scores, 1, torch.Generator().manual_seed(s), temperature=100.0) for s in range(300)]
    assert sum(int(p) == 0 for p in cold) < 100  # a high temperature approaches uniform


def test_jest_conditions_each_chunk_on_the_examples_already_chosen():
    m = torch.diag(torch.tensor([3.0, 0.0, 1.0, 2.9, 1.5, 1.2]))
    m[0, 1] = m[1, 0] = 5.0  # example 1 is only worth learning together with example 0
    independent = select_topk(m.diagonal(), 4).tolist()
    joint = jest_select(m, 4, num_chunks=2, generator=torch.Generator().manual_seed(0), method="topk").tolist()
    assert 1 not in independent and sorted(joint) == [0, 1, 3, 4]
    sampled = jest_select(torch.randn(32, 32), 10, 3, torch.Generator().manual_seed(0))
    assert len(set(sampled.tolist())) == 10 and chunk_sizes(10, 3) == [4, 3, 3]


def test_sigmoid_pair_losses_and_scoring_mode():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    expected = -F.logsigmoid(torch.tensor([[2.0, 1.0], [-0.5, 3.0]]))
    # the same logsigmoid of the same 4 numbers: a few ulps at most, float32 defaults
    torch.testing.assert_close(sigmoid_pair_losses(logits), expected)
    model = MNIST1DCNN(channels=8, batch_norm=True)
    model.net[1].eval()  # a user's own per-module mode survives scoring
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with scoring_mode(model) as m:
        out = m(torch.randn(16, 1, 40) * 5)
        assert not m.training and not out.requires_grad
    assert model.training and not model.net[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched


# --- bad input: a clear error before training -----------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": 0.0}, "keep=0.0"),
        ({"keep": 1.5}, "keep=1.5"),
        ({"keep": -0.1}, r"\(0, 1\]"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"selection": "best"}, "selection='best'"),
        ({"score": "bogus"}, "score='bogus'"),
        ({"window": {"start_step": 5, "stop_step": 5}}, "stop_step=5"),
        ({"window": {"outside": "skip"}}, "outside='skip'"),
        ({"temperature": 0}, "temperature=0"),
        ({"reference": nn.Linear(1, 1), "reference_losses": torch.zeros(3)}, "not both"),
        ({"joint": True, "score": "uniform"}, "joint=True"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineDataSelection(**kwargs)


class DictSignals(Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"signal": self.x[i], "label": self.y[i]}


class DictModule(pl.LightningModule):
    """User code with its own batch layout and no per_sample_loss."""

    def __init__(self):
        super().__init__()
        self.net = MNIST1DCNN(channels=8).net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["signal"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dict_loss(model, batch):
    """A loss_fn named by dotted path, as a YAML config would."""
    return F.cross_entropy(model(batch["signal"]), batch["label"], reduction="none")


@pytest.mark.parametrize(
    "kwargs, data_kwargs, match",
    [
        ({"batch_size": 200, "score": "hard"}, {}, "smaller than the batch_size=200"),
        ({"keep": 0.001, "score": "hard"}, {}, "keeps no example"),
        ({"score": "learnability"}, {}, "needs a reference"),
        ({"reference": nn.Linear(1, 1), "cache_reference": True}, {}, "carry example indices"),
        (
            {"reference_losses": torch.cat([torch.rand(500), torch.full((300,), float("nan"))])},
            {"with_index": True},
            r"covers 500 of the 800 training examples; missing indices \[500, 501",
        ),
        ({"score": "hard", "joint": True}, {}, "pair_loss_fn"),
        ({"reference": "teacher"}, {}, "teacher"),
        (
            {"reference": {"class_path": "lightning_slim.MNIST1DCNN", "checkpoint": "/nonexistent.ckpt"}},
            {},
            "does not exist",
        ),
        (
            {"score": "hard", "loss_fn": "test_selection.no_such_function"},
            {},
            "loss_fn=.test_selection.no_such_function. cannot be imported",
        ),
    ],
)
def test_errors_before_training(kwargs, data_kwargs, match, tmp_path):
    module = Recorder()
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        fit(OnlineDataSelection(**kwargs), module, mnist(**data_kwargs))
    assert module.sizes == []  # nothing trained


def test_no_per_example_loss_is_an_error_at_setup_and_loss_fn_fixes_it():
    loader = DataLoader(DictSignals(), batch_size=32)
    module = DictModule()
    with pytest.raises(ValueError, match="cannot compute learner losses.*loss_fn"):
        fit(OnlineDataSelection(keep=0.5, score="hard"), module, train_dataloaders=loader)
    cb = OnlineDataSelection(keep=0.5, score="hard", loss_fn="test_selection.dict_loss")
    fit(cb, module, train_dataloaders=loader)
    assert cb.ledger.examples_trained == 32 and cb.ledger.examples_seen == 64


# --- what the user's training_step receives ---------------------------------------------------------------
def test_training_step_gets_the_selected_sub_batch_within_the_window():
    module = Recorder()
    cb = OnlineDataSelection(keep=0.3, score="hard", window={"start_step": 2, "stop_step": 5})
    fit(cb, module, mnist())
    assert module.sizes == [30] * 8  # 800 examples in super-batches of 100
    assert cb.ledger.selection_steps == 3 and cb.ledger.learner_forwards == 300  # scoring only in the window
    full = Recorder()
    fit(OnlineDataSelection(keep=0.3, score="hard", window={"start_step": 7, "outside": "full"}), full, mnist())
    assert full.sizes == [100] * 7 + [30]
    exact = Recorder()
    fit(OnlineDataSelection(batch_size=25, score="uniform"), exact, mnist(holdout_fraction=0.3))
    assert exact.sizes == [25] * 5 + [15]  # 560 examples: the last super-batch of 60 yields 25 * 60 / 100


class PairBatch:
    """A custom batch type the default slicer cannot read."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __len__(self):
        return len(self.a)


def slice_pairs(batch, rows):
    return PairBatch(batch.a[rows], batch.b[rows])


class PairData(Dataset):
    """Paired views of MNIST-1D-like signals (view b: a noisy copy of view a)."""

    def __init__(self, n=96):
        g = torch.Generator().manual_seed(3)
        self.a = torch.randn(n, 40, generator=g)
        self.b = self.a + 0.3 * torch.randn(n, 40, generator=g)

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return self.a[i], self.b[i]


def collate_pairs(items):
    return PairBatch(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]))


class TwoTower(pl.LightningModule):
    """A SigLIP-style contrastive module: its loss depends on the whole batch."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fa, self.fb = nn.Linear(40, 16), nn.Linear(40, 16)
        self.scale, self.bias = nn.Parameter(torch.tensor(2.0)), nn.Parameter(torch.tensor(-3.0))
        self.sizes = []

    def per_pair_loss(self, batch):
        za, zb = F.normalize(self.fa(batch.a), dim=-1), F.normalize(self.fb(batch.b), dim=-1)
        return sigmoid_pair_losses(za @ zb.T * self.scale.exp() + self.bias)

    def training_step(self, batch, batch_idx):
        self.sizes.append(len(batch))
        assert (batch.b - batch.a).abs().mean() < 0.5  # the two views stay paired after slicing
        return self.per_pair_loss(batch).sum() / len(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_jest_joint_selection_with_a_custom_batch_type():
    loader = DataLoader(PairData(), batch_size=32, collate_fn=collate_pairs)
    module, reference = TwoTower(0), freeze(TwoTower(1))
    cb = OnlineDataSelection(
        keep=0.25,
        joint={"num_chunks": 4},
        reference=reference,
        selector="test_selection.slice_pairs",
        selection="sample",
    )
    fit(cb, module, train_dataloaders=loader, epochs=2)
    assert module.sizes == [8] * 6
    assert cb.ledger.learner_forwards == cb.ledger.reference_forwards == 192
    assert cb.report_rows()["joint"] is True
    with pytest.raises(ValueError, match="selector"):
        fit(OnlineDataSelection(keep=0.25, joint=True, reference=reference), TwoTower(0), train_dataloaders=loader)


# --- references: a model, its cache, a precomputed cache, a teacher, a checkpoint: the same training ------------
class TeacherHolder(SlimCallback):
    """Stands in for KnowledgeDistillation: a technique that provides a teacher."""

    technique = "test_teacher"

    def __init__(self, teacher):
        self.teacher = teacher

    def provides(self):
        return {Capability.TEACHER: self.teacher}


class PlainNet(nn.Sequential):
    def __init__(self, channels=8):
        super().__init__(*MNIST1DCNN(channels=channels).net)


def test_reference_sources_train_identically(tmp_path):
    data = lambda: mnist(with_index=True, holdout_fraction=0.3, label_noise=0.3)
    dm = data()
    torch.manual_seed(0)
    reference = PlainNet()
    fit_on_holdout(reference, dm.holdout_dataloader(shuffle=True), epochs=5, lr=0.03)
    freeze(reference)
    torch.save(reference.state_dict(), tmp_path / "ref.pt")
    losses = compute_reference_losses(reference, dm.train_dataloader())
    assert losses.shape == (560,) and not torch.isnan(losses).any()

    def run(cb, extra=()):
        torch.manual_seed(0)
        module = Recorder()
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[*extra, cb],
        )
        trainer.fit(module, datamodule=data())
        return module.state_dict(), cb.ledger

    common = dict(keep=0.2, score="learnability")
    direct, ledger = run(OnlineDataSelection(reference=reference, **common))
    assert ledger.reference_forwards == 2 * 560
    variants = [
        (OnlineDataSelection(reference=reference, cache_reference=True, **common), (), 560),
        (OnlineDataSelection(reference_losses=losses, **common), (), 0),
        (OnlineDataSelection(reference="teacher", **common), (TeacherHolder(reference),), 2 * 560),
        (
            OnlineDataSelection(
                reference={"class_path": "test_selection.PlainNet", "checkpoint": str(tmp_path / "ref.pt")}, **common
            ),
            (),
            2 * 560,
        ),
    ]
    for cb, extra, forwards in variants:
        weights, ledger = run(cb, extra)
        assert ledger.reference_forwards == forwards
        for k in direct:
            # exact: every source hands the selection the same reference losses (computed on the same batches by the
            # same kernels, or cached from them), so the same examples train in the same order on this CPU
            torch.testing.assert_close(weights[k], direct[k], rtol=0, atol=0)
    restored = OnlineDataSelection(reference=reference, cache_reference=True, **common)
    restored.load_state_dict(variants[0][0].state_dict())  # the lazily built cache is checkpointed
    # the same reference's per-example losses (a few nats), the cache's computed in training batches, these in the
    # loader's, of the same sizes: bit-equal under ATEN_CPU_CAPABILITY=default and avx2 (measured); a kernel that
    # blocked batches differently would move them by an ulp or two (2 * 2**-22 = 5e-7 at 4-8 nats): 1e-6
    torch.testing.assert_close(restored.cache.lookup(torch.arange(560))["loss"], losses, rtol=0, atol=1e-6)


# --- behaviour that matters: under label noise, learnability avoids corrupted examples, "hard" seeks them --------
def test_learnability_avoids_noisy_labels_and_hard_selection_seeks_them():
    data = lambda: DigitsDataModule(batch_size=128, label_noise=0.3, holdout_fraction=0.3, with_index=True, seed=1)
    reference = {"class_path": "lightning_slim.DigitsCNN", "train_on_holdout": {"epochs": 10, "lr": 0.01}}
    results = {}
    for score in ("learnability", "hard"):
        cb = OnlineDataSelection(
            keep=0.2, score=score, reference=reference if score != "hard" else None, cache_reference=score != "hard"
        )
        trainer = fit(cb, DigitsCNN(), data(), epochs=3)
        results[score] = cb.ledger.noisy_summary()
    # integer counts: exactly round(0.3 n) corrupted labels, all seen every epoch: 0.3 up to 1/(2n)
    assert abs(results["hard"]["noisy_fraction_seen"] - 0.3) < 0.02
    assert results["learnability"]["noisy_fraction_selected"] < 0.1, results
    assert results["hard"]["noisy_fraction_selected"] > 0.2, results  # about the base rate, or above
    assert trainer.global_step == 3 * 8


def test_uniform_control_yaml(tmp_path, monkeypatch):
    from pathlib import Path

    from lightning_slim.cli import main

    config = Path(__file__).resolve().parents[1] / "callbacks" / "selection_uniform.yaml"
    monkeypatch.setattr("sys.argv", ["lightning_slim.cli"])
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            "--model",
            "lightning_slim.MNIST1DCNN",
            "--model.channels=8",
            "--data",
            "lightning_slim.MNIST1DDataModule",
            "--data.num_samples=1000",
            "--trainer.max_epochs=1",
            "--seed_everything=0",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, OnlineDataSelection)]
    assert cb.score == "uniform" and cb.ledger.examples_trained == 8 * 25 and cb.ledger.learner_forwards == 0


def test_an_iterable_dataset_is_checked_on_its_first_batch():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(DictSignals()[i] for i in range(64))

    module = DictModule()
    with pytest.raises(ValueError, match="cannot compute learner losses"):
        fit(OnlineDataSelection(keep=0.5, score="hard"), module, train_dataloaders=DataLoader(Stream(), batch_size=32))


# --- beside gradual pruning (the "all four together" report of issue 19) -------------------------------
class ScoringSees(Recorder):
    """Records, at each scoring call, whether every weight pruning has masked is exactly zero."""

    def __init__(self):
        super().__init__()
        self.pruning = None
        self.masked_zero_while_scoring: list[bool] = []

    def per_sample_loss(self, batch):
        if self.pruning is not None and self.pruning.masks:
            params = dict(self.named_parameters())
            self.masked_zero_while_scoring.append(
                all(bool((params[n][m == 0] == 0).all()) for n, m in self.pruning.masks.items() if n in params)
            )
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y, reduction="none")


def test_selection_beside_gradual_pruning_keeps_its_schedule_and_says_what_keep_does(caplog):
    """Pruning's events fall on the same optimizer steps with and without selection (steps are optimizer
    steps, one per super-batch), scoring sees the model that trains (its pruned weights at zero), and a
    fraction-based keep is said out loud: the rows per step, the loader's batch and the remedy."""
    from lightning_slim import IterativeMagnitudePruning

    schedule = {"kind": "gradual", "final_sparsity": 0.5, "end": 6, "every": 2, "unit": "step"}
    steps = {}
    for name, selection in (("alone", None), ("with", OnlineDataSelection(keep=0.3, score="hard"))):
        module, pruning = ScoringSees(), IterativeMagnitudePruning(schedule, accuracy_metric=None)
        module.pruning = pruning
        with caplog.at_level("INFO"):
            pl.Trainer(
                max_epochs=1,
                accelerator="cpu",
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                callbacks=[pruning] + ([selection] if selection else []),
            ).fit(module, datamodule=mnist())
        steps[name] = [row[3] for row in pruning.curve]
    assert steps["with"] == steps["alone"] == [0, 2, 4, 6, 8]  # 4 events, then the end of the fit
    assert module.masked_zero_while_scoring and all(module.masked_zero_while_scoring)
    rows = selection.report_rows()
    assert (rows["super_batch"], rows["trained_per_step"]) == (100, 30)
    assert "30 of every 100" in rows["batch_note"] and "IterativeMagnitudePruning" in rows["batch_note"]
    assert "super-batches of 334 and pass batch_size=100" in rows["batch_note"]
    assert rows["batch_note"] in caplog.text
    exact = OnlineDataSelection(batch_size=30, score="hard")
    fit(exact, Recorder(), mnist())
    assert "batch_note" not in exact.report_rows() and exact.report_rows()["trained_per_step"] == 30
