"""Iterative magnitude pruning: lottery tickets, gradual schedules, structural speed-ups.

``IterativeMagnitudePruning`` is the Lightning callback; ``functional``, ``schedules``,
``rewind`` and ``structured`` are the plain-PyTorch pieces it is made of.
``load_pruned(model, checkpoint_path)`` loads a structurally pruned checkpoint into a fresh model.
"""
from lightning_slim.pruning.callback import IterativeMagnitudePruning
from lightning_slim.pruning.structured import load_pruned
from lightning_slim.pruning.functional import apply_masks, magnitude_masks, select_layers
from lightning_slim.pruning.schedules import GradualSchedule, IMPSchedule, OneShotSchedule, parse_schedule

__all__ = ["IterativeMagnitudePruning", "load_pruned", "apply_masks", "magnitude_masks", "select_layers",
           "IMPSchedule", "GradualSchedule", "OneShotSchedule", "parse_schedule"]
