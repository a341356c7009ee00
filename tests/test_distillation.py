"""KnowledgeDistillation on real Trainers: gradients, teacher handling, features, cache, schedule,
batch formats and the errors a user gets before training."""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from cases import small_data, small_model
from cases.distillation import teacher_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_slim import CompressionReport, KnowledgeDistillation
from lightning_slim.demos.models import MNIST1DTeacherCNN
from lightning_slim.distillation.callback import PROJECTIONS
from lightning_slim.distillation.functional import soft_target_loss


def make_teacher(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return MNIST1DTeacherCNN(channels=32, **kw)


def fit(callbacks, module=None, data=None, **kw):
    args = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
        limit_val_batches=0,
    )
    args.update(kw)
    trainer = pl.Trainer(callbacks=callbacks, **args)
    module = module or small_model()
    if isinstance(data, DataLoader):
        trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    else:
        trainer.fit(module, datamodule=data or small_data())
    return trainer, module


class Probe(pl.Callback):
    """Records the first batch, the first gradients and the teacher's mode at each of its forwards."""

    def __init__(self, kd=None):
        self.batch = self.grads = None
        self.teacher_modes, self.metrics = [], []
        if kd is not None:
            kd.teacher.register_forward_pre_hook(lambda m, a: self.teacher_modes.append(m.training))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = self.batch if self.batch is not None else batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = [p.grad.clone() for p in pl_module.net.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("slim/")})


@pytest.mark.parametrize("convention,start_step", [("weighted", 0), ("additive", 0), ("weighted", 1)])
def test_distillation_term_reaches_the_gradients(convention, start_step):
    torch.manual_seed(0)
    student, teacher, alpha, T = small_model(), make_teacher(), 0.7, 2.0
    initial = copy.deepcopy(student)
    kd = KnowledgeDistillation(
        teacher=teacher, alpha=alpha, temperature=T, convention=convention, schedule={"start_step": start_step}
    )
    probe = Probe()
    fit([kd, probe], student, max_steps=1)

    x, y = probe.batch
    logits = initial(x)
    ce, term = F.cross_entropy(logits, y), soft_target_loss(logits, teacher(x).detach(), T)
    total = {"weighted": (1 - alpha) * ce + alpha * term, "additive": ce + alpha * term}[convention]
    plain = torch.autograd.grad(ce, list(initial.net.parameters()), retain_graph=True)
    expected = plain if start_step > 0 else torch.autograd.grad(total, list(initial.net.parameters()))
    for got, want, ce_only in zip(probe.grads, expected, plain):
        # the same float32 gradient computed twice (in the fit, and by hand here) on one CPU's kernels: only the
        # summation order of the loss terms and the batch reductions (<= 100 terms) differs, ~100 * 2**-24 = 6e-6
        # relative; rtol 1e-4 leaves 15x, atol 1e-6 covers entries that cancel to ~0. The allclose below: the KD term
        # moves the update by far more than 1e-3 relative, so a missing term cannot pass as float noise
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        if start_step == 0:
            assert not torch.allclose(got, ce_only, rtol=1e-3, atol=1e-5)  # the KD term changed the update


def test_teacher_stays_frozen_in_eval_and_out_of_the_checkpoint(tmp_path):
    teacher = make_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5)

    class SwitchesTeacherToTrain(pl.Callback):  # as Lightning does to modules it owns
        def on_train_batch_end(self, *args):
            kd.teacher.train()

    probe = Probe(kd)
    logger = CSVLogger(tmp_path, name="csv")
    trainer, module = fit([kd, SwitchesTeacherToTrain(), probe], max_epochs=2, logger=logger, log_every_n_steps=3)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r["step"] for r in rows if r.get("slim/distillation/kd_loss")]
    assert logged == ["2", "5", "8", "11", "14"]  # exactly the steps Lightning sends to its loggers
    assert probe.teacher_modes and not any(probe.teacher_modes)
    for k, v in teacher.state_dict().items():  # batch-norm statistics untouched, no weight changed
        assert torch.equal(v, before[k]), k
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    ckpt = torch.load(tmp_path / "s.ckpt", weights_only=False)
    assert all(k.startswith("net.") for k in ckpt["state_dict"])
    assert set(ckpt["callbacks"]["KnowledgeDistillation"]) == {"counts"}  # no teacher weights either
    assert kd.teacher is teacher and not hasattr(module, "teacher")


