"""QAT's checks before training: the runtime's packages, what the export will trace, and a dry run of
the whole flow on a CPU copy, so a model the flow cannot handle fails before the first step."""

from __future__ import annotations

import copy
import importlib.util

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_slim.quantization import functional as qat
from lightning_slim.quantization.export_call import ExportCall, as_export_call, find_export_call

# what each runtime imports to export and serve, and the extra of lightning-slim that installs it
RUNTIME_PACKAGES = {
    "onnxruntime": (("onnx", "onnxscript", "onnxruntime"), "onnx"),
    "torchao": (("torchao",), "torchao"),
}


def check_export_arguments(export_module: str | None, export_inputs: list[str] | None) -> None:
    if export_module is not None and not isinstance(export_module, str):
        raise ValueError(f"export_module={export_module!r} must be a module path such as 'model', or None")
    if export_inputs is not None and (
        isinstance(export_inputs, str) or not export_inputs or not all(isinstance(n, str) and n for n in export_inputs)
    ):
        raise ValueError(
            f"export_inputs={export_inputs!r} must be a non-empty list of batch keys such as "
            "['input_ids', 'attention_mask'], or None"
        )


def check_runtime_packages(runtime: str) -> None:
    """Raise before training when a package the runtime needs to export or serve is missing (the
    export runs at the end of fit, after every epoch has been paid for)."""
    packages, extra = RUNTIME_PACKAGES[runtime]
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ModuleNotFoundError(
            f"QuantizationAwareTraining(runtime={runtime!r}) needs {', '.join(missing)} to export the int8 model "
            f'at the end of training; install them with: pip install "lightning-slim[{extra}]"'
        )


def export_call(trainer, pl_module, export_module: str | None, export_inputs: list[str] | None) -> ExportCall | None:
    """What the onnxruntime export will trace, found on a sample of the training data's first items
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


def dry_run(pl_module: nn.Module, layers: list[str], spec: qat.QuantSpec, fold_bn: bool, call: ExportCall) -> None:
    """Fake-quantize and convert a CPU copy, called as the export will call it: a targeted layer the
    exported module never calls, or a model the flow cannot handle, fails here and not after training."""
    model = copy.deepcopy(pl_module).cpu().eval()
    qat.prepare_qat(model, layers, spec, fold_bn)
    target = model.get_submodule(call.module) if call.module else model
    if spec.static:
        with torch.no_grad():
            call.call(target.train())  # the observers' first range (outside a Trainer: train mode records)
            target.eval()
    qat.set_fake_quant(model, True)
    called = set()
    found = qat.fake_quantized_layers(model)
    hooks = [m.register_forward_hook(lambda mod, *_a, n=n: called.add(n)) for n, m in found.items()]
    try:
        with torch.no_grad(), qat.no_mha_fastpath():
            call.call(target)
            for h in hooks:
                h.remove()
            unused = [n for n in found if n not in called]
            if unused:
                outside = [n for n in unused if call.module and not n.startswith(call.module + ".")]
                raise ValueError(
                    f"targeted layers {outside} are outside the exported module {call.module!r}: the int8 file "
                    "would not contain them; add them to `exclude`, or set export_module to the module that "
                    "holds every targeted layer"
                    if outside
                    else f"targeted layers {unused} are never called by forward (is their weight used directly, "
                    "as in nn.MultiheadAttention or a positional embedding?); add them to `exclude`"
                )
            if spec.static:
                from lightning_slim.quantization.onnx_export import deploy_module

                call.call(deploy_module(target))  # the export's modules, in torch
            else:
                from lightning_slim.quantization.export import to_runtime

                call.call(to_runtime(target))
    except Exception as err:
        if isinstance(err, ValueError) and ("never called" in str(err) or "outside the exported" in str(err)):
            raise
        raise ValueError(
            f"QuantizationAwareTraining cannot handle {type(pl_module).__name__} (layers {layers}): "
            f"{type(err).__name__}: {err}"
        ) from err


def warn_skipped(model: nn.Module, layers: list[str]) -> list[str]:
    """Linears by kind that stay float (``nn.MultiheadAttention``'s projections), warned about once; the
    callback lists them in its report."""
    skipped = list(qat.skipped_layers(model, layers))
    if skipped:
        rank_zero_warn(
            f"QuantizationAwareTraining: the projections of nn.MultiheadAttention {skipped} (in_proj_weight, "
            "out_proj) stay float: their weights are read directly by the attention kernel, not through a layer "
            "QAT can swap (listed in report_rows()['skipped'])"
        )
    return skipped
