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