def test_teacher_from_checkpoint_and_class_path_or_into_a_given_module():
    kd = KnowledgeDistillation(
        teacher_checkpoint=teacher_checkpoint(), teacher_class="lightning_slim.demos.models.MNIST1DTeacherCNN"
    )
    saved = torch.load(teacher_checkpoint(), weights_only=False)["state_dict"]
    assert all(torch.equal(kd.teacher.state_dict()[k], v) for k, v in saved.items())
    fresh = MNIST1DTeacherCNN(channels=32)
    kd2 = KnowledgeDistillation(teacher=fresh, teacher_checkpoint=teacher_checkpoint())
    assert torch.equal(kd2.teacher.net[0].weight, saved["net.0.weight"]) and not kd2.teacher.training
    with pytest.raises(ValueError, match="teacher_class='nope.Missing' cannot be imported"):
        KnowledgeDistillation(teacher_checkpoint=teacher_checkpoint(), teacher_class="nope.Missing")


def test_feature_pairs_train_projections_that_are_checkpointed_and_exported_away(tmp_path):
    kd = KnowledgeDistillation(
        teacher=make_teacher(), alpha=0.5, features={"loss": "cosine", "pairs": {"net.3": "net.5", "net.5": "net.8"}}
    )
    report = CompressionReport(measure_latency=False, output_path=str(tmp_path / "r.json"))
    module = small_model()
    trainer, _ = fit(
        [kd, report, ModelCheckpoint(dirpath=tmp_path)],
        module,
        max_epochs=2,
        enable_checkpointing=True,
        limit_val_batches=None,
        log_every_n_steps=5,
    )
    proj = getattr(module, PROJECTIONS)
    assert [tuple(p.linear.weight.shape) for p in proj.values()] == [(32, 16), (32, 16)]
    fresh = type(proj["0"])(16, 32, 1, torch.Generator().manual_seed(kd.config.seed))
    assert not torch.equal(fresh.linear.weight, proj["0"].linear.weight)  # trained by the student's optimizer
    ckpt = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)
    assert f"{PROJECTIONS}.1.linear.weight" in ckpt["state_dict"]
    # export drops them: the deployable student is exactly the student
    assert report.after["params"] == report.before["params"] == sum(p.numel() for p in module.net.parameters())
    # the same counts of correct predictions over the same 200 examples (export drops only the projections): equal, up
    # to the float32 representation of the ratio (~6e-8)
    assert report.after["export_accuracy"] == pytest.approx(report.after["accuracy"], abs=1e-6)
    assert report.techniques["distillation"]["teacher_examples"] == 1600
    assert 0.0 <= float(trainer.callback_metrics["slim/distillation/feature_loss"]) <= 4.0  # two pairs, each <= 2


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "content"])
def test_cache_runs_the_teacher_once_per_example_and_survives_resume(tmp_path, with_index):
    # plain (x, y) batches (the README's example) are keyed by the content of the teacher's input
    data = lambda: small_data(with_index=with_index)
    cb = lambda cache=True: KnowledgeDistillation(teacher=make_teacher(), cache_teacher=cache)
    full = cb()
    fit([full, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)], data=data(), max_epochs=2, enable_checkpointing=True)
    assert full.counts["teacher_examples"] == 800 and full.counts["cache_hits"] == 800
    first = next(tmp_path.glob("epoch=0*.ckpt"))
    resumed = cb()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)],
    )
    trainer.fit(small_model(), datamodule=data(), ckpt_path=first)
    assert resumed.counts == full.counts  # the restored cache served every later step
    ckpt = torch.load(first, weights_only=False)  # as written with cache_teacher={'checkpoint': False}
    del ckpt["callbacks"]["KnowledgeDistillation"]["cache"]
    torch.save(ckpt, first)
    rebuilt = cb({"checkpoint": False})
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[rebuilt, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)],
    )
    trainer.fit(small_model(), datamodule=data(), ckpt_path=first)
    assert rebuilt.counts["teacher_examples"] == 1600 and "cache" not in rebuilt.state_dict()


def test_cache_by_content_trains_exactly_as_the_cache_by_index():
    runs = {}
    for with_index in (True, False):
        pl.seed_everything(0, verbose=False)
        kd = KnowledgeDistillation(teacher=make_teacher(), cache_teacher=True)
        _, module = fit([kd], data=small_data(with_index=with_index), max_epochs=2)
        runs[with_index] = kd.counts, module.state_dict()
    (by_index, trained), (by_content, same) = runs[True], runs[False]
    assert by_content == by_index and by_index["cache_hits"] == by_index["teacher_examples"] == 800
    assert all(torch.equal(v, same[k]) for k, v in trained.items())
    # asking for indices where the batches carry none is refused before training, saying how to add them
    module = small_model()
    with pytest.raises(TypeError, match=r"key='index'.*with_index=True.*\(x, y, index\)"):
        fit([KnowledgeDistillation(teacher=make_teacher(), cache_teacher={"key": "index"})], module, max_steps=1)
    assert "training_step" not in module.__dict__


