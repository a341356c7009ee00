"""Online data selection: train on what is learnable, worth learning and not yet learnt
(RHO-LOSS learnability, JEST joint selection). See README.md, the method card."""

from lightning_slim.selection.accounting import CostLedger
from lightning_slim.selection.callback import OnlineDataSelection
from lightning_slim.selection.configs import JointSelection, SelectionConfig, SelectionWindow
from lightning_slim.selection.functional import (
    default_per_sample_loss,
    example_scores,
    jest_select,
    per_example_loss,
    select_sample,
    select_topk,
    select_uniform,
    sigmoid_pair_losses,
)
from lightning_slim.selection.reference import (
    compute_reference_losses,
    load_reference,
    reference_loss_cache,
    train_reference,
)
from lightning_slim.selection.scoring import Scorer

__all__ = [
    "CostLedger",
    "JointSelection",
    "OnlineDataSelection",
    "Scorer",
    "SelectionConfig",
    "SelectionWindow",
    "compute_reference_losses",
    "default_per_sample_loss",
    "example_scores",
    "jest_select",
    "load_reference",
    "per_example_loss",
    "reference_loss_cache",
    "select_sample",
    "select_topk",
    "select_uniform",
    "sigmoid_pair_losses",
    "train_reference",
]
