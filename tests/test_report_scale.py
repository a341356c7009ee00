"""The report on language models at the scale users bring (issue 19): it times at a batch that fits
the task (not 256 rows of full-vocabulary logits), and it times a deployed ONNX file whose forward
takes keyword inputs. A random-weight Hugging Face Llama in the user-style ``CausalLM`` module for
the fast cells; one ``slow_real`` cell on SmolLM2-135M."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_slim import CompressionReport, QuantizationAwareTraining
from lightning_slim.batches import example_count
from lightning_slim.demos.modules import CausalLM
from lightning_slim.reporting.latency import (
    OUTPUT_BUDGET_BYTES,
    latency_rows,
    measured_call,
    time_models,
    unused_inputs,
)
from lightning_slim.reporting.measure import Artifact, as_call, measure, output_bytes


class RandomTokens(Dataset):
    """Rows of random token ids, every position real and labelled (the model shifts the labels)."""

    def __init__(self, vocab: int, seq: int, rows: int = 8):
        self.ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def llama(vocab: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


class ServedLM(CausalLM):
    """``CausalLM`` with the ``forward(input_ids, attention_mask)`` an ONNX export asks for."""

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def fit(tmp_path, module, report, data, *callbacks, epochs=1, batch_size=2):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[*callbacks, report],
    )
    trainer.fit(module, DataLoader(data, batch_size=batch_size), DataLoader(data, batch_size=batch_size))
    return trainer


def test_one_row_of_a_causal_lm_returns_its_full_logits():
    module = CausalLM(llama(vocab=4096))
    row = {k: v.unsqueeze(0) for k, v in RandomTokens(4096, 128)[0].items()}
    call = measured_call(module, row, None, requested=None, timed=False)
    assert set(call[1]) == {"input_ids", "attention_mask", "use_cache"}  # labels left out: no loss is computed
    # the unit of the automatic batch: 128 positions x 4,096 float32 logits, and nothing else (no cache)
    assert output_bytes(module, call) == 128 * 4096 * 4


def test_the_automatic_latency_batch_keeps_one_calls_output_within_the_budget():
    wide = nn.Linear(8, 2**20)  # 4 MiB of float32 output per row
    call = ((torch.randn(100, 8),), {})
    assert latency_rows(wide, call, available=100, requested=None) == OUTPUT_BUDGET_BYTES // 2**22 == 64
    assert latency_rows(wide, call, available=10, requested=None) == 10  # the training batch, when it fits
    assert latency_rows(wide, call, available=100, requested=300) == 300  # a user's choice is used as given


def test_a_language_model_is_timed_at_batch_1_and_its_training_batch_not_256_rows(tmp_path):
    pl.seed_everything(0)
    vocab, seq = 4096, 128
    module = CausalLM(llama(vocab), warmup=1)
    report = CompressionReport(generate_tokens=4)  # the default latency batch
    fit(tmp_path, module, report, RandomTokens(vocab, seq), batch_size=2)
    example = report.example_input
    assert example_count(as_call(example)) == 2  # the training batch (256 rows: 512 MiB of logits a call)
    assert output_bytes(module, example) == 2 * seq * vocab * 4 <= OUTPUT_BUDGET_BYTES
    for side in (report.before, report.after):
        assert side["latency_batch"] == 2 and side["latency_ms"] > 0 and side["latency_ms_batch_1"] > 0
        assert side["latency_iqr_ms"] >= 0 and side["generate_tokens"] == 4
    # side by side: both models timed in the same interleaved rounds
    assert report.before["latency_samples"] == report.after["latency_samples"] >= 5


def test_the_report_times_an_onnx_file_of_a_module_whose_forward_takes_keywords(tmp_path):
    pl.seed_everything(0)
    module = ServedLM(llama(vocab=512), warmup=1)
    report = CompressionReport(generate_tokens=4, output_path=str(tmp_path / "r.json"))
    fit(
        tmp_path,
        module,
        report,
        RandomTokens(512, 32),
        QuantizationAwareTraining(start_after=1),
        epochs=2,
        batch_size=4,
    )
    deployed = report.exported_model
    assert isinstance(deployed, Artifact)  # the ONNX file, served by ONNX Runtime
    assert set(as_call(report.example_input)[1]) >= {"input_ids", "attention_mask"}  # a keyword call
    # was a latency_error row ("unexpected keyword argument 'input_ids'")
    assert "latency_error" not in report.after and report.after["latency_ms"] > 0
    assert report.after["latency_ms_batch_1"] > 0 and report.after["latency_batch"] == 4
    for batch in (1, 4):
        row = report.serving[f"batch_{batch}"]
        assert {"fp32_eager_ms", "fp32_runtime_ms", "deployed_ms"} <= set(row) and row["deployed_ms"] > 0


class KeywordFile(nn.Module):
    """A deployed file (an ONNX Runtime session) whose forward takes ``input_ids`` and
    ``attention_mask`` by name, as an export that keeps the mask does."""

    def __init__(self, path):
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.size = path.stat().st_size

    def artifact_bytes(self) -> int:
        return self.size

    def forward(self, input_ids, attention_mask):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class MaskedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 8)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids) * attention_mask.unsqueeze(-1)


def masked_embedding_onnx(model: MaskedEmbedding, path):
    """The same computation as an ONNX graph with two named inputs, built with onnx's own helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(model.embed.weight.detach().numpy(), "weight")
    axes = numpy_helper.from_array(torch.tensor([-1]).numpy(), "axes")
    nodes = [
        helper.make_node("Gather", ["weight", "input_ids"], ["vectors"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["vectors", "mask3"], ["out"]),
    ]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "T"]) for n in ("input_ids", "attention_mask")]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "T", 8])
    graph = helper.make_graph(nodes, "masked_embedding", ids, [out], initializer=[weight, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_file_taking_keyword_inputs_is_timed_with_the_same_call_as_the_model(tmp_path):
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    model = MaskedEmbedding().eval()
    masked_embedding_onnx(model, tmp_path / "masked.onnx")
    deployed = KeywordFile(tmp_path / "masked.onnx")
    with torch.no_grad():  # the file is the model
        # exact on any CPU: a gather times a 0/1 mask involves no sums, so no rounding differs
        torch.testing.assert_close(deployed(ids, mask), model(ids, mask), rtol=0, atol=0)
    call = ((), {"input_ids": ids, "attention_mask": mask, "use_cache": False})  # as built for an HF model
    out = measure(deployed, call, warmup=1, repeats=3)
    assert out["size_bytes"] == (tmp_path / "masked.onnx").stat().st_size and "params" not in out
    assert "latency_error" not in out and out["latency_ms"] > 0
    times = time_models({"model": model, "deployed": deployed}, call)
    assert times["deployed"]["latency_samples"] == times["model"]["latency_samples"] >= 5
    # a form that takes only the token ids is timed on them, and the report says what it left out
    assert unused_inputs(deployed, call) == [] and "latency_note" not in times["deployed"]
    ids_only = nn.Embedding(64, 8)  # forward(input): the token ids, positionally
    assert unused_inputs(ids_only, call) == ["attention_mask"]
    note = time_models({"ids_only": ids_only}, call)["ids_only"]["latency_note"]
    assert note == "its forward does not take attention_mask: timed without"


@pytest.mark.slow_real
def test_smollm2_report_measures_at_a_batch_that_fits_in_time_and_memory():
    from lightning_slim.demos import pretrained, text

    model, tokenizer = pretrained.load_smollm2()
    module = CausalLM(model)
    windows = text.lm_windows(tokenizer, "val", 128)[:4]
    batch = {"input_ids": windows, "attention_mask": torch.ones_like(windows), "labels": windows}
    vocab = model.config.vocab_size  # 49,152
    # 25 MB of logits a row: the training batch of 4 (100 MB) fits the budget; 256 rows would be 6.4 GB
    assert latency_rows(module, ((), batch), available=4, requested=None) == 4
    short = {k: v[:, :32] for k, v in batch.items()}  # timed on 32 tokens: cheap, same code path
    _reset_peak_rss()
    start, rss = time.perf_counter(), _peak_rss()
    example = measured_call(module, short, None, requested=None)
    assert output_bytes(module, example) == 4 * 32 * vocab * 4
    times = time_models({"model": module}, example, example[1]["input_ids"][:1], 4, ("model",))["model"]
    wall, grown = time.perf_counter() - start, _peak_rss() - rss
    assert times["latency_ms"] > 0 and times["latency_batch"] == 4 and times["generate_tokens"] == 4
    # a forward of 4 x 32 tokens holds activations of a few hundred MB at most beside the 540 MB model
    # already loaded; the old default's logits alone (256 x 128 x 49,152 float32) are 6.4 GB
    assert grown < 1.5 * 2**30, grown
    assert wall < 300, wall  # minutes at most on one loaded core (a forward here is well under 2 s)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS (VmHWM)
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
