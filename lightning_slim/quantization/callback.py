"""QuantizationAwareTraining: the Lightning shell around :mod:`.functional` and :mod:`.export`."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_slim import log
from lightning_slim.arguments import check_int
from lightning_slim.batches import BatchFormatError, batch_inputs
from lightning_slim.callback import SlimCallback
from lightning_slim.clock import Moment, check_unit
from lightning_slim.contract import ExportRefused, ExportStage
from lightning_slim.quantization import functional as qat
from lightning_slim.quantization import static
from lightning_slim.quantization.export import save_int8, to_runtime

PHASES = ("float", "fake_quant", "ranges_frozen")
PHASE_SWITCHES = {1: "fake quantization started", 2: "ranges froze"}
BN_FREEZE_LR_FRACTION = 0.1  # measured: frozen at 26% of OneCycle's peak, a BN ResNet diverged in 3 steps


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

    Args:
        targets: layer types (``Linear``, ``Conv1d``, ``Conv2d``, ``Embedding``), module names or
            ``re:<regex>`` over module names. Default: every Linear, Conv1d and Conv2d.
        exclude: the same kinds of entries, removed from the targets (e.g. a sensitive first layer).
        weight_bits: 8 (per-channel) or 4 (per-group, Linear/Embedding only; on onnxruntime weight-only).
        activation_bits: 8 or None (weight-only).
        group_size: group of the int4 weights (on onnxruntime: of every weight-only Linear, a power of 2 >= 16).
        fold_bn: fold a BatchNorm that directly follows a conv into it (simulated during QAT).
        runtime: ``"onnxruntime"`` or ``"torchao"`` (see above).
        reduce_range: onnxruntime only: 7-bit weights ([-64, 64]) so AVX2's u8 x s8 int8 kernels
            never saturate. Only a model served exclusively on VNNI/AMX/ARM-dotprod CPUs may turn it off.
        export_diverged: export a model whose training loss exploded after a phase switch (fake
            quantization starting, ranges or BatchNorm freezing). Default False: such a model is
            warned about when it happens and :meth:`export` refuses it (:class:`~.functional.DivergenceGuard`).

    >>> cb = QuantizationAwareTraining(targets=["Linear", "re:net\\\\.0"], start_after=1, freeze_bn_after=3)
    >>> cb.spec.weight_bits, cb.unit
    (8, 'epoch')
    """

    technique = "quantization"
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
    ):
        self.spec = qat.QuantSpec(weight_bits, activation_bits, group_size, runtime, reduce_range)
        check_unit(unit)
        check_int("start_after", start_after)
        for name, value in (("freeze_ranges_after", freeze_ranges_after), ("freeze_bn_after", freeze_bn_after)):
            check_int(name, value, allow_none=True)
            if value is not None and value < start_after:
                raise ValueError(
                    f"{name}={value} comes before start_after={start_after}; freezing happens "
                    "after fake quantization starts"
                )
        if freeze_ranges_after is not None and weight_bits == 4 and runtime == "torchao":
            raise ValueError(
                "freeze_ranges_after with runtime='torchao' is supported for weight_bits=8 only "
                "(torchao recomputes int4 group scales at export)"
            )
        if not isinstance(export_diverged, bool):
            raise ValueError(f"export_diverged={export_diverged!r} must be true or false")
        self.export_diverged = export_diverged
        self.guard = qat.DivergenceGuard()
        self._peak_lr, self._lowest_lr = 0.0, float("inf")
        self._bn_frozen = False  # BatchNorm freeze seen (the guard's switch)
        self.targets = list(targets) if targets is not None else list(qat.DEFAULT_TARGETS)
        self.exclude = list(exclude or [])
        self.start_after, self.freeze_ranges_after, self.freeze_bn_after = (
            start_after,
            freeze_ranges_after,
            freeze_bn_after,
        )
        self.unit, self.fold_bn, self.export_path, self.log_error_table = unit, fold_bn, export_path, log_error_table
        self.layers: list[str] = []
        self.folded: dict[str, str] = {}
        self.ranges: dict[str, dict[str, torch.Tensor]] = {}
        self.activation_ranges: dict[str, dict[str, torch.Tensor]] = {}  # static observers (onnxruntime)
        self.skipped: list[str] = []
        self.phase = 0
        self._fastpath: bool | None = None  # the MHA fast path setting before fit
        self._module: pl.LightningModule | None = None
        self._example: torch.Tensor | None = None
        self.saved_path: str | None = None

    @override
    def structure_fixed_from(self) -> Moment | None:
        # measured: removing channels from layers that are already fake-quantized hangs in torch-pruning
        return Moment(self.unit, self.start_after)

    # --- before training --------------------------------------------------------------------
    @override
    def validate(self, trainer, pl_module) -> None:
        self.layers = qat.select_layers(pl_module, self.targets, self.exclude)
        qat.check_layers(pl_module, self.layers, self.spec)
        example = getattr(pl_module, "example_input_array", None)
        if not isinstance(example, torch.Tensor) and self.spec.static:
            example = self._sample_input(trainer, pl_module)
        if isinstance(example, torch.Tensor):
            with torch.random.fork_rng(devices=[]):  # its train-mode pass (dropout) must not move the fit's RNG
                self._dry_run(pl_module, example)
        # after the checks that refuse: no warnings about a configuration that cannot run
        skipped = qat.skipped_layers(pl_module, self.layers)
        self.skipped = list(skipped)
        attention = [n for n, why in skipped.items() if why.startswith("nn.MultiheadAttention")]
        if attention:
            rank_zero_warn(
                f"QuantizationAwareTraining: the projections of nn.MultiheadAttention {attention} "
                "(in_proj_weight, out_proj) stay float: their weights are read directly by the attention "
                "kernel, not through a layer QAT can swap (listed in report_rows()['skipped'])"
            )
        conv1d = [n for n in skipped if n not in attention]
        if conv1d:
            rank_zero_warn(
                f"QuantizationAwareTraining: transformers Conv1D layers {conv1d} stay float: QAT has no "
                "fake-quantized form of Conv1D (an (in, out) Linear) (listed in report_rows()['skipped'])"
            )

    def _sample_input(self, trainer, pl_module) -> torch.Tensor | None:
        """The input tensor the onnxruntime export will trace ``forward`` with, from a sample of the
        training data: a module the export cannot call this way is refused now, not after training."""
        from lightning_slim.batches import sample_batch
        from lightning_slim.lightning_glue import train_loader
        from lightning_slim.modules import overrides_forward

        batch = sample_batch(train_loader(trainer))
        if batch is None:
            return None  # no sample without iterating the loader: checked on the first batch's export
        if not overrides_forward(pl_module):
            raise ValueError(
                f"QuantizationAwareTraining(runtime='onnxruntime') exports forward(x) of the module as an "
                f"ONNX graph, and {type(pl_module).__name__} defines no forward(): define "
                "forward(x) (e.g. returning self.model(x).logits), or use runtime='torchao' (int8 modules "
                "swapped in place, called as your training_step calls them)"
            )
        try:
            return batch_inputs(batch).cpu()
        except BatchFormatError as err:
            raise ValueError(
                f"QuantizationAwareTraining(runtime='onnxruntime') traces forward(x) with the batch's input "
                f"tensor and cannot find it: {err}; set example_input_array on the module, or use "
                "runtime='torchao'"
            ) from err

    def _dry_run(self, pl_module, example: torch.Tensor) -> None:
        """Fake-quantize and convert a CPU copy on ``example_input_array``: a model the flow cannot
        handle, or a targeted layer whose forward never runs, fails here and not mid-training."""
        model = copy.deepcopy(pl_module).cpu().eval()
        qat.prepare_qat(model, self.layers, self.spec, self.fold_bn)
        if self.spec.static:
            with torch.no_grad():
                model.train()(example)  # the observers' first range
                model.eval()
        qat.set_fake_quant(model, True)
        called = set()
        layers = qat.fake_quantized_layers(model)
        hooks = [m.register_forward_hook(lambda mod, *_a, n=n: called.add(n)) for n, m in layers.items()]
        try:
            with torch.no_grad(), qat.no_mha_fastpath():
                model(example)
                unused = [n for n in layers if n not in called]
                if unused:
                    raise ValueError(
                        f"targeted layers {unused} are never called by forward (is their weight used "
                        "directly, as in nn.MultiheadAttention or a positional embedding?); add them "
                        "to `exclude`"
                    )
                for h in hooks:
                    h.remove()
                if self.spec.static:
                    from lightning_slim.quantization.onnx_export import deploy_module

                    deploy_module(model)(example)  # the export's modules, in torch
                else:
                    to_runtime(model)(example)
        except Exception as err:
            if isinstance(err, ValueError) and "never called" in str(err):
                raise
            raise ValueError(
                f"QuantizationAwareTraining cannot handle {type(pl_module).__name__} (layers "
                f"{self.layers}): {type(err).__name__}: {err}"
            ) from err

    @override
    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)  # baseline for the report, validate()
        if stage != "fit":
            return
        # before Lightning loads a resumed checkpoint: the keys are the float model's anyway
        with torch.random.fork_rng(devices=[]):  # torchao's layers draw an initialisation: not from the fit's RNG
            self.folded = qat.prepare_qat(pl_module, self.layers, self.spec, self.fold_bn)
        self._module, self.ranges, self.phase, self._example = pl_module, {}, 0, None
        self.guard, self._peak_lr, self._lowest_lr, self._bn_frozen = qat.DivergenceGuard(), 0.0, float("inf"), False
        self.activation_ranges = {}
        self._fastpath = torch.backends.mha.get_fastpath_enabled()  # (qat.no_mha_fastpath, held across hooks)
        torch.backends.mha.set_fastpath_enabled(False)  # it would bypass the swapped layers in validation
        rank_zero_info(
            f"QuantizationAwareTraining: {len(self.layers)} layers, {self.spec.weight_bits}-bit weights, "
            f"activations {self.spec.activation_bits or 'float'}, {len(self.folded)} BatchNorms folded"
        )

    # --- the schedule -----------------------------------------------------------------------------
    def _now(self, trainer) -> int:
        return trainer.current_epoch if self.unit == "epoch" else trainer.global_step

    def _reached(self, trainer, when: int | None) -> bool:
        return when is not None and self._now(trainer) >= when

    def _apply_schedule(self, trainer, pl_module) -> None:
        qat.set_fake_quant(pl_module, self._reached(trainer, self.start_after))
        self.phase = int(self._reached(trainer, self.start_after))
        if self._reached(trainer, self.freeze_ranges_after):
            if not self.ranges:
                self.ranges = qat.freeze_ranges(pl_module)
            self.phase = 2
        if self._reached(trainer, self.freeze_bn_after) and pl_module.training:
            qat.freeze_batchnorm(pl_module)

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
        if self._reached(trainer, self.freeze_bn_after) and not self._bn_frozen and self.folded:
            self._bn_frozen = True
            self.guard.switch(step, "BatchNorm froze", lr, self._peak_lr)
            scheduled = self._lowest_lr < self._peak_lr  # a constant lr has no better moment to wait for
            if scheduled and lr is not None and lr > BN_FREEZE_LR_FRACTION * self._peak_lr:
                rank_zero_warn(
                    f"QuantizationAwareTraining: BatchNorm freezes at step {step} with lr={lr:.3g}, "
                    f"{lr / self._peak_lr:.0%} of the peak {self._peak_lr:.3g}: frozen at a high learning rate, "
                    "a BN ResNet diverged within a few steps (a plain fit too); freeze_bn_after belongs where "
                    f"the lr has decayed below {BN_FREEZE_LR_FRACTION:.0%} of its peak, or leave it None"
                )
        if self._example is None:
            try:
                self._example = batch_inputs(batch)[:8].detach().cpu()
            except BatchFormatError:
                self._example = torch.empty(0)
        self.log_scalars(
            pl_module, {"phase": float(self.phase), "bn_frozen": float(self._reached(trainer, self.freeze_bn_after))}
        )
        bits = {"weight_bits": self.spec.weight_bits, "activation_bits": self.spec.activation_bits or 32}
        log.log_config(trainer, self.technique, bits)  # fixed for the run: config once, not a metric per step

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            message = self.guard.update(trainer.global_step, float(loss.detach()))
            if message:
                rank_zero_warn(message)
        if trainer.world_size > 1 and self.spec.static:  # every rank keeps the same activation ranges
            static.average_observers(
                qat.fake_quantized_layers(pl_module), lambda t: trainer.strategy.reduce(t, reduce_op="mean")
            )

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        if self._module is not None:
            self._apply_schedule(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        rows = qat.quantization_error(pl_module)
        mean = sum(r["relative_error"] for r in rows) / len(rows)
        self.log_scalars(pl_module, {"weight_error_mean": mean}, on_step=False, on_epoch=True, sync_dist=True)

    # --- after training ---------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        if self.log_error_table and trainer.is_global_zero:  # once per run: W&B versions every table logged
            rows = qat.quantization_error(pl_module)
            cols = ["layer", "type", "weight_bits", "activation_bits", "relative_error", "sqnr_db", "ranges_frozen"]
            log.log_table(
                trainer,
                "slim/quantization/layer_error",
                cols,
                [[r[c] if c != "activation_bits" or r[c] else 32 for c in cols] for r in rows],
            )
        if self.export_path and trainer.is_global_zero:
            if self.guard.diverged and not self.export_diverged:
                rank_zero_warn(f"QuantizationAwareTraining: the int8 model was not saved: {self._refusal()}")
                return
            if self._example is None or not self._example.numel():
                rank_zero_warn("QuantizationAwareTraining: no example input seen; the int8 model was not saved")
                return
            from lightning_slim.report import deployable_copy

            model = deployable_copy(trainer, pl_module)  # every callback's export in order, this one last
            self.saved_path = str(save_int8(model, self._example, self.export_path))
            log.log_artifact(trainer, self.saved_path, name="int8-model", metadata=self.report_rows())

    def _release(self, pl_module) -> None:
        """The float layers again, with the QAT-trained weights (and the ranges kept for export)."""
        self.activation_ranges = static.observer_state(qat.fake_quantized_layers(pl_module))
        qat.unprepare(pl_module)
        self._module = None
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    @override
    def teardown(self, trainer, pl_module, stage) -> None:
        if stage == "fit" and self._module is pl_module:
            self._release(pl_module)
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._module is pl_module:  # Lightning skips teardown after an exception
            self._release(pl_module)

    def fake_quantized(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (a copy of the trained module; modified in place) as validation saw it during
        QAT: fake-quantized layers with the trained ranges, in eval mode."""
        if not qat.fake_quantized_layers(model):
            layers = self.layers or qat.select_layers(model, self.targets, self.exclude)
            qat.prepare_qat(model, layers, self.spec, self.fold_bn)
            qat.set_ranges(model, self.ranges)
            static.load_observer_state(qat.fake_quantized_layers(model), self.activation_ranges)
        qat.set_fake_quant(model, True)
        return model.eval()

    @override
    def export(self, model: torch.nn.Module, example: torch.Tensor | None = None) -> torch.nn.Module:
        """The real int8 model of ``model`` (a copy of the trained module; modified in place): an
        ``OrtModel`` (onnxruntime) or torchao int8 modules. ``example``: a CPU input batch for the
        ONNX trace (default: the first training batch seen, else ``example_input_array``).
        A model whose loss exploded after a phase switch is refused (``export_diverged=True`` allows it)."""
        if self.guard.diverged and not self.export_diverged:
            raise ExportRefused(self._refusal())
        if example is None:
            example = (
                self._example
                if self._example is not None and self._example.numel()
                else getattr(model, "example_input_array", None)
            )
        return to_runtime(self.fake_quantized(model), example)

    @override
    def float_baselines(
        self, model: torch.nn.Module, example: torch.Tensor, runtime: bool = True
    ) -> dict[str, torch.nn.Module]:
        qat.unprepare(model)  # the trained float layers (same parameters), not their fake-quantized form
        model.eval()
        if self.spec.runtime != "onnxruntime" or not runtime:  # no fp32 ONNX export nobody times
            return {"fp32_eager": model}
        from lightning_slim.quantization.serving import fp32_onnx

        return {"fp32_eager": model, "fp32_runtime": fp32_onnx(model, example)}

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
            "runtime": self.spec.runtime,
            "weight_bits": self.spec.weight_bits,
            "activation_bits": self.spec.activation_bits or "float",
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
            self.activation_ranges = static.observer_state(qat.fake_quantized_layers(self._module))
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
            qat.set_ranges(self._module, self.ranges)
            static.load_observer_state(qat.fake_quantized_layers(self._module), self.activation_ranges)
