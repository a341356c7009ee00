"""KnowledgeDistillation on modules written the way users write them around Hugging Face models
(``lightning_slim.demos.modules.CausalLM``: ``training_step`` calls ``self.model(input_ids=...,
attention_mask=..., labels=...)``): the student's logits come from the call the step really makes,
the teacher gets exactly that call, and anything that would stop the first step is refused before
training, by a check that runs the user's own ``training_step`` without moving the data order, the
random streams or the weights."""

from __future__ import annotations

import copy
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from test_lm_distillation import ROWS, FirstStep, PaddedWindows, counted_positions, llama, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_slim import KnowledgeDistillation
from lightning_slim.demos.modules import CausalLM
from lightning_slim.distillation.topk import teacher_topk, topk_soft_target_loss

# the demo modules define validation_step; these fits train only (Lightning's notice about it is expected)
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


class ExportableCausalLM(CausalLM):
    """The demo module plus the ``forward(input_ids)`` an ONNX export asks for; ``training_step`` still
    calls ``self.model(...)``, never ``self(...)``."""

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def recording_teacher(hidden: int = 48, seed: int = 1):
    teacher = llama(hidden, seed).eval()
    calls: list[tuple[tuple, dict]] = []
    teacher.register_forward_pre_hook(lambda m, a, kw: calls.append((a, dict(kw))), with_kwargs=True)
    return teacher, calls


@pytest.mark.parametrize("module_class", [CausalLM, ExportableCausalLM])
def test_the_student_call_is_the_one_training_step_makes(module_class):
    teacher, calls = recording_teacher()
    alpha, temperature, k = 0.5, 2.0, 8
    kd = KnowledgeDistillation(teacher=teacher, alpha=alpha, temperature=temperature, cache_teacher={"top_k": k})
    torch.manual_seed(0)
    student = module_class(llama(16, 0), lr=1e-3)
    initial = copy.deepcopy(student.model)
    recorder = FirstStep()
    data = PaddedWindows()
    quiet_trainer([kd, recorder]).fit(student, DataLoader(data, batch_size=6, shuffle=True))

    batch = recorder.batch
    # the teacher got the student's exact call in the step: ids and mask, no labels, no key/value cache
    step_args, step_kwargs = calls[-1]
    assert step_args == () and set(step_kwargs) == {"input_ids", "attention_mask", "use_cache"}
    assert torch.equal(step_kwargs["input_ids"], batch["input_ids"]) and step_kwargs["use_cache"] is False
    assert torch.equal(step_kwargs["attention_mask"], batch["attention_mask"])
    # the first step's gradients are (1 - alpha) * the model's own loss + alpha * top-k KD on the
    # positions the model's loss counts (shifted, padding and -100 left out), computed here by hand
    out = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = counted_positions(data)[batch["index"]]
    term = topk_soft_target_loss(out.logits, teacher_topk(t, k, temperature), temperature, mask)
    names = [n for n, p in initial.named_parameters()]
    want = torch.autograd.grad((1 - alpha) * out.loss + alpha * term, list(initial.parameters()), retain_graph=True)
    plain = torch.autograd.grad(out.loss, list(initial.parameters()))
    for name, w in zip(names, want):
        got = recorder.grads[f"model.{name}"]
        # float32 sums of a few hundred products reassociated between the fit and this hand computation
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)
    # the KD term moves some gradient by more than atol 1e-6 + the default rtol 1e-5: far above float32 noise
    assert any(
        not torch.allclose(recorder.grads[f"model.{n}"], (1 - alpha) * p, atol=1e-6) for n, p in zip(names, plain)
    )


class WithSpare(CausalLM):
    """A user module with a second submodule that training_step never calls."""

    def __init__(self, model):
        super().__init__(model)
        self.spare = nn.Linear(4, 4)


class OwnHead(CausalLM):
    """Calls the backbone and the output head itself and computes its own next-token loss."""

    def training_step(self, batch, batch_idx):
        hidden = self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = self.model.lm_head(hidden.last_hidden_state)
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def input_ids(batch):
    return batch["input_ids"]


