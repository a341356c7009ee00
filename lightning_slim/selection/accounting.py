"""Honest cost accounting for data selection, in the issue's units: a trained example costs 3
(forward + backward), a scoring forward 1, the reference's training 3 per example it trained on.

Those units count examples and treat every model alike. With each model's MACs per example
measured once (``weigh``), the ledger also reports the same costs in MACs, so a forward of a
reference k times larger than the learner costs k times more (``compute_macs*``); for token inputs
``macs_*_per_token`` too. The unweighted counts stay.

>>> ledger = CostLedger()
>>> ledger.step(seen=100, trained=10, active=True); ledger.learner_forwards += 100
>>> ledger.summary()["compute_units"], ledger.summary()["compute_ratio"]
(130, 4.333333333333333)
>>> ledger.reference_forwards += 100; ledger.weigh(learner_macs=1e6, reference_macs=4e6)
>>> ledger.summary()["compute_macs"] / ledger.summary()["compute_macs_uniform_same_steps"]
17.666666666666668
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from lightning_slim.core import sharding
from lightning_slim.selection.functional import FORWARD_UNITS, TRAIN_UNITS

# counts that each data-parallel rank makes of its own examples (steps and MACs per example are alike on every
# rank; reference_train_examples is the reference's, declared once)
RANK_COUNTS = (
    "examples_seen",
    "examples_trained",
    "learner_forwards",
    "reference_forwards",
    "noisy_known_seen",
    "noisy_known_trained",
    "noisy_seen",
    "noisy_trained",
)


@dataclass
class CostLedger:
    reference_train_examples: int = 0  # declared by the user (or train_reference)
    steps: int = 0  # training_step calls
    selection_steps: int = 0  # of which selected by score (in the window)
    examples_seen: int = 0  # super-batch examples the loader produced
    examples_trained: int = 0  # examples handed to training_step
    learner_forwards: int = 0  # examples scored by the learner (no grad)
    reference_forwards: int = 0  # examples scored by the reference (cache misses only)
    noisy_known_seen: int = 0  # examples whose noise flag was known...
    noisy_known_trained: int = 0
    noisy_seen: int = 0  # ...and of those, the corrupted ones
    noisy_trained: int = 0
    last_active: bool = False
    learner_macs: float = 0.0  # MACs of one learner forward per example (0: not measured)
    reference_macs: float = 0.0  # ... of the reference
    tokens_per_example: float = 0.0  # tokens in one example (token inputs), for per-token MACs

    def weigh(self, learner_macs: float, reference_macs: float = 0.0, tokens_per_example: float = 0.0) -> None:
        """Each model's MACs per example, measured once (e.g. on a sample batch before training)."""
        self.learner_macs, self.reference_macs = float(learner_macs), float(reference_macs)
        self.tokens_per_example = float(tokens_per_example)

    def step(self, seen: int, trained: int, active: bool) -> None:
        self.steps += 1
        self.selection_steps += int(active)
        self.examples_seen += seen
        self.examples_trained += trained
        self.last_active = active

    def noisy(self, noisy_seen: int, noisy_trained: int, seen: int, trained: int) -> None:
        self.noisy_seen += noisy_seen
        self.noisy_trained += noisy_trained
        self.noisy_known_seen += seen
        self.noisy_known_trained += trained

    def summary(self) -> dict[str, float]:
        train = TRAIN_UNITS * self.examples_trained
        compute = train + FORWARD_UNITS * (self.learner_forwards + self.reference_forwards)
        return {
            "examples_seen": self.examples_seen,
            "examples_trained": self.examples_trained,
            "selection_steps": self.selection_steps,
            "scoring_forwards": self.learner_forwards,
            "reference_forwards": self.reference_forwards,
            "compute_units": compute,
            # what plain training on the same number of trained examples would have cost
            "compute_units_uniform_same_steps": train,
            "compute_ratio": compute / train if train else 0.0,
            "reference_train_units": TRAIN_UNITS * self.reference_train_examples,
            "compute_units_with_reference": compute + TRAIN_UNITS * self.reference_train_examples,
        } | self.macs_summary()

    def macs_summary(self) -> dict[str, float]:
        """The same costs weighted by each model's MACs per example (empty until ``weigh``)."""
        if not self.learner_macs:
            return {}
        learner, reference = self.learner_macs, self.reference_macs
        train = TRAIN_UNITS * self.examples_trained * learner
        compute = train + FORWARD_UNITS * (self.learner_forwards * learner + self.reference_forwards * reference)
        out = {
            "macs_learner_per_example": learner,
            "macs_reference_per_example": reference,
            "compute_macs": compute,
            "compute_macs_uniform_same_steps": train,
            "compute_macs_ratio": compute / train if train else 0.0,
            "reference_train_macs": TRAIN_UNITS * self.reference_train_examples * reference,
            "compute_macs_with_reference": compute + TRAIN_UNITS * self.reference_train_examples * reference,
        }
        if self.tokens_per_example:
            out |= {
                "macs_learner_per_token": learner / self.tokens_per_example,
                "macs_reference_per_token": reference / self.tokens_per_example,
            }
        return out

    def across_ranks(self) -> CostLedger:
        """The whole job's ledger: a copy with every rank's example counts added up (a collective: every
        rank calls it at the same step), or ``self`` when not distributed."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        counts = torch.tensor([getattr(self, k) for k in RANK_COUNTS], dtype=torch.float64)
        counts = sharding.all_reduce(counts, None)  # integer counts far below 2**53: exact in float64
        return replace(self, **{k: int(v) for k, v in zip(RANK_COUNTS, counts.tolist(), strict=True)})

    def noisy_summary(self) -> dict[str, float]:
        if not self.noisy_known_seen:
            return {}
        return {
            "noisy_fraction_selected": self.noisy_trained / max(self.noisy_known_trained, 1),
            "noisy_fraction_seen": self.noisy_seen / self.noisy_known_seen,
        }

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
