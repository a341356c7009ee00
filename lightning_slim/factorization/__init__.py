"""Low-rank factorization: Linear and convolution layers replaced by two smaller ones from the truncated
SVD of their weights, then fine-tuned (see README.md).

``LowRankFactorization`` is the Lightning callback; ``functional`` holds the plain-PyTorch pieces
(``apply_factorization(model, FactorizationConfig(...))``, ``factorize``, ``choose_rank``...) and
``structure`` the checkpoint side: ``load_factorized(model, checkpoint_path)`` loads a factorized
checkpoint into a freshly built model.
"""

from lightning_slim.factorization.callback import FactorizationCoverageWarning, LowRankFactorization
from lightning_slim.factorization.configs import FactorizationConfig
from lightning_slim.factorization.functional import FactorizedLayer, apply_factorization, choose_rank, factorize
from lightning_slim.factorization.structure import load_factorized, restructure

__all__ = [
    "FactorizationConfig",
    "FactorizationCoverageWarning",
    "FactorizedLayer",
    "LowRankFactorization",
    "apply_factorization",
    "choose_rank",
    "factorize",
    "load_factorized",
    "restructure",
]
