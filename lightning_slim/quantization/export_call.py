"""Which module the ONNX export traces, and with which inputs: the graph's signature.

A user's LightningModule often defines no ``forward`` (``training_step`` calls ``self.model(...)``
with the batch's keys), or a ``forward`` that takes several tensors (``input_ids`` and
``attention_mask``). The export traces what serving will call: by default the module that
``training_step`` runs (:func:`~lightning_slim.modules.forward_target`: the LightningModule when it
defines ``forward``, else its one child with parameters) with the batch entries that module's
``forward`` names (:func:`~lightning_slim.modules.call_arguments`, ``labels`` left out). Both can be
named instead (``export_module="model"``, ``export_inputs=["input_ids", "attention_mask"]``). Every
tensor becomes a graph input of the same name, so a padding mask reaches the exported graph.

>>> import torch
>>> from torch import nn
>>> class Encoder(nn.Module):
...     def forward(self, input_ids, attention_mask=None, labels=None):
...         return input_ids * attention_mask
>>> class User(nn.Module):  # no forward: training_step calls self.model(...)
...     def __init__(self):
...         super().__init__()
...         self.model = Encoder()
...         self.head = nn.Linear(2, 2)
>>> batch = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3), "labels": None}
>>> call = find_export_call(User(), batch, export_module="model")
>>> call.module, call.names, call.rows
('model', ('input_ids', 'attention_mask'), 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_slim.batches import BatchFormatError, batch_inputs
from lightning_slim.modules import call_arguments, forward_target, named_arguments, output_tensor

OWNER = "QuantizationAwareTraining"


@dataclass(frozen=True)
class ExportCall:
    """How the exported graph is called: ``module`` (its path in the LightningModule, ``""`` = the
    module itself) receives ``tensors`` as the inputs ``names`` (keywords, or positionally when
    ``positional``) plus the constant ``options`` (``use_cache=False``)."""

    module: str
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    positional: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.tensors[0].shape[0])

    def head(self, rows: int) -> ExportCall:
        """The first ``rows`` examples, detached, on the CPU (what the tracer and the checks need)."""
        n = self.rows
        tensors = tuple(
            t[:rows].detach().cpu() if t.dim() and t.shape[0] == n else t.detach().cpu() for t in self.tensors
        )
        return ExportCall(self.module, self.names, tensors, self.positional, dict(self.options))

    def call(self, target: nn.Module, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``target`` run on these inputs (or on ``tensors`` in their place); its output tensor."""
        tensors = self.tensors if tensors is None else tensors
        if self.positional:
            return output_tensor(target(*tensors, **self.options))
        return output_tensor(target(**dict(zip(self.names, tensors)), **self.options))


def as_export_call(example: ExportCall | torch.Tensor | Mapping[str, torch.Tensor]) -> ExportCall:
    """An :class:`ExportCall` of the model itself from a plain example: one tensor (``forward(x)``)
    or a dict of named tensors (keyword inputs)."""
    if isinstance(example, ExportCall):
        return example
    if isinstance(example, torch.Tensor):
        return ExportCall("", ("input",), (example,), positional=True)
    if isinstance(example, Mapping) and example and all(isinstance(v, torch.Tensor) for v in example.values()):
        return ExportCall("", tuple(example), tuple(example.values()))
    raise ValueError(
        f"an export example must be a tensor, a dict of named tensors or an ExportCall, not {type(example).__name__}"
    )


