"""lightning-slim: PyTorch Lightning callbacks that prune, quantize, distil, factorize and select data.

Importing the package is lean: wandb, torchao and torch_pruning load only when a feature
that needs them runs. Public names resolve lazily.
"""

from __future__ import annotations

import importlib

from lightning_slim.core import registry

__version__ = "0.1.0"

_PUBLIC = {
    "CompressionReport": "lightning_slim.reporting.report",
    "SlimCallback": "lightning_slim.core.callback",
    "MNIST1DDataModule": "lightning_slim.demos.data",
    "DigitsDataModule": "lightning_slim.demos.data",
    "MNIST1DCNN": "lightning_slim.demos.models",
    "MNIST1DTeacherCNN": "lightning_slim.demos.models",
    "MNIST1DMLP": "lightning_slim.demos.models",
    "MNIST1DTransformer": "lightning_slim.demos.models",
    "DigitsCNN": "lightning_slim.demos.models",
}
# every technique's callback and config (IterativeMagnitudePruning, PruningConfig...), found from its folder
_PUBLIC |= registry.callbacks()

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lightning_slim' has no attribute {name!r}")


def __dir__():
    return __all__
