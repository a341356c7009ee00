"""QAT (static int8 fake quantization, the onnxruntime path) under FSDP2 against the same fit under DDP:
activation ranges are averaged across ranks in both, so DDP, not one process, sees the same ranges."""

from __future__ import annotations

import torch

from .test_pruning import WEIGHT_TOLERANCE


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


def test_int8_export_equals_a_one_process_export_of_the_same_weights(evidence):
    # export_path under FSDP2: built on rank 0 from the full state dict; beside it, the callback's export of
    # a fresh unsharded module holding the same gathered weights (run_fsdp2.export_evidence)
    export = torch.load(evidence.folder / "cnn_qat_fsdp_export.pt", weights_only=True)
    assert set(export["shipped_int8"]) == {"net.0", "net.3", "net.7"}  # every conv and linear ships int8
    for name, weight in export["shipped_int8"].items():
        assert weight.dtype == torch.int8 and int(weight.abs().max()) > 0, name
        assert torch.equal(weight, export["single_int8"][name]), name
    # exact: the same weights, ranges and converter in one process on one CPU make the same graph, which
    # ONNX Runtime runs deterministically; a gathered weight off by one bit could flip an int8 rounding
    assert torch.equal(export["shipped"], export["single"])
    assert export["shipped"].abs().max() > 0
