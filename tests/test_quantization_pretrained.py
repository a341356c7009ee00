"""QAT on models as users bring them (issue 19): a real pretrained all-MiniLM-L6-v2 and Hugging Face
architectures left in eval mode as ``from_pretrained`` returns them, user modules that define no
``forward`` or a ``forward(input_ids, attention_mask)``, GPT-2's ``Conv1D``, per-token dynamic
activations, and what a plain install (no ``[onnx]`` extra) gets before training (issue 20)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import onnx
import pytest
import torch
from torch import nn
from zoo.models import HFCausalLM, HFSequenceClassifier, build

from lightning_slim import QuantizationAwareTraining
from lightning_slim.demos import modules, pretrained, text
from lightning_slim.quantization import (
    QuantizationConfig,
    convert_to_int8,
    fp32_onnx,
    int8_weights,
    select_layers,
    static,
    to_runtime,
)
from lightning_slim.quantization import functional as F
from lightning_slim.quantization.export_call import ExportCall, find_export_call

# the point of these tests: the model is in eval mode when training starts, as from_pretrained returns it
pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")


class Probe(pl.Callback):
    """Counts training steps and keeps every observer's range before and after each validation."""

    def __init__(self):
        self.steps, self.validation_moved = 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1

    def on_validation_start(self, trainer, pl_module):
        self._before = static.observer_state(F.fake_quantized_layers(pl_module))

    def on_validation_end(self, trainer, pl_module):
        after = static.observer_state(F.fake_quantized_layers(pl_module))
        self.validation_moved.append(any(not torch.equal(after[n]["max"], s["max"]) for n, s in self._before.items()))


def fit(module, data, callbacks, steps=3, **kwargs):
    pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        **{"limit_val_batches": 1, "val_check_interval": 2, **kwargs},
    ).fit(module, datamodule=data)


class LlamaWithForward(HFCausalLM):
    """The card's advice before this issue: a forward for the ONNX export."""

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def eval_mode_llama():
    built = build("llama")
    built.module = LlamaWithForward(built.module.model.eval())  # as from_pretrained returns it
    return built


# --- issue 19: observers calibrate whatever mode the user's model is in ---------------------------------
def test_observers_record_the_training_step_of_a_model_left_in_eval_mode():
    """Failed before: at freeze_ranges_after, 'the activation observer has seen no batch yet' (they
    recorded in train mode only; the dry run passed because it ran a copy in train mode)."""
    torch.set_num_threads(1)
    built, probe = eval_mode_llama(), Probe()
    cb = QuantizationAwareTraining(start_after=0, freeze_ranges_after=2, unit="step")
    fit(built.module, built.data, [cb, probe], steps=4)
    assert probe.steps == 4 and cb.report_rows()["phase"] == "ranges_frozen"
    assert not built.module.model.training  # the user's mode is theirs: not switched to train
    assert set(cb.activation_ranges) == set(cb.layers)  # every quantized layer was calibrated
    assert all(bool(r["frozen"]) for r in cb.activation_ranges.values())
    assert len(probe.validation_moved) == 3 and not any(probe.validation_moved)  # sanity check + 2: never moved


def minilm_module():
    model, tokenizer = pretrained.load_minilm()
    assert not model.training  # from_pretrained's mode, left as it is
    data = text.pair_datamodule(tokenizer, max_length=32, batch_size=4, limit={"train": 8, "val": 4, "test": 4})
    return modules.SentenceEncoder(model), data, tokenizer