def find_export_call(
    pl_module: nn.Module, batch: Any, export_module: str | None = None, export_inputs: Sequence[str] | None = None
) -> ExportCall:
    """The :class:`ExportCall` for a training ``batch`` (see the module docstring); a clear error,
    naming ``export_module`` / ``export_inputs``, when it cannot be found."""
    try:
        path, target = forward_target(pl_module, export_module, owner=f"{OWNER}(export_module=...)")
    except ValueError as err:
        raise ValueError(
            f"{OWNER}(runtime='onnxruntime') exports the module your training_step calls as an ONNX graph and "
            f"cannot tell which: {err}. Set export_module='<its path>' (or define forward on the LightningModule)"
        ) from err
    options = {"use_cache": False} if "use_cache" in named_arguments(target) else {}
    if export_inputs is not None:
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"{OWNER}(export_inputs={list(export_inputs)}) names entries of a dict batch, but the training "
                f"batches are {type(batch).__name__}; leave export_inputs unset to trace forward(x) with the inputs"
            )
        missing = [n for n in export_inputs if not isinstance(batch.get(n), torch.Tensor)]
        if missing:
            raise ValueError(
                f"{OWNER}(export_inputs={list(export_inputs)}): {missing} are not tensors of the training batch, "
                f"whose keys are {sorted(batch)}"
            )
        return ExportCall(path, tuple(export_inputs), tuple(batch[n] for n in export_inputs), options=options)
    try:
        args, kwargs = call_arguments(target, batch)
    except BatchFormatError as err:
        raise ValueError(
            f"{OWNER}(runtime='onnxruntime') traces {type(target).__name__}.forward with the training batch and "
            f"cannot find its inputs: {err}; set export_inputs to the batch keys forward takes, or "
            "example_input_array on the module"
        ) from err
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    if tensors:
        options.update({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        return ExportCall(path, tuple(tensors), tuple(tensors.values()), options=options)
    x = args[0] if args else batch_inputs(batch)
    first = next(iter(_parameter_names(target)), "input")
    return ExportCall(path, (first,), (x,), positional=True, options=options)


def _parameter_names(module: nn.Module) -> list[str]:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


class GraphCall(nn.Module):
    """``call.module`` of ``root`` as a module of positional tensors, in ``call.names`` order, that
    returns one tensor: what ``torch.onnx.export`` traces (graph inputs named as the batch keys)."""

    TARGET = "target"  # the attribute holding the traced module: its parameters are named target.<path>

    def __init__(self, root: nn.Module, call: ExportCall):
        super().__init__()
        self.target = root.get_submodule(call.module) if call.module else root
        self.call = ExportCall(call.module, call.names, (), call.positional, dict(call.options))

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.call.call(self.target, tensors)


def two_rows(call: ExportCall) -> ExportCall:
    """``call`` with at least two examples: the exporters specialise a batch of one to a constant."""
    if call.rows >= 2:
        return call
    n = call.rows
    tensors = tuple(t.repeat(2, *([1] * (t.dim() - 1))) if t.dim() and t.shape[0] == n else t for t in call.tensors)
    return dataclasses.replace(call, tensors=tensors)


def dynamic_shapes(call: ExportCall, sequence: bool) -> tuple[dict, ...]:
    """A dynamic batch dimension for every input; with ``sequence``, one dynamic length shared by
    every input as long as the token ids (``input_ids`` and its ``attention_mask``)."""
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq")
    ids = next((t for t in call.tensors if not t.is_floating_point() and t.dim() >= 2), None)
    length = ids.shape[1] if ids is not None else None
    dims = []
    for t in call.tensors:
        d = {0: batch} if t.dim() and t.shape[0] == call.rows else {}
        if sequence and t.dim() >= 2 and t.shape[1] == length:
            d[1] = seq
        dims.append(d)
    return tuple(dims)


def export_fingerprint(model: nn.Module, call: ExportCall) -> str:
    """A digest of everything an export of the fake-quantized ``model`` depends on: its tensors, its
    layers' activation ranges and frozen weight scales (plain attributes, not in the state dict) and
    the call (module, names, example tensors). Equal digests give the same file."""
    import hashlib

    from lightning_slim.quantization.functional import fake_quantized_layers
    from lightning_slim.quantization.static import observer_state

    digest = hashlib.blake2b(repr((call.module, call.names, call.positional, call.options)).encode())
    layers = fake_quantized_layers(model)
    ranges = {f"{n}.range.{k}": v for n, s in observer_state(layers).items() for k, v in s.items()}
    scales = {f"{n}.scale": m.weight_fake_quantizer.scale for n, m in layers.items()}
    named = {**model.state_dict(), **ranges, **scales, **{f"call.{i}": t for i, t in enumerate(call.tensors)}}
    for name, t in named.items():
        digest.update(name.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            digest.update(repr((t.dtype, tuple(t.shape))).encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(repr(t).encode())
    return digest.hexdigest()
