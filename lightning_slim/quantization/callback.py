"""QuantizationAwareTraining: the Lightning shell around :mod:`.functional` and :mod:`.export`."""

from __future__ import annotations

from copy import deepcopy
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_slim.core import log
from lightning_slim.core.arguments import config_from
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.clock import Moment
from lightning_slim.core.compose import deployable_copy, whole_module
from lightning_slim.core.contract import Effect, ExportRefused, ExportStage
from lightning_slim.core.interception import InTrainingStep
from lightning_slim.quantization import functional, preflight
from lightning_slim.quantization.backends import Backend
from lightning_slim.quantization.config import QuantizationConfig
from lightning_slim.quantization.export_call import ExportCall, as_export_call, export_fingerprint, find_export_call
from lightning_slim.quantization.guard import DivergenceGuard, bn_freeze_warning
from lightning_slim.quantization.layers import check_layers, select_layers

PHASES = ("float", "fake_quant", "ranges_frozen")
PHASE_SWITCHES = {1: "fake quantization started", 2: "ranges froze"}


class QuantizationAwareTraining(SlimCallback):
    """Train with simulated int8 (or int4) arithmetic, then export a real int8 model.

    Schedule (in ``unit`` = epochs or optimizer steps): float training until ``start_after``,
    then fake quantization of weights and activations; weight scales and activation ranges freeze
    at ``freeze_ranges_after`` and the BatchNorms folded into convolutions stop updating their
    statistics at ``freeze_bn_after`` (None: never). The model's structure changes only during
    ``fit`` (same parameters and state-dict keys); at ``teardown`` the float layers are back, with
    the QAT-trained weights. ``export(model)`` gives the int8 model; ``export_path`` saves it at
    the end of fit (see :func:`~.export.load_int8`).

    ``runtime`` decides what is simulated and shipped. ``"onnxruntime"`` (default): static uint8
    activations (one range per tensor, EMA-observed from the first batch on), int8 per-channel
    weights, an ONNX file ORT runs with its int8 kernels (QLinearConv, QGemm, ...), loadable with
    ``onnxruntime`` alone: the fast path on every x86/ARM CPU, AVX2 included. ``"torchao"``:
    dynamic per-token activations and a ``torch.export`` program on torchao's ``Int8Tensor``
    (``torch._int_mm``): fast only where that kernel is (CUDA, AVX512-VNNI/AMX CPUs).

    Args (the fields of :class:`~.config.QuantizationConfig`; or pass ``config=`` instead):
        targets: layer types (``Linear``, ``Conv1d``, ``Conv2d``, ``Embedding``), module names or
            ``re:<regex>`` over module names. Default: every Linear, Conv1d and Conv2d.
        exclude: the same kinds of entries, removed from the targets (e.g. a sensitive first layer).
        weight_bits: 8 (per-channel) or 4 (per-group, Linear/Embedding only; on onnxruntime weight-only).
        activation_bits: 8 or None (weight-only).
        group_size: group of the int4 weights (on onnxruntime: of every weight-only Linear, a power of 2 >= 16).
        start_after / freeze_ranges_after / freeze_bn_after / unit: the schedule (see above).
        fold_bn: fold a BatchNorm that directly follows a conv into it (simulated during QAT).
        export_path: save the int8 artifact there at the end of fit (rank 0).
        log_error_table: log the per-layer error table once at the end of fit.
        runtime: ``"onnxruntime"`` or ``"torchao"`` (see above): the :class:`~.backends.Backend`.
        reduce_range: onnxruntime only: 7-bit weights ([-64, 64]) so AVX2's u8 x s8 int8 kernels
            never saturate. Only a model served exclusively on VNNI/AMX/ARM-dotprod CPUs may turn it off.
        export_diverged: export a model whose training loss exploded after a phase switch (fake
            quantization starting, ranges or BatchNorm freezing). Default False: such a model is
            warned about when it happens and :meth:`export` refuses it (:class:`~.guard.DivergenceGuard`).
        export_module: path of the submodule the exported graph serves (``"model"``: the Hugging Face
            model a ``training_step`` calls). Default: the LightningModule when it defines ``forward``,
            else its one child with parameters.
        export_inputs: the batch keys that become the graph's inputs, in order (``["input_ids",
            "attention_mask"]``). Default: the dict batch's entries that the exported module's
            ``forward`` names (``labels`` left out), else ``forward(x)`` with the batch's input tensor.
        activation_mode: onnxruntime: ``"static"`` (default; one uint8 range per tensor, observed in
            training and frozen into the file: ORT's fused QGemm / MatMulIntegerToFloat kernels) or
            ``"dynamic"`` (uint8 ranges per token computed at run time, Linear layers only: far closer to
            float on pretrained transformers, whose rows differ in scale by orders). torchao is always
            dynamic. None: the runtime's default.
        config: a :class:`~.config.QuantizationConfig` (or a dict of its fields) holding all of the above.

    Observers record the activations of the user's own training step whatever mode the model is in
    (Hugging Face ``from_pretrained`` returns models in eval mode, and Lightning keeps that mode).

    >>> cb = QuantizationAwareTraining(targets=["Linear", "re:net\\\\.0"], start_after=1, freeze_bn_after=3)
    >>> cb.config.weight_bits, cb.config.unit, cb.config.backend.name
    (8, 'epoch', 'onnxruntime')
    >>> QuantizationAwareTraining(config=QuantizationConfig(runtime="torchao")).config.dynamic
    True
    """

    technique = "quantization"
    effects = frozenset({Effect.SWAP_MODULES})
    export_stage = ExportStage.CONVERT  # after masks are made permanent (pruning)

    def __init__(
        self,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        group_size: int = 32,
        start_after: int = 1,
        freeze_ranges_after: int | None = None,
        freeze_bn_after: int | None = None,
        unit: str = "epoch",
        fold_bn: bool = True,
        export_path: str | None = None,
        log_error_table: bool = True,
        runtime: str = "onnxruntime",
        reduce_range: bool = True,
        export_diverged: bool = False,
        export_module: str | None = None,
        export_inputs: list[str] | None = None,
        activation_mode: str | None = None,
        config: QuantizationConfig | dict | None = None,
    ):
        self.config: QuantizationConfig = config_from(QuantizationConfig, config, locals())
        self.backend: Backend = self.config.backend
        self.guard = DivergenceGuard()
        self._peak_lr, self._lowest_lr = 0.0, float("inf")
        self._bn_frozen = False  # BatchNorm freeze seen (the guard's switch)
        self.layers: list[str] = []
        self.folded: dict[str, str] = {}
        self.ranges: dict[str, dict[str, torch.Tensor]] = {}
        self.activation_ranges: dict[str, dict[str, torch.Tensor]] = {}  # observed in training (the backend's)
        self.skipped: list[str] = []
        self.phase = 0
        self._fastpath: bool | None = None  # the MHA fast path setting before fit
        self._module: pl.LightningModule | None = None
        self._call: ExportCall | None = None  # how the export calls the model (the first training batch's)
        self._call_error: str | None = None
        self.saved_path: str | None = None
        self._exported: tuple[str, torch.nn.Module] | None = None  # the last export, during on_fit_end

    @override
    def sharded_refusal(self, resuming: bool = False) -> str | None:
        # every rank quantizes alike (whole frozen scales; activation ranges and folded BatchNorm statistics
        # averaged across ranks, as under DDP), so rank 0's saved state is every rank's: tests/sharded
        return None

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        functional.check_sharded_folds(pl_module, self.folded)  # after configure_model sharded the model

    @override
    def structure_fixed_from(self) -> Moment | None:
        # measured: removing channels from layers that are already fake-quantized hangs in torch-pruning
        return self.config.fake_quant_from

    # --- before training --------------------------------------------------------------------
    @override
    def validate(self, trainer, pl_module) -> None:
        self.backend.check_packages()
        self.layers = select_layers(pl_module, self.config.targets, self.config.exclude)
        check_layers(pl_module, self.layers, self.config)
        call = self.backend.export_call(trainer, pl_module, self.config)
        if call is not None:
            with torch.random.fork_rng(devices=[]):  # its train-mode pass (dropout) must not move the fit's RNG
                preflight.dry_run(pl_module, self.layers, self.config, call)
        self.skipped = preflight.warn_skipped(pl_module, self.layers)  # after the checks that refuse

    @override
    def prepare_model(self, trainer, pl_module) -> None:
        # before Lightning loads a resumed checkpoint: the keys are the float model's anyway
        with torch.random.fork_rng(devices=[]):  # torchao's layers draw an initialisation: not from the fit's RNG
            self.folded = functional.prepare_qat(pl_module, self.layers, self.config)
        layers = functional.fake_quantized_layers(pl_module)
        self.backend.record_when(layers, InTrainingStep(pl_module))  # the user's step, in whatever mode the model is
        self._module, self.ranges, self.phase, self._call, self._call_error = pl_module, {}, 0, None, None
        self.guard, self._peak_lr, self._lowest_lr, self._bn_frozen = DivergenceGuard(), 0.0, float("inf"), False
        self.activation_ranges = {}
        self._fastpath = torch.backends.mha.get_fastpath_enabled()  # (functional.no_mha_fastpath, held across hooks)
        torch.backends.mha.set_fastpath_enabled(False)  # it would bypass the swapped layers in validation
        rank_zero_info(
            f"QuantizationAwareTraining: {len(self.layers)} layers, {self.config.weight_bits}-bit weights, "
            f"activations {self.config.activation_bits or 'float'}, {len(self.folded)} BatchNorms folded"
        )

    # --- the schedule -----------------------------------------------------------------------------
    def _reached(self, trainer, when: int | None) -> bool:
        return when is not None and Moment(self.config.unit, when).reached(trainer)

    def _apply_schedule(self, trainer, pl_module) -> None:
        functional.set_fake_quant(pl_module, self._reached(trainer, self.config.start_after))
        self.phase = int(self._reached(trainer, self.config.start_after))
        if self._reached(trainer, self.config.freeze_ranges_after):
            if not self.ranges:
                self.ranges = functional.freeze_ranges(pl_module)
            self.phase = 2
        if self._reached(trainer, self.config.freeze_bn_after) and pl_module.training:
            functional.freeze_batchnorm(pl_module)

    def _lr(self, trainer) -> float | None:
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        return float(groups[0]["lr"]) if groups else None

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        phase_before = self.phase
        self._apply_schedule(trainer, pl_module)
        lr = self._lr(trainer)
        self._peak_lr = max(self._peak_lr, lr or 0.0)
        self._lowest_lr = min(self._lowest_lr, lr if lr is not None else float("inf"))
        step = trainer.global_step
        if self.phase != phase_before and self.phase:  # fake quantization started / ranges froze
            self.guard.switch(step, PHASE_SWITCHES[self.phase], lr, self._peak_lr)
        if self._reached(trainer, self.config.freeze_bn_after) and not self._bn_frozen and self.folded:
            self._bn_frozen = True
            self.guard.switch(step, "BatchNorm froze", lr, self._peak_lr)
            message = bn_freeze_warning(step, lr, self._peak_lr, self._lowest_lr)
            if message:
                rank_zero_warn(message)
        if self._call is None and self._call_error is None:
            try:
                self._call = find_export_call(
                    pl_module, batch, self.config.export_module, self.config.export_inputs
                ).head(8)
            except ValueError as err:  # checked before training where a sample exists: not mid-fit
                self._call_error = str(err)
        self.log_scalars(
            pl_module,
            {"phase": float(self.phase), "bn_frozen": float(self._reached(trainer, self.config.freeze_bn_after))},
        )
        bits = {"weight_bits": self.config.weight_bits, "activation_bits": self.config.activation_bits or 32}
        log.log_config(trainer, self.technique, bits)  # fixed for the run: config once, not a metric per step

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            message = self.guard.update(trainer.global_step, float(loss.detach()))
            if message:
                rank_zero_warn(message)
        if trainer.world_size > 1:
            reduce_mean = partial(trainer.strategy.reduce, reduce_op="mean")
            self.backend.sync_ranks(functional.fake_quantized_layers(pl_module), reduce_mean)
            functional.average_batchnorm_statistics(pl_module, reduce_mean)

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        if self._module is not None:
            self._apply_schedule(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        rows = functional.quantization_error(pl_module)
        mean = sum(r["relative_error"] for r in rows) / len(rows)
        self.log_scalars(pl_module, {"weight_error_mean": mean}, on_step=False, on_epoch=True, sync_dist=True)

    # --- after training ---------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        # FSDP2: both are collectives (error sums over the shards, the full state dict): every rank calls them
        rows = functional.quantization_error(pl_module) if self.config.log_error_table else []
        whole = whole_module(trainer, pl_module) if self.config.export_path else None
        if self.config.log_error_table and trainer.is_global_zero:  # once per run: W&B versions every table logged
            cols = ["layer", "type", "weight_bits", "activation_bits", "relative_error", "sqnr_db", "ranges_frozen"]
            log.log_table(
                trainer,
                "slim/quantization/layer_error",
                cols,
                [[r[c] if c != "activation_bits" or r[c] else 32 for c in cols] for r in rows],
            )
        if self.config.export_path and trainer.is_global_zero:
            if self.guard.diverged and not self.config.export_diverged:
                rank_zero_warn(f"QuantizationAwareTraining: the int8 model was not saved: {self._refusal()}")
                return
            if self._call is None:
                rank_zero_warn(
                    f"QuantizationAwareTraining: the int8 model was not saved: {self._call_error or 'no batch seen'}"
                )
                return
            model = deployable_copy(trainer, whole)  # every callback's export in order, this one last
            self.saved_path = str(self.backend.save(model, self._call, self.config.export_path))
            log.log_artifact(trainer, self.saved_path, name="int8-model", metadata=self.report_rows())

    @override
    def restore_model(self, pl_module) -> None:
        """The float layers again, with the QAT-trained weights (and the ranges kept for export)."""
        self.activation_ranges = self.backend.observed_ranges(functional.fake_quantized_layers(pl_module))
        functional.unprepare(pl_module)
        self._module, self._exported = None, None
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    def fake_quantized(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (a copy of the trained module; modified in place) as validation saw it during
        QAT: fake-quantized layers with the trained ranges, in eval mode."""
        if not functional.fake_quantized_layers(model):
            layers = self.layers or select_layers(model, self.config.targets, self.config.exclude)
            functional.prepare_qat(model, layers, self.config)
            functional.set_ranges(model, self.ranges)
            self.backend.load_observed_ranges(functional.fake_quantized_layers(model), self.activation_ranges)
        functional.set_fake_quant(model, True)
        return model.eval()

    @override
    def export(self, model: torch.nn.Module, example=None) -> torch.nn.Module:
        """The real int8 model of ``model`` (a copy of the trained module; modified in place): an
        ``OrtModel`` (onnxruntime; it takes the graph's inputs, e.g. ``input_ids`` and
        ``attention_mask``) or torchao int8 modules. ``example``: what the ONNX trace calls (a CPU
        batch of ``forward(x)``'s input, a dict of named inputs or an ``ExportCall``; default: the
        first training batch's call, else ``example_input_array``).
        A model whose loss exploded after a phase switch is refused (``export_diverged=True`` allows it)."""
        if self.guard.diverged and not self.config.export_diverged:
            raise ExportRefused(self._refusal())
        if example is None:
            example = self._call if self._call is not None else getattr(model, "example_input_array", None)
        model = self.fake_quantized(model)
        call = as_export_call(example) if example is not None else None
        if not self.backend.reuse_exports or call is None:
            return self.backend.convert(model, call)
        # at the end of fit the same trained model is exported for export_path and for the report: once
        key = export_fingerprint(model, call)
        if self._exported is None or self._exported[0] != key:
            int8 = self.backend.convert(model, call)
            self._exported = (key, int8)
            return int8
        return deepcopy(self._exported[1])

    @override
    def float_baselines(
        self, model: torch.nn.Module, example: torch.Tensor, runtime: bool = True
    ) -> dict[str, torch.nn.Module]:
        functional.unprepare(model)  # the trained float layers (same parameters), not their fake-quantized form
        model.eval()
        in_runtime = self.backend.float_in_runtime(model, self._call or as_export_call(example)) if runtime else None
        return {"fp32_eager": model} | ({"fp32_runtime": in_runtime} if in_runtime is not None else {})

    def _refusal(self) -> str:
        d = self.guard.diverged
        return (
            f"training diverged at step {d['step']} (loss {d['loss']:.4g}) after {d['after_what']} at step "
            f"{d['after_step']}; pass export_diverged=True to export it anyway"
        )

    @override
    def report_rows(self) -> dict[str, Any]:
        if not self.layers:
            return {}
        return {
            "layers": len(self.layers),
            "runtime": self.config.runtime,
            "weight_bits": self.config.weight_bits,
            "activation_bits": self.config.activation_bits or "float",
            "phase": PHASES[self.phase],
            "bn_folded": len(self.folded),
            "skipped": ", ".join(self.skipped),
            "diverged": self._refusal() if self.guard.diverged else "",
            "saved": self.saved_path or "",
        }

    # --- checkpointing ----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._module is not None:
            self.activation_ranges = self.backend.observed_ranges(functional.fake_quantized_layers(self._module))
        return {
            "phase": self.phase,
            "layers": list(self.layers),
            "ranges": {n: {k: v.detach().cpu() for k, v in r.items()} for n, r in self.ranges.items()},
            "activation_ranges": self.activation_ranges,
            "guard": self.guard.state_dict(),
            "peak_lr": self._peak_lr,
            "lowest_lr": self._lowest_lr,
            "bn_frozen": self._bn_frozen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("layers", [])
        if self.layers and saved and saved != self.layers:
            raise ValueError(f"the checkpoint quantized layers {saved}, this callback targets {self.layers}")
        self.phase = int(state_dict.get("phase", 0))
        self.ranges = dict(state_dict.get("ranges", {}))
        self.activation_ranges = dict(state_dict.get("activation_ranges", {}))
        self.guard.load_state_dict(state_dict.get("guard", {}))
        self._peak_lr = float(state_dict.get("peak_lr", 0.0))
        self._lowest_lr = float(state_dict.get("lowest_lr", float("inf")))
        self._bn_frozen = bool(state_dict.get("bn_frozen", False))
        if self._module is not None:
            functional.set_ranges(self._module, self.ranges)
            self.backend.load_observed_ranges(functional.fake_quantized_layers(self._module), self.activation_ranges)
