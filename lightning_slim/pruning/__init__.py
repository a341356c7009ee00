"""Pruning: lottery tickets, gradual schedules, N:M (2:4) sparsity, Wanda, structural speed-ups.

``IterativeMagnitudePruning`` is the Lightning callback, ``PruningConfig`` its options; the plain-
PyTorch pieces it is made of: ``tensors`` (what a target is), ``patterns`` (unstructured / N:M
masks), ``importance`` (magnitude, Wanda), ``functional`` (``prune``, ``apply_masks``...),
``schedules``, ``rewind``, ``structured`` and ``heads`` (channels and attention heads), ``depth``
(whole layers: with ``heads``, how a student is cut out of its teacher). ``load_pruned(model,
checkpoint_path)`` loads a structurally pruned checkpoint into a fresh model. Pretrained
transformers: ``activations`` (importance from calibration data), ``width`` (heads, grouped-query
attention included, and MLP channels) and ``student`` (``cut_student``: a student at a share of the
non-embedding parameters)."""

from lightning_slim.pruning.activations import activation_importance
from lightning_slim.pruning.callback import IterativeMagnitudePruning
from lightning_slim.pruning.configs import PruningConfig
from lightning_slim.pruning.depth import choose_layers, choose_layers_by_angle, keep_layers
from lightning_slim.pruning.functional import (
    apply_masks,
    compute_masks,
    magnitude_masks,
    prune,
    select_layers,
    to_semi_structured,
)
from lightning_slim.pruning.importance import calibrate
from lightning_slim.pruning.options import PruningCoverageWarning
from lightning_slim.pruning.schedules import GradualSchedule, IMPSchedule, OneShotSchedule, parse_schedule
from lightning_slim.pruning.structured import load_pruned
from lightning_slim.pruning.student import cut_student
from lightning_slim.pruning.tensors import select_tensors
from lightning_slim.pruning.width import keep_heads, keep_mlp_channels

__all__ = [
    "GradualSchedule",
    "IMPSchedule",
    "IterativeMagnitudePruning",
    "OneShotSchedule",
    "PruningConfig",
    "PruningCoverageWarning",
    "activation_importance",
    "apply_masks",
    "calibrate",
    "choose_layers",
    "choose_layers_by_angle",
    "compute_masks",
    "cut_student",
    "keep_heads",
    "keep_layers",
    "keep_mlp_channels",
    "load_pruned",
    "magnitude_masks",
    "parse_schedule",
    "prune",
    "select_layers",
    "select_tensors",
    "to_semi_structured",
]
