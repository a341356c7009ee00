"""The shared training_step wrapper on its own: order, loss containers, restore, DDP."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from cases import CleanDistributedExit, small_data, small_model

from lightning_slim.batches import batch_size, slice_batch
from lightning_slim.core import interception
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.contract import SETUP_ORDER, STEP_ORDER, Effect


class KeepFirstHalf(SlimCallback):
    """A selection participant: keeps the first half of each batch and records sizes."""

    technique = "test_select"
    effects = frozenset({Effect.SELECT_BATCH})

    def __init__(self):
        self.seen, self.kept = [], []

    def select_batch(self, trainer, pl_module, batch, batch_idx):
        n = batch_size(batch)
        self.seen.append(n)
        out = slice_batch(batch, torch.arange(n // 2))
        self.kept.append(batch_size(out))
        return out


class AddWeightNorm(SlimCallback):
    """A loss participant: adds coef * ||w||^2 of the first layer; records the batch it saw."""

    technique = "test_loss"
    effects = frozenset({Effect.ADD_LOSS})

    def __init__(self, coef: float = 1.0, log_order: list | None = None):
        self.coef, self.batches, self.log_order = coef, [], log_order

    def loss_term(self, trainer, pl_module, batch, batch_idx, seen):
        self.batches.append(batch_size(batch))
        if self.log_order is not None:
            self.log_order.append(self.coef)
        return self.coef * pl_module.net[0].weight.pow(2).sum()


def fit(callbacks, module=None, **kwargs):
    module = module or small_model()
    args = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    args.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **args)
    trainer.fit(module, datamodule=small_data())
    return trainer, module


def test_selection_runs_before_loss_terms_and_user_step_sees_selected_batch():
    select, loss = KeepFirstHalf(), AddWeightNorm()
    sizes = []

    class Recording(type(small_model())):
        def training_step(self, batch, batch_idx):
            sizes.append(batch_size(batch))
            return super().training_step(batch, batch_idx)

    fit([loss, select], module=Recording(channels=16))  # listed in the "wrong" order on purpose
    assert select.seen == [100] * 8
    assert sizes == loss.batches == [50] * 8


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_loss_terms_reach_the_gradients():
    torch.manual_seed(0)
    module = small_model()
    weight = module.net[0].weight
    batch = next(iter(small_data().train_dataloader()))

    def grad_with(participants):
        for p in participants:
            interception.attach(module, p)
        module.zero_grad()
        module.training_step(batch, 0).backward()
        for p in participants:
            interception.detach(module, p)
        return weight.grad.clone()

    plain, with_term = grad_with([]), grad_with([AddWeightNorm(coef=0.5)])
    # d/dw of 0.5 ||w||^2 added to the same gradient: one float32 add and a subtraction, a few ulps
    torch.testing.assert_close(with_term - plain, 0.5 * 2 * weight.detach())


def test_one_wrapper_for_many_participants_and_module_restored():
    module = small_model()
    original = type(module).training_step
    a, b = AddWeightNorm(1e-3), AddWeightNorm(2e-3)
    interception.attach(module, a)
    wrapper = module.training_step
    interception.attach(module, b)
    assert module.training_step is wrapper
    interception.detach(module, a)
    assert module.training_step is wrapper
    interception.detach(module, b)
    assert "training_step" not in module.__dict__
    assert module.training_step.__func__ is original


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_dict_loss_and_none_are_handled():
    class DictStep(type(small_model())):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx == 0 else {"loss": loss, "extra": 1}

    term = AddWeightNorm(1e-3)
    _trainer, module = fit([term], module=DictStep(channels=16))
    assert len(term.batches) == 7  # the skipped first step got no loss term
    assert "training_step" not in module.__dict__


def test_manual_optimization_is_refused_with_a_clear_message():
    class Manual(type(small_model())):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimization"):
        fit([AddWeightNorm()], module=Manual(channels=16))


def test_module_is_restored_even_when_fit_fails():
    class Boom(type(small_model())):
        def training_step(self, batch, batch_idx):
            raise ValueError("user bug")

    module = Boom(channels=16)
    with pytest.raises(ValueError, match="user bug"):
        fit([AddWeightNorm()], module=module)
    # Lightning calls teardown on failure too: the user's module is not left wrapped
    assert "training_step" not in module.__dict__


def test_wrapper_works_under_ddp_spawn(tmp_path):
    # a loss term large enough to shrink the first layer's weights far more than plain training
    pl.seed_everything(0)
    plain = small_model()
    fit([CleanDistributedExit()], module=plain, strategy="ddp_spawn", devices=2, max_epochs=3)
    pl.seed_everything(0)
    shrunk = small_model()
    fit(
        [AddWeightNorm(coef=1.0), KeepFirstHalf(), CleanDistributedExit()],
        module=shrunk,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=3,
    )
    # both ranks trained with the loss term: the weights were pulled towards zero
    assert shrunk.net[0].weight.norm() < 0.8 * plain.net[0].weight.norm()
    assert "training_step" not in shrunk.__dict__


class RecordsEveryEffect(SlimCallback):
    """Does every effect of set-up and of a step, and records the order the machinery calls them in."""

    technique = "test_record"
    effects = frozenset({Effect.BASELINE, Effect.SWAP_MODULES, *STEP_ORDER})

    def __init__(self):
        self.calls: list[str] = []

    def _record(self, name: str) -> None:
        if name not in self.calls:  # the first call of each: the order, not the count
            self.calls.append(name)

    def take_baseline(self, pl_module):
        self._record("take_baseline")

    def validate(self, trainer, pl_module):
        self._record("validate")

    def prepare_model(self, trainer, pl_module):
        self._record("prepare_model")

    def restore_model(self, pl_module):
        self._record("restore_model")

    def restructure_now(self, trainer, pl_module):
        self._record("restructure_now")
        self.restructured = getattr(self, "restructured", 0) + 1
        return False

    def select_batch(self, trainer, pl_module, batch, batch_idx):
        self._record("select_batch")
        return batch

    def watched_modules(self, pl_module):
        self._record("watched_modules")
        return {"": pl_module}, {}

    def scale_loss(self, trainer, pl_module, loss, batch, batch_idx):
        self._record("scale_loss")
        return loss

    def loss_term(self, trainer, pl_module, batch, batch_idx, seen):
        self._record("loss_term")
        self.forward_calls = len(seen.records(""))  # the user's step called its forward once

    def after_optimizer_step(self, trainer, pl_module, optimizer):
        self._record("after_optimizer_step")


def test_the_machinery_runs_the_contracts_declared_orders():
    """SETUP_ORDER and STEP_ORDER in contract.py are what the machinery does, not a second copy."""
    recorder = RecordsEveryEffect()
    fit([recorder], limit_train_batches=2, limit_val_batches=0)
    in_setup = [s for s in SETUP_ORDER if s in recorder.calls]  # check_combination/attach record nothing
    in_step = [e.value for e in STEP_ORDER if e.value not in SETUP_ORDER]  # restructure_now: in both
    assert recorder.calls == [*in_setup, *in_step, "restore_model"], recorder.calls
    assert recorder.forward_calls == 1
    assert recorder.restructured == 1 + 2  # in setup, then at the start of both batches