def test_schedule_window_and_annealing():
    kd = KnowledgeDistillation(
        teacher=make_teacher(),
        alpha=1.0,
        temperature=4.0,
        schedule={"alpha_final": 0.0, "temperature_final": 1.0, "start_step": 2, "stop_step": 6},
    )
    probe = Probe()
    fit([kd, probe], max_steps=8, log_every_n_steps=1)
    assert kd.counts["teacher_passes"] == 4  # steps 2, 3, 4, 5 only
    alphas = [m.get("slim/distillation/alpha") for m in probe.metrics]
    # linear interpolation of a few float64 constants, logged as float32 (~1e-7 relative): approx's default rel=1e-6
    # bounds that; a schedule one step off misses by 0.25
    assert alphas[2:6] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [m.get("slim/distillation/temperature") for m in probe.metrics][2:6] == pytest.approx([4, 3.25, 2.5, 1.75])
    assert kd.weights_at(1)[0] is False and kd.weights_at(6)[0] is False


@dataclass
class Signals:
    signal: torch.Tensor
    label: torch.Tensor


def collate_signals(items):
    return Signals(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]))


class CustomBatchModule(type(small_model())):
    """Reads a custom batch type and calls self.net directly (not self(x))."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch.signal), batch.label)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self.net(batch.signal), batch.label))


def test_dict_and_custom_batches():
    dm = small_data()
    dm.setup()
    x, y = dm.x_train[:200], dm.y_train[:200]
    dicts = DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=50)
    kd = KnowledgeDistillation(teacher=make_teacher().net, alpha=0.5)  # a plain nn.Module teacher
    fit([kd], data=dicts)
    assert kd.counts["teacher_examples"] == 200

    # training_step calls self.net, not self(x): found by running it before training, nothing to name
    custom = DataLoader(list(zip(x, y)), batch_size=50, collate_fn=collate_signals)
    for logits in (None, {"student_module": "net"}):
        kd = KnowledgeDistillation(teacher=make_teacher(), input_fn=lambda b: b.signal, logits=logits)
        trainer, _ = fit([kd], CustomBatchModule(channels=16), custom)
        assert kd.student_path == "net" and kd.counts["teacher_examples"] == 200 and trainer.global_step == 4


class Manual(type(small_model())):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False


def holds_teacher(teacher):
    module = small_model()
    module.teacher = teacher
    return module


@pytest.mark.parametrize(
    "make,error,match",
    [
        (
            lambda: (KnowledgeDistillation(teacher=make_teacher(num_classes=5)), small_model()),
            ValueError,
            r"student output shape \(2, 10\) differs from the teacher's \(2, 5\)",
        ),
        (
            lambda: (
                KnowledgeDistillation(teacher=make_teacher(), features={"pairs": {"net.9": "net.8"}}),
                small_model(),
            ),
            ValueError,
            r"the student \(MNIST1DCNN\) has no submodule named 'net.9'; it has: .*net.0, net.1",
        ),
        (
            lambda: (
                KnowledgeDistillation(teacher=make_teacher(), features={"pairs": {"net.5": "body"}}),
                small_model(),
            ),
            ValueError,
            "the teacher .* has no submodule named 'body'",
        ),
        (
            lambda: (
                KnowledgeDistillation(teacher=make_teacher(), features={"pairs": {"net.1": "net.8"}}),
                small_model(),
            ),
            ValueError,
            r"shapes \(2, 16, 19\) and \(2, 32, 5\) may differ only in dimension dim=1",
        ),
        (
            lambda: (KnowledgeDistillation(teacher=make_teacher()), Manual(channels=16)),
            RuntimeError,
            "needs automatic optimization.*soft_target_loss",
        ),
        (
            lambda: (lambda t: (KnowledgeDistillation(teacher=t), holds_teacher(t)))(make_teacher()),
            ValueError,
            "the teacher is \\(part of\\) the student",
        ),
    ],
)
def test_bad_setups_fail_before_training(make, error, match):
    kd, module = make()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(error, match=match):
        fit([kd], module)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # not one step taken
    assert "training_step" not in module.__dict__


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, r"temperature=0.0 is outside the allowed range \(0, inf\)"),
        ({"schedule": {"temperature_final": -1.0}}, "temperature_final=-1.0"),
        ({"alpha": 1.5}, r"alpha=1.5 is outside the allowed range \[0, 1\]"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"schedule": {"alpha_final": 2.0}}, "alpha_final=2.0"),
        ({"convention": "sum"}, "convention='sum' is not one of"),
        ({"features": {"loss": "l1", "pairs": {"a": "b"}}}, "loss='l1'"),
        ({"features": {"pair": {"a": "b"}}}, "features has no option 'pair'"),
        ({"schedule": {"start_step": 5, "stop_step": 5}}, "stop_step=5 must be greater than start_step=5"),
        ({"alpha": 0.0}, "distils nothing"),
        ({"teacher": None}, "no teacher"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    kwargs = {"teacher": make_teacher(), **kwargs}
    with pytest.raises(ValueError, match=match):
        KnowledgeDistillation(**kwargs)
