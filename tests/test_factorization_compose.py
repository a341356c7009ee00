"""LowRankFactorization with the other techniques: factorize then quantize (the factors are what QAT
fake-quantizes and what the int8 ONNX file holds), all five techniques in one Trainer, and a mid-fit
replacement under real two-process DDP (every rank keeps training the same factors).

``strategy="ddp"`` re-launches the running script for rank 1, which inside pytest would re-run pytest;
so this file is also the DDP script, run in a subprocess with a clean environment."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from test_factorization import trainer

ROOT = Path(__file__).resolve().parents[1]
CONVS_AND_CLASSIFIER = ["re:net\\.[24]", "Linear"]  # the k=3 convolutions and the classifier
FACTORS = ["net.2.down", "net.2.up", "net.4.down", "net.4.up", "net.7.down", "net.7.up"]


def test_factorize_then_quantize_exports_the_factors_as_int8(tmp_path):
    from cases import small_data, small_model

    from lightning_slim.factorization import LowRankFactorization
    from lightning_slim.quantization import QuantizationAwareTraining, fused_ops
    from lightning_slim.quantization.export import int8_weights

    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_after=1)
    model = small_model()
    trainer(tmp_path, [LowRankFactorization(rank=0.5, targets=CONVS_AND_CLASSIFIER), qat], max_epochs=3).fit(
        model, datamodule=small_data()
    )
    assert qat.layers == ["net.0", *FACTORS]  # QAT took the factors (set up after the replacement)
    x = torch.randn(256, 1, 40, generator=torch.Generator().manual_seed(0))
    fake = qat.fake_quantized(copy.deepcopy(model))  # the model validation saw
    int8 = qat.export(copy.deepcopy(model), x[:4])
    shipped = int8_weights(int8)
    assert set(shipped) == {"net.0", *FACTORS}
    for name in FACTORS:  # every factor ships int8 weights, 7-bit (reduce_range)
        assert shipped[name].dtype == torch.int8 and 0 < int(shipped[name].abs().max()) <= 64, name
        weight = model.get_submodule(name).weight
        assert shipped[name].shape == weight.reshape(weight.shape[0], -1).shape, name  # as rows x fan_in
    ops = fused_ops(int8.onnx_bytes)  # what ONNX Runtime runs: each factor is an integer kernel
    assert ops.get("QLinearConv") == 5 and ops.get("QGemm") == 2, ops  # net.0 + 2 x 2 conv factors; 2 Linear
    assert not {"Conv", "Gemm", "MatMul"} & set(ops), ops  # no float layer left
    with torch.no_grad():
        expected, got = fake(x), int8(x)
    # as for any QAT export: equal up to rounding ties (a value within float error of a rounding boundary
    # moves one int8 step, then propagates), so nearly all outputs agree closely and the classes agree
    diff = (expected - got).abs()
    # a tie moves one activation one int8 step and propagates (<= 5% of the largest logit); elsewhere float accumulation
    # order only (~1e-5 for these widths), so fewer than 5% of outputs differ by > 1e-4, and ties flip at most 3% of the
    # classes; on any CPU
    assert float((diff > 1e-4).float().mean()) < 0.05 and float(diff.max()) < 0.05 * float(expected.abs().max())
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() >= 0.97


def test_all_five_techniques_in_one_trainer(tmp_path):
    from cases import small_data
    from test_pipeline import RecordingCNN, teacher

    from lightning_slim.demos.pipeline import compression_callbacks, find
    from lightning_slim.factorization import FactorizedLayer, LowRankFactorization
    from lightning_slim.quantization.export import int8_weights

    pl.seed_everything(0)
    student = RecordingCNN(channels=16)
    callbacks = [
        LowRankFactorization(rank=0.5, targets=CONVS_AND_CLASSIFIER),
        *compression_callbacks(
            teacher(), 3, keep=0.5, sparsity=0.5, report_path=str(tmp_path / "r.json"), measure_latency=False
        ),
    ]
    fit = trainer(tmp_path, callbacks, max_epochs=3, log_every_n_steps=1)  # KD logs on logging steps
    fit.fit(student, datamodule=small_data(with_index=True, batch_size=200))
    factorization, pruning, report = find(fit, "factorization"), find(fit, "pruning"), find(fit, "report")
    assert all(isinstance(student.get_submodule(p), FactorizedLayer) for p in factorization.ranks)
    # selection: half of every super-batch (the first call is distillation's check before training: the
    # user's step on a 2-example sample batch)
    assert student.step_sizes == [2] + [100] * 12
    assert torch.isfinite(fit.callback_metrics["slim/distillation/kd_loss"])
    # pruning masked the factors (it was set up after the replacement) and they stay zero where masked
    assert set(FACTORS) <= set(pruning.masks) and abs(pruning.report_rows()["sparsity"] - 0.5) < 0.01
    shipped = int8_weights(report.exported_model)
    for name in FACTORS:
        mask = pruning.masks[name].bool()
        assert not student.get_submodule(name).weight[~mask].any(), name
        assert shipped[name].dtype == torch.int8 and not shipped[name][~mask.reshape(mask.shape[0], -1)].any()
    assert set(report.techniques) == {"factorization", "selection", "distillation", "pruning", "quantization"}
    rows = report.techniques["factorization"]
    assert rows["layers_factorized"] == 3 and rows["params_before"] - rows["params_after"] == (
        report.before["params"] - report.after["params"]
    )  # the report's parameter counts (dense baseline, trained float weights) see exactly the saving
    assert abs(report.after["export_accuracy"] - report.after["accuracy"]) < 0.02  # int8 ~ fake-quantized
    assert json.loads((tmp_path / "r.json").read_text())["techniques"]["factorization"]["ranks"] == factorization.ranks


# --- two-process DDP -------------------------------------------------------------------------------------
def _worker(out: Path) -> None:
    from cases import small_data, small_model
    from torch.nn.parallel import DistributedDataParallel

    from lightning_slim.factorization import LowRankFactorization

    class Probe(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # collectives are safe here (not in on_train_end)
            mine = torch.tensor([sum(float(p.detach().double().abs().sum()) for p in pl_module.parameters())])
            wrapped = trainer.strategy.model
            record = {
                "gathered": trainer.strategy.all_gather(mine).flatten().tolist(),
                "shapes": {k: list(v.shape) for k, v in pl_module.state_dict().items()},
                "ddp_wraps_module_params": isinstance(wrapped, DistributedDataParallel)
                and {id(p) for p in wrapped.parameters()} == {id(p) for p in pl_module.parameters()},
                "optimizer_has_module_params": {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
                == {id(p) for p in pl_module.parameters()},
            }
            (out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json").write_text(json.dumps(record))

    pl.seed_everything(0)
    callbacks = [LowRankFactorization(rank=0.5, targets=CONVS_AND_CLASSIFIER, at=2, unit="step"), Probe()]
    trainer(out, callbacks, max_epochs=2, devices=2, strategy="ddp").fit(small_model(), datamodule=small_data())


def test_mid_fit_replacement_under_two_process_ddp(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    }
    env.setdefault("LIGHTNING_SLIM_CACHE", str(ROOT / ".slim_cache"))
    env["PYTHONWARNINGS"] = "ignore"
    # this checkout's package and test cases, in the script and in the rank Lightning launches from it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert len(records) == 4, sorted(records)
    for epoch in range(2):  # 4 steps an epoch per rank: replaced at step 2, inside epoch 0
        r0, r1 = records[f"rank0_epoch{epoch}"], records[f"rank1_epoch{epoch}"]
        # both ranks hold the same factors (the all-gathered parameter sums agree) and keep training them:
        # the re-wrapped DDP and the rebuilt optimizer hold exactly the module's parameters
        assert r0["gathered"][0] == r0["gathered"][1] and r0["gathered"] == r1["gathered"], epoch
        assert r0["shapes"] == r1["shapes"] and r0["shapes"]["net.7.down.weight"] == [5, 80]
        assert r0["ddp_wraps_module_params"] and r0["optimizer_has_module_params"], epoch
    assert records["rank0_epoch0"]["gathered"] != records["rank0_epoch1"]["gathered"]  # epoch 1 trained them


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
