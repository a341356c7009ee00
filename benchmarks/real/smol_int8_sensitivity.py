"""Which of SmolLM2's Linear layers does int8 hurt? A diagnostic for the ``smol_int8`` arm (not an arm:
plain PyTorch, no training): the numerics the callback exports (per-channel symmetric int8 weights,
per-token uint8 activations, ``quantization.dynamic``) simulated on one kind of Linear at a time, the
rest float, on the validation windows the arm chooses on; then every Linear, and every Linear but
the output head, on the test split.

    python benchmarks/real/smol_int8_sensitivity.py   # about 10 minutes on 2 quiet cores
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder, as the driver has it

from lightning_slim.quantization.dynamic import fake_quantize_rows
from real.common import lm_loss, smol, windows

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
OUT = Path(__file__).resolve().parents[1] / "results" / "smol_int8_sensitivity.json"


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` on its per-output-channel symmetric int8 grid."""
    scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


class Simulated:
    """Switches the simulated int8 of each kind of Linear of ``model`` on and off (the head untied
    while it is quantized, so the float input embedding stays as it is)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.float_weights = {n: m.weight.detach().clone() for n, m in self.linears.items()}
        self.on: set[str] = set()
        for name, m in self.linears.items():
            m.register_forward_pre_hook(lambda mod, args, name=name: self._inputs(name, args))

    def _inputs(self, name: str, args: tuple):
        return (fake_quantize_rows(args[0]),) if name in self.on else None

    def quantize(self, kinds) -> None:
        self.on = {n for n in self.linears if n.rsplit(".", 1)[-1] in kinds}
        for name, m in self.linears.items():
            weight = int8_rows(self.float_weights[name]) if name in self.on else self.float_weights[name]
            m.weight = nn.Parameter(weight, requires_grad=False)
        if "lm_head" not in kinds:  # tied again, as loaded
            self.model.lm_head.weight = self.model.model.embed_tokens.weight


def main() -> dict:
    started = time.time()
    torch.manual_seed(0)
    model = smol()
    sim = Simulated(model)
    val, test = windows("val")[:16], windows("test")
    out: dict = {"val_windows": len(val), "test_windows": len(test), "val": {}, "test": {}}
    for label, kinds in [("fp32", ()), *[(k, (k,)) for k in KINDS], ("all", KINDS)]:
        sim.quantize(kinds)
        out["val"][label] = lm_loss(model, val)
        print("val", label, round(out["val"][label], 4), flush=True)
    for label, kinds in (("fp32", ()), ("all", KINDS), ("all_but_head", KINDS[:-1])):
        sim.quantize(kinds)
        out["test"][label] = lm_loss(model, test)
        print("test", label, round(out["test"][label], 4), flush=True)
    out["wall_s"] = round(time.time() - started, 1)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