def test_minilm_left_in_eval_mode_trains_with_qat_and_its_padded_rows_export_with_the_mask():
    """The real all-MiniLM-L6-v2 in a user-style SentenceEncoder (no forward; training_step calls
    self.model twice with input_ids and attention_mask). Failed before: refused ('defines no forward');
    with a forward(x) the export kept input_ids only, and the observers never recorded."""
    torch.set_num_threads(1)
    module, data, tokenizer = minilm_module()
    cb = QuantizationAwareTraining(targets=["Linear", "Embedding"], start_after=0, freeze_ranges_after=2, unit="step")
    fit(module, data, [cb], steps=3, limit_val_batches=0)
    assert set(cb.activation_ranges) == {n for n in cb.layers if "embeddings" not in n}
    int8 = cb.export(copy.deepcopy(module))
    assert int8.input_names == ("input_ids", "attention_mask")
    assert {i.name for i in onnx.load_from_string(int8.onnx_bytes).graph.input} == set(int8.input_names)
    assert {f"model.{n}" for n in ("embeddings.word_embeddings", "encoder.layer.5.output.dense")} <= set(
        int8_weights(int8)
    )

    sentences = [p for pair in text.paragraph_pairs("val")[:3] for p in pair]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any(dim=1).sum() >= 3  # padded rows
    fake = cb.fake_quantized(copy.deepcopy(module)).model
    with torch.no_grad():
        expected = modules.mean_pool(fake(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        unmasked = modules.mean_pool(fake(input_ids=ids).last_hidden_state, mask)
    got = modules.mean_pool(int8(input_ids=ids, attention_mask=mask), mask)
    # the export computes the fake-quantized model's integers; what differs is float noise (ORT's own
    # LayerNorm, GELU, softmax) moving a value that sits at a rounding boundary of its static range by one
    # step (~0.05 here): measured cosine 0.9963 at worst on these 6 sentences, padded or not. Attending to
    # the padding instead moves rows with 7 or more pads to cosine 0.85-0.96: a dropped mask is seen
    cos, unmasked_cos = (got * expected).sum(-1), (unmasked * expected).sum(-1)
    assert cos.min() >= 0.99, cos
    heavily_padded = (mask == 0).sum(1) >= 7
    assert heavily_padded.sum() >= 2 and (unmasked_cos[heavily_padded] < 0.99).all(), unmasked_cos


# --- issue 19: a forward(input_ids, attention_mask) exports both inputs ------------------------------------
class BertWithForward(HFSequenceClassifier):
    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_a_forward_that_takes_the_attention_mask_exports_it_and_padded_rows_match():
    """Failed before: the graph kept input_ids alone, without a word (padded rows differed by up to
    0.03 in probability)."""
    torch.set_num_threads(1)
    built = build("bert")
    module = BertWithForward(built.module.model)
    cb = QuantizationAwareTraining(start_after=1, unit="step")
    fit(module, built.data, [cb], steps=4)
    int8 = cb.export(copy.deepcopy(module))
    assert int8.input_names == ("input_ids", "attention_mask")
    batch = next(iter(built.data.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    padded = (mask == 0).any(dim=1)
    assert padded.any()
    fake = cb.fake_quantized(copy.deepcopy(module))
    with torch.no_grad():
        expected, unmasked = fake(ids, mask), fake(ids)
    got = int8(ids, mask)
    diff, control = (got - expected)[padded].abs().amax(-1), (unmasked - expected)[padded].abs().amax(-1)
    scale = float(expected.abs().max())
    # rows where no activation sits at a rounding tie match to float error (1e-5 of the largest logit);
    # a tie moves one activation by one step (bounded as in the zoo, MAX_DIFF); dropping the mask moves
    # most padded rows beyond that (measured: up to 0.35% of the largest logit; random init, so a few rows
    # hardly depend on their padding), so a graph without the mask fails the first assertion
    assert (diff <= 1e-5 * scale).float().mean() >= 0.9 and diff.max() <= 0.1 * scale
    assert (control > 1e-5 * scale).float().mean() >= 0.5, control


# --- issue 19: a module with no forward exports the submodule its training_step calls ---------------------
class TwoModels(HFCausalLM):
    """A user module with a second child holding parameters: the one to export is ambiguous."""

    def __init__(self, model):
        super().__init__(model)
        self.aux = nn.Linear(4, 4)


def test_no_forward_exports_the_called_submodule_or_asks_for_export_module_before_training():
    torch.set_num_threads(1)
    built, probe = build("llama"), Probe()
    module = TwoModels(built.module.model)
    with pytest.raises(ValueError, match=r"(?s)cannot tell which.*Set export_module='<its path>'"):
        fit(module, built.data, [QuantizationAwareTraining(exclude=["aux"], start_after=0, unit="step"), probe])
    assert probe.steps == 0
    with pytest.raises(ValueError, match=r"\['aux'\] are outside the exported module 'model'"):
        fit(module, built.data, [QuantizationAwareTraining(export_module="model", start_after=0, unit="step"), probe])
    assert probe.steps == 0
    cb = QuantizationAwareTraining(exclude=["aux"], export_module="model", start_after=0, unit="step")
    fit(module, built.data, [cb], steps=2)
    int8 = cb.export(copy.deepcopy(module))
    ids = next(iter(built.data.val_dataloader()))["input_ids"][:4]
    with torch.no_grad():
        fake = cb.fake_quantized(copy.deepcopy(module)).model(input_ids=ids).logits
    assert int8.input_names == ("input_ids", "attention_mask")
    got = int8(input_ids=ids, attention_mask=torch.ones_like(ids))
    # rounding ties flip at most 2% of the token predictions (as AGREEMENT in tests/zoo/test_quantization.py)
    assert (got.argmax(-1) == fake.argmax(-1)).float().mean() >= 0.98


# --- issue 19: transformers' Conv1D is the Linear with a transposed weight that it is ---------------------
def test_gpt2_conv1d_layers_are_int8_in_both_runtimes():
    """Failed before: QAT warned and skipped every Conv1D; the export was 1.03x the fp32 size."""
    torch.set_num_threads(1)
    built = build("gpt2")
    module = built.module.eval()
    batch = next(iter(built.data.train_dataloader()))
    conv1d = [n for n, m in module.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8

    layers = select_layers(module, ["Linear", "Embedding"])
    assert set(conv1d) <= set(layers)
    static_model = copy.deepcopy(module)
    F.prepare_qat(static_model, layers, QuantizationConfig())
    call = find_export_call(static_model, batch).head(4)
    static.calibrate(static_model.model, [dict(zip(call.names, call.tensors))])
    F.set_fake_quant(static_model, True)
    int8 = to_runtime(copy.deepcopy(static_model), call)
    shipped = int8_weights(int8)
    for name in conv1d:  # (out, in) int8 rows of the transposed weight, 7-bit (reduce_range)
        weight = module.get_submodule(name).weight
        assert shipped[name].shape == weight.t().shape and int(shipped[name].abs().max()) == 64, name
    fp32 = fp32_onnx(module.model, ExportCall("", call.names, call.tensors, options=call.options))
    floats = [
        t for t in onnx.load_from_string(int8.onnx_bytes).graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    ]
    assert max(onnx.numpy_helper.to_array(t).size for t in floats) < 32 * 32  # no float weight table left
    # 0.45x measured: at width 32 the per-channel scales, biases, norms and graph weigh as much as the
    # int8 weights; a file with float Conv1D weights (before: 1.03x) is at least 0.8x
    assert int8.artifact_bytes() <= 0.6 * fp32.artifact_bytes(), (int8.artifact_bytes(), fp32.artifact_bytes())
    with torch.no_grad():
        fake = call.call(static_model.model)
    # same integers and scales on both sides; float32 accumulation order over <= 128-term dots (width 32, MLP 128):
    # ~1e-6 relative to the largest value, 1e-4 leaves 100x. A rounding tie would exceed it: none in this 4-row batch
    # under ATEN_CPU_CAPABILITY=default, or avx2 with ONEDNN_MAX_CPU_ISA=AVX2 (measured: at most 0.3% of the bound)
    torch.testing.assert_close(int8(*call.tensors), fake, atol=1e-4 * float(fake.abs().max()), rtol=0)

    ao = copy.deepcopy(module)  # torchao: the Conv1D becomes an nn.Linear of int8 weights
    F.prepare_qat(ao, select_layers(ao), QuantizationConfig(runtime="torchao"))
    F.set_fake_quant(ao, True)
    with torch.no_grad():
        fake = call.call(ao.model)
        real = call.call(convert_to_int8(copy.deepcopy(ao)).model)
    for name in conv1d:
        assert type(ao.get_submodule(name)).__name__ == "TorchaoTransposedLinear"
    # torchao's int8 GEMM rounds the per-token activations as its fake quantizer does (the zoo's 2%)
    assert float((real - fake).abs().max()) <= 0.02 * float(fake.abs().max())
    F.unprepare(ao)
    assert [type(ao.get_submodule(n)).__name__ for n in conv1d] == ["Conv1D"] * 8  # the user's layers back
