"""One launch of ``run_fsdp2.py`` for the whole folder: every scenario's two-process fit and its
one-process reference, read back by many small tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


class Evidence:
    def __init__(self, folder: Path):
        self.folder = folder
        self.record = json.loads((folder / "evidence.json").read_text())

    def ranks(self, scenario: str) -> list[dict]:
        return self.record["fsdp"][scenario]

    def single(self, scenario: str) -> dict:
        return self.record["single"][scenario]

    def tensors(self, scenario: str, run: str) -> dict:
        return torch.load(self.folder / f"{scenario}_{run}.pt", weights_only=True)


@pytest.fixture(scope="session")
def evidence(tmp_path_factory) -> Evidence:
    folder = tmp_path_factory.mktemp("fsdp2")
    # the launcher re-runs the script for rank 1 from these variables' absence; inside pytest it would re-run pytest
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    script = Path(__file__).with_name("run_fsdp2.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(folder)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Evidence(folder)
