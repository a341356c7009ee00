"""The control for ``smol_int8``'s QAT: the same fine-tuning in float32, with no callback.

``smol_int8`` fine-tunes SmolLM2 on the in-domain training split while it fake-quantizes (12 steps,
learning rate 2e-5, batch 4 x 128 tokens, seed 0) and its int8 export ends below the pretrained
float model's perplexity. This arm trains the same steps on the same batches in float32 and
measures the test split, so the int8 cost after fine-tuning is ``qat`` against this, not against
the pretrained model.
"""

from __future__ import annotations

import copy

import torch

from lightning_slim.demos import modules
from real.common import lm_data, lm_loss, one_thread, ppl, smol, trainer, windows
from real.smol_int8 import QAT_LR, QAT_STEPS, smoke_cut


def run(args) -> dict:
    with one_thread():  # as smol_int8
        torch.manual_seed(0)
        fp32 = smol()
        test = windows("test")
        steps = 2 if args.smoke else QAT_STEPS
        if args.smoke:
            smoke_cut(fp32)
            test = test[:2]
        module = modules.CausalLM(copy.deepcopy(fp32), lr=QAT_LR, warmup=max(1, steps // 5))
        limit = {"train": 8, "val": 2, "test": 2} if args.smoke else None
        trainer(steps).fit(module, datamodule=lm_data(batch_size=4, seed=0, limit=limit))
        loss = lm_loss(module.model.eval(), test)
        return {
            "fp32_pretrained_loss": round(lm_loss(fp32, test), 4),
            "fp32_ft_loss": round(loss, 4),
            "fp32_ft_ppl": round(ppl(loss), 3),
            "steps": steps,
            "lr": QAT_LR,
            "batch": "4 x 128 tokens",
            "seed": 0,
            "threads": 1,
        }
