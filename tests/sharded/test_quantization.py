"""QAT under FSDP2 against the same fit under DDP: activation ranges (and the statistics of the BatchNorms
folded into convolutions) are averaged across ranks in both, so DDP, not one process, sees the same ranges.
``cnn_qat``: static int8 (onnxruntime); ``cnn_bn_qat`` / ``cnn_bn_qat_torchao``: BatchNorms folded, weight
scales and ranges frozen at step 4, BatchNorm statistics at step 8, both runtimes.

torchao against one process: its activations are quantized per token, so a rank's forward is that of one
process on the same rows; yet the two-process run ends about 5e-3 from the one-process run. Measured in one
process (TinyLlama, 6 steps, fake quantization from step 2): splitting each batch into the two halves the
ranks see and adding their gradients moves the final weights by 4.9e-3, and scaling the initial weights by
(1 + 1e-7 noise) by 8.3e-3. A float32 rounding difference flips some rounding to the int8 grid, which changes
a gradient by a grid step: QAT amplifies the summation order, and only DDP (the same order) is a fair reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lightning_slim.quantization.config import QuantizationConfig
from lightning_slim.quantization.functional import check_sharded_folds, prepare_qat

from .test_pruning import WEIGHT_TOLERANCE

BN_SCENARIOS = ["cnn_bn_qat", "cnn_bn_qat_torchao"]  # run_fsdp2.TinyCNNBN
WHOLE_CHANNELS = {"net.0": 8, "net.3": 11, "net.8": 10}  # its quantized layers; rank 0 holds 4, 6, 5 rows


def test_weights_equal_the_ddp_run(evidence):
    sharded, ddp = evidence.tensors("cnn_qat", "fsdp")["weights"], evidence.tensors("cnn_qat", "ddp")["weights"]
    for key, value in ddp.items():
        # FSDP2 and DDP both add the two ranks' gradients and halve them: WEIGHT_TOLERANCE (test_pruning.py)
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)


def test_fake_quantization_ran_and_its_error_is_the_whole_models(evidence):
    sharded, ddp = evidence.record["fsdp"]["cnn_qat"], evidence.record["ddp"]["cnn_qat"]
    for mine, theirs in zip(sharded, ddp):
        assert mine["phase"] == theirs["phase"] == 1  # fake quantization active at the end
        # per-channel scales of a rank's rows are those of the whole weight's rows, and the error sums
        # are reduced over the shards: the sharded number is the unsharded one, to float summation order
        assert 0 < mine["weight_error_mean"] < 0.05
        assert abs(mine["weight_error_mean"] - theirs["weight_error_mean"]) < 1e-9


def test_fake_quantization_changes_what_is_trained(evidence):
    qat, plain = evidence.tensors("cnn_qat", "fsdp")["weights"], evidence.tensors("cnn_global", "single")["weights"]
    assert max(float((qat[k] - plain[k]).abs().max()) for k in qat if "bias" in k) > 100 * WEIGHT_TOLERANCE


@pytest.mark.parametrize(
    "scenario, layers",
    [
        ("cnn_qat", {"net.0", "net.3", "net.7"}),
        ("cnn_bn_qat", set(WHOLE_CHANNELS)),
        ("cnn_bn_qat_torchao", {f"target.{name[4:]}" for name in WHOLE_CHANNELS}),  # torchao: the served module's names
    ],
)
def test_int8_export_equals_a_one_process_export_of_the_same_weights(evidence, scenario, layers):
    # export_path under FSDP2: built on rank 0 from the full state dict; beside it, the callback's export of
    # a fresh unsharded module holding the same gathered weights (run_fsdp2.export_evidence)
    export = torch.load(evidence.folder / f"{scenario}_fsdp_export.pt", weights_only=True)
    # a loaded torch.export program has no Int8Conv class left: a conv's int8 GEMM keeps its ".linear" name
    shipped = {name.removesuffix(".linear"): weight for name, weight in export["shipped_int8"].items()}
    assert set(shipped) == set(export["single_int8"]) == layers  # every conv and linear ships int8
    for name, weight in shipped.items():
        assert weight.dtype == torch.int8 and int(weight.abs().max()) > 0, name
        assert torch.equal(weight, export["single_int8"][name]), name
    # exact: the same weights, ranges and converter in one process on one CPU make the same graph, which
    # ONNX Runtime runs deterministically; a gathered weight off by one bit could flip an int8 rounding
    assert torch.equal(export["shipped"], export["single"])
    assert export["shipped"].abs().max() > 0


@pytest.mark.parametrize("scenario", BN_SCENARIOS)
def test_folded_batchnorms_and_frozen_ranges_equal_the_ddp_run(evidence, scenario):
    sharded, ddp = evidence.tensors(scenario, "fsdp")["weights"], evidence.tensors(scenario, "ddp")["weights"]
    assert any("running_var" in key for key in ddp)  # the BatchNorms' statistics are compared too
    for key, value in ddp.items():
        # as test_weights_equal_the_ddp_run: the same per-rank batches and gradient sums (measured: bit-equal)
        torch.testing.assert_close(sharded[key].float(), value.float(), rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    for mine, theirs in zip(evidence.ranks(scenario), evidence.record["ddp"][scenario]):
        for what in ("activation_ranges", "frozen_scales", "bn_statistics"):
            # ranges are extremes of activations, scales of weights, that differ by WEIGHT_TOLERANCE at most:
            # 1e-4 relative bounds that on any CPU, far below what one SGD step (lr 0.1) changes
            torch.testing.assert_close(mine["qat"][what], theirs["qat"][what], rtol=1e-4, atol=1e-6, msg=what)


@pytest.mark.parametrize("scenario", BN_SCENARIOS)
def test_every_rank_quantizes_alike(evidence, scenario):
    first, second = (rank["qat"] for rank in evidence.ranks(scenario))
    assert first["phase"] == 2  # weight scales and activation ranges frozen
    # exact: the ranges and BatchNorm statistics are averaged by one all-reduce (a + b is b + a on both
    # ranks), and the frozen scales come from the same gathered weight
    assert first == second
    assert set(first["frozen_scales"]) == set(WHOLE_CHANNELS)
    assert set(first["activation_ranges"]) == (set() if scenario.endswith("torchao") else set(WHOLE_CHANNELS))
    assert first["bn_training"] == {"net.1": False, "net.4": False}  # frozen at step 8 on every rank


@pytest.mark.parametrize("scenario", BN_SCENARIOS)
def test_frozen_scales_are_the_whole_weights_rows(evidence, scenario):
    # one scale per output channel of the whole layer (not of a rank's block of rows), as DDP's unsharded run has
    scales = evidence.ranks(scenario)[0]["qat"]["frozen_scales"]
    assert {name: len(scale) for name, scale in scales.items()} == WHOLE_CHANNELS
    assert all(s > 0 for scale in scales.values() for s in scale)


def test_the_folded_batchnorms_trained(evidence):
    # what test_every_rank_quantizes_alike compares is not the initial (0, 1): the statistics followed the batches
    stats = evidence.ranks("cnn_bn_qat")[0]["qat"]["bn_statistics"]["net.1"]
    means, variances = torch.tensor(stats[:8]), torch.tensor(stats[8:])
    assert means.abs().max() > 1e-3 and (variances - 1).abs().max() > 1e-3  # trained away from (0, 1)


@pytest.mark.parametrize("scenario", BN_SCENARIOS)
def test_resumed_qat_ends_where_the_uninterrupted_fit_ends(evidence, scenario):
    whole, resumed = evidence.tensors(scenario, "fsdp")["weights"], evidence.tensors(scenario, "resumed")["weights"]
    # the same two processes, the same order of every float operation: bit-identical (as test_resume.py)
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
    for mine, uninterrupted in zip(evidence.record["resumed"][scenario], evidence.ranks(scenario)):
        assert mine["stopped_at"] == 6 and mine["steps"] == 12, mine  # stopped after epoch 1 of 2
        assert mine["qat"] == uninterrupted["qat"]  # ranges, frozen scales, BatchNorm statistics, phase


@pytest.mark.parametrize("scenario", BN_SCENARIOS)
def test_the_state_lightning_saves_from_rank_0_is_every_ranks(evidence, scenario):
    # Lightning saves callback state from rank 0 only; rank 1 resumes from it, which is right only if its
    # own state at the stop was the same (ranges frozen at step 4, BatchNorms still training until step 8)
    first, second = (rank["qat_at_stop"] for rank in evidence.record["resumed"][scenario])
    assert first == second
    assert first["phase"] == 2 and first["bn_training"] == {"net.1": True, "net.4": True}


def test_a_folded_batchnorm_sharded_on_its_own_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    folded = prepare_qat(model, ["0", "2"], QuantizationConfig())
    check_sharded_folds(model, folded)  # unsharded, or sharded with an enclosing module (TinyCNNBN): accepted
    # what fully_shard(model[3]) does to the module's class (torch.distributed.fsdp's class swap)
    model[3].__class__ = type("FSDPBatchNorm2d", (FSDPModule, nn.BatchNorm2d), {})
    with pytest.raises(ValueError, match=r"BatchNorms \['3'\].*fold_bn=False"):
        check_sharded_folds(model, folded)


def test_qat_on_the_transformer_lm_equals_ddp_and_quantizes(evidence):
    """A transformers Llama sharded per decoder layer, fake-quantized with per-token dynamic activations:
    the FSDP2 fit ends where the DDP fit ends, and fake quantization changed what was trained."""
    sharded, ddp = evidence.tensors("llama_qat", "fsdp")["weights"], evidence.tensors("llama_qat", "ddp")["weights"]
    for key, value in ddp.items():
        # FSDP2 and DDP both add the two ranks' gradients and halve them: WEIGHT_TOLERANCE (test_pruning.py)
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    assert all(r["phase"] == 1 and 0 < r["weight_error_mean"] < 0.05 for r in evidence.ranks("llama_qat"))
    plain = evidence.tensors("llama_plain", "fsdp")["weights"]
    # 8-bit rounding over 4 fake-quantized steps moves the weights by 3.3e-4 (measured): 33x the bound of
    # a sharded-vs-DDP difference, so a fit that never fake-quantized could not pass
    assert max(float((sharded[k] - plain[k]).abs().max()) for k in plain) > 10 * WEIGHT_TOLERANCE
