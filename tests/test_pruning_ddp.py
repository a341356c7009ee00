"""Two-process DDP (``strategy="ddp"``, gloo on CPU): masks identical on every rank, and a
structurally pruned model re-wrapped so every rank keeps training the same smaller network.

``strategy="ddp"`` re-launches the running script for rank 1, which inside pytest would re-run
pytest; so this file is also the script, run in a subprocess with a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(out: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(ROOT / "tests"))
    from cases import small_data, small_model

    from lightning_slim.pruning import IterativeMagnitudePruning
    from lightning_slim.pruning.functional import mask_checksum

    class Probe(pl.Callback):
        def __init__(self, pruning, name):
            self.pruning, self.name = pruning, name

        def on_train_epoch_end(self, trainer, pl_module):  # collectives are safe here (not in on_train_end)
            mine = torch.tensor(
                [
                    mask_checksum(self.pruning.masks) % 2**31,
                    sum(float(p.detach().double().abs().sum()) for p in pl_module.parameters()),
                ],
                dtype=torch.float64,
            )
            gathered = trainer.strategy.all_gather(mine)
            wrapped = trainer.strategy.model
            record = {
                "rank": trainer.global_rank,
                "epoch": trainer.current_epoch,
                "round": self.pruning.round,
                "gathered": gathered.tolist(),
                "mine": mine.tolist(),
                "shapes": {k: list(v.shape) for k, v in pl_module.state_dict().items()},
                "ddp_wraps_module_params": isinstance(wrapped, DistributedDataParallel)
                and {id(p) for p in wrapped.parameters()} == {id(p) for p in pl_module.parameters()},
                "optimizer_has_module_params": {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
                == {id(p) for p in pl_module.parameters()},
            }
            with open(out / f"{self.name}_rank{trainer.global_rank}_epoch{trainer.current_epoch}.json", "w") as f:
                json.dump(record, f)

    for name, cb in [
        (
            "masks",
            IterativeMagnitudePruning(
                {"kind": "imp", "rounds": 1, "rate": 0.5, "every": 1}, rewind="step", rewind_step=2
            ),
        ),
        (
            "structured",
            IterativeMagnitudePruning(
                {"kind": "one_shot", "sparsity": 0.5, "at": 1}, pattern="channels", targets=["Conv1d"], scope="layer"
            ),
        ),
    ]:
        pl.seed_everything(0)
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[cb, Probe(cb, name)],
        )
        trainer.fit(small_model(), datamodule=small_data())


def test_ddp_two_processes_identical_masks_and_rewrapped_structure(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    }
    env.setdefault("LIGHTNING_SLIM_CACHE", str(ROOT / ".slim_cache"))
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert len(records) == 8, sorted(records)
    for name in ("masks", "structured"):
        for epoch in range(2):
            r0, r1 = records[f"{name}_rank0_epoch{epoch}"], records[f"{name}_rank1_epoch{epoch}"]
            # each rank saw both ranks' checksums (all-gather inside the ranks) and they agree
            assert r0["gathered"] == r1["gathered"] and r0["gathered"][0] == r0["gathered"][1], (name, epoch)
            assert r0["mine"] == r1["mine"] and r0["shapes"] == r1["shapes"]
            assert r0["ddp_wraps_module_params"] and r0["optimizer_has_module_params"], (name, epoch)
    assert records["masks_rank0_epoch1"]["round"] == 1 and records["masks_rank1_epoch1"]["round"] == 1
    assert records["masks_rank0_epoch0"]["mine"][0] != records["masks_rank0_epoch1"]["mine"][0]
    assert records["structured_rank1_epoch1"]["shapes"]["net.0.weight"] == [8, 1, 5]
    assert records["structured_rank0_epoch0"]["shapes"]["net.0.weight"] == [16, 1, 5]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