@pytest.mark.parametrize(
    "module,logits,match",
    [
        (lambda: WithSpare(llama(16, 0)), {"student_module": "spare"}, r"training_step never called 'spare'"),
        (lambda: OwnHead(llama(16, 0)), None, r"calls 2 modules itself \['model.model', 'model.lm_head'\]"),
        (lambda: OwnHead(llama(16, 0)), {"student_module": "model"}, r"training_step never called 'model'"),
    ],
)
def test_a_student_call_the_step_does_not_make_is_refused_before_training(module, logits, match):
    teacher, calls = recording_teacher()
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.5, logits=logits)
    student = module()
    before = copy.deepcopy(student.state_dict())
    fit = quiet_trainer([kd])
    with pytest.raises(ValueError, match=match) as error:
        fit.fit(student, DataLoader(PaddedWindows(), batch_size=6))
    assert "student_module" in str(error.value)  # the fix is named
    assert fit.global_step == 0 and not calls  # refused in setup: no step, the teacher never ran
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_the_named_logits_module_with_an_input_fn_trains_a_step_that_calls_its_own_head():
    teacher, _ = recording_teacher()
    kd = KnowledgeDistillation(
        teacher=teacher, alpha=0.5, logits={"student_module": "model.lm_head"}, input_fn=input_ids
    )
    fit = quiet_trainer([kd], log_every_n_steps=1)
    fit.fit(OwnHead(llama(16, 0)), DataLoader(PaddedWindows(), batch_size=6))
    assert fit.global_step == 1 and kd.counts["teacher_examples"] == 6
    assert torch.isfinite(fit.callback_metrics["slim/distillation/kd_loss"])


class Stream(IterableDataset):
    def __iter__(self):
        data = PaddedWindows()
        return (data[i] for i in range(ROWS))


def test_without_a_sample_batch_the_check_waits_for_the_first_step_and_says_so():
    kd = KnowledgeDistillation(teacher=recording_teacher()[0], alpha=0.5, logits={"student_module": "spare"})
    fit = quiet_trainer([kd])
    with pytest.warns(UserWarning, match="could not run training_step on a sample batch"):
        with pytest.raises(RuntimeError, match="saw no call of 'spare' in training_step"):
            fit.fit(WithSpare(llama(16, 0)), DataLoader(Stream(), batch_size=6))


class Draws(CausalLM):
    """Draws from every global random stream inside training_step, and notes which rows it trained on."""

    def __init__(self, model):
        super().__init__(model)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["index"].tolist(), torch.rand(1).item(), random.random(), float(np.random.rand())))
        return super().training_step(batch, batch_idx)


class StartWeights(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_the_check_leaves_data_order_random_streams_and_weights_alone():
    def run(kd: bool):
        module, teacher = Draws(llama(16, 0)), llama(48, 1)  # built first: llama() seeds the global RNG
        initial = copy.deepcopy(module.state_dict())
        weights = StartWeights()
        callbacks = [weights] + ([KnowledgeDistillation(teacher=teacher, alpha=0.5)] if kd else [])
        pl.seed_everything(3, verbose=False)
        quiet_trainer(callbacks, max_steps=3).fit(module, DataLoader(PaddedWindows(), batch_size=6, shuffle=True))
        return module.seen, initial, weights.state

    plain, _, _ = run(False)
    seen, initial, at_start = run(True)
    # the check ran the user's step once, on the dataset's first rows; the fit itself then saw the same
    # rows and drew the same numbers from torch, Python and NumPy as without it (the streams were put back:
    # Python's and NumPy's, which nothing else draws from before the first step, give it the same numbers)
    assert len(seen) == 4 and seen[1:] == plain
    assert seen[0][0] == [0, 1] and seen[0][2:] == plain[0][2:]
    assert all(torch.equal(v, initial[k]) for k, v in at_start.items())


class SelfCalled(CausalLM):
    """training_step calls self(...) with Hugging Face-style labels; forward wraps the causal LM."""

    def forward(self, input_ids, attention_mask, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    def training_step(self, batch, batch_idx):
        return self(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss


def test_labels_given_to_a_wrapper_of_a_causal_lm_are_shifted_as_its_loss_shifts_them():
    kd = KnowledgeDistillation(teacher=llama(48, 1), alpha=0.5)
    data = PaddedWindows()
    quiet_trainer([kd], max_epochs=1, max_steps=-1).fit(SelfCalled(llama(16, 0)), DataLoader(data, batch_size=6))
    assert kd.student_path == ""  # the LightningModule itself: training_step calls self(...)
    # the wrapper's class is no causal LM, but the model inside it is: its labels are shifted by one
    rows = kd.report_rows()
    # a ratio of integer token counts, computed twice: equal up to float rounding (default rel=1e-6)
    assert rows["token_fraction_distilled"] == pytest.approx(float(counted_positions(data).float().mean()))
