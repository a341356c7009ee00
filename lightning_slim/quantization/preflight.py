"""QAT's checks before training: what the export will trace, and a dry run of
the whole flow on a CPU copy, so a model the flow cannot handle fails before the first step."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_slim.quantization import functional
from lightning_slim.quantization.config import QuantizationConfig
from lightning_slim.quantization.export_call import ExportCall, as_export_call, find_export_call
from lightning_slim.quantization.layers import skipped_layers


def sampled_export_call(
    trainer: pl.Trainer, pl_module: pl.LightningModule, export_module: str | None, export_inputs: list[str] | None
) -> ExportCall | None:
    """What an export will trace, found on a sample of the training data's first items
    (``example_input_array`` for a module that defines ``forward(x)`` and names nothing else); None
    when no sample can be had without iterating the loader (then the first batch decides)."""
    from lightning_slim.batches import sample_batch
    from lightning_slim.core.lightning_glue import train_loader
    from lightning_slim.modules import overrides_forward

    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor) and overrides_forward(pl_module) and not (export_module or export_inputs):
        return as_export_call(example.cpu())
    batch = sample_batch(train_loader(trainer))
    if batch is None:
        return None
    return find_export_call(pl_module, batch, export_module, export_inputs).head(2)


class UncalledLayersError(ValueError):
    """Targeted layers the exported module never calls (they would be missing from the int8 file)."""


def dry_run(pl_module: nn.Module, layers: list[str], config: QuantizationConfig, call: ExportCall) -> None:
    """Fake-quantize and convert a CPU copy, called as the export will call it: a targeted layer the
    exported module never calls, or a model the flow cannot handle, fails here and not after training."""
    model = copy.deepcopy(pl_module).cpu().eval()
    functional.prepare_qat(model, layers, config)
    target = model.get_submodule(call.module) if call.module else model
    config.backend.observe(target, call)
    functional.set_fake_quant(model, True)
    called = set()
    found = functional.fake_quantized_layers(model)
    hooks = [m.register_forward_hook(lambda mod, *_a, n=n: called.add(n)) for n, m in found.items()]
    try:
        with torch.no_grad(), functional.no_mha_fastpath():
            call.call(target)
            for h in hooks:
                h.remove()
            unused = [n for n in found if n not in called]
            if unused:
                outside = [n for n in unused if call.module and not n.startswith(call.module + ".")]
                raise UncalledLayersError(
                    f"targeted layers {outside} are outside the exported module {call.module!r}: the int8 file "
                    "would not contain them; add them to `exclude`, or set export_module to the module that "
                    "holds every targeted layer"
                    if outside
                    else f"targeted layers {unused} are never called by forward (is their weight used directly, "
                    "as in nn.MultiheadAttention or a positional embedding?); add them to `exclude`"
                )
            call.call(config.backend.deployable_in_torch(target))  # the export's modules, in torch
    except UncalledLayersError:
        raise
    except Exception as err:
        raise ValueError(
            f"QuantizationAwareTraining cannot handle {type(pl_module).__name__} (layers {layers}): "
            f"{type(err).__name__}: {err}"
        ) from err


def warn_skipped(model: nn.Module, layers: list[str]) -> list[str]:
    """Linears by kind that stay float (``nn.MultiheadAttention``'s projections), warned about once; the
    callback lists them in its report."""
    skipped = list(skipped_layers(model, layers))
    if skipped:
        rank_zero_warn(
            f"QuantizationAwareTraining: the projections of nn.MultiheadAttention {skipped} (in_proj_weight, "
            "out_proj) stay float: their weights are read directly by the attention kernel, not through a layer "
            "QAT can swap (listed in report_rows()['skipped'])"
        )
    return skipped
