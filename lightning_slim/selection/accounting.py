"""Honest cost accounting for data selection, in the issue's units: a trained example costs 3
(forward + backward), a scoring forward 1, the reference's training 3 per example it trained on.

>>> ledger = CostLedger()
>>> ledger.step(seen=100, trained=10, active=True); ledger.learner_forwards += 100
>>> ledger.summary()["compute_units"], ledger.summary()["compute_ratio"]
(130, 4.333333333333333)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lightning_slim.selection.functional import FORWARD_UNITS, TRAIN_UNITS


@dataclass
class CostLedger:
    reference_train_examples: int = 0  # declared by the user (or train_reference)
    steps: int = 0                     # training_step calls
    selection_steps: int = 0           # of which selected by score (in the window)
    examples_seen: int = 0             # super-batch examples the loader produced
    examples_trained: int = 0          # examples handed to training_step
    learner_forwards: int = 0          # examples scored by the learner (no grad)
    reference_forwards: int = 0        # examples scored by the reference (cache misses only)
    noisy_known_seen: int = 0          # examples whose noise flag was known...
    noisy_known_trained: int = 0
    noisy_seen: int = 0                # ...and of those, the corrupted ones
    noisy_trained: int = 0
    last_active: bool = False

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
        }

    def noisy_summary(self) -> dict[str, float]:
        if not self.noisy_known_seen:
            return {}
        return {"noisy_fraction_selected": self.noisy_trained / max(self.noisy_known_trained, 1),
                "noisy_fraction_seen": self.noisy_seen / self.noisy_known_seen}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
