"""LightningCLI configs shipped with the package: one YAML per callback plus ``recipe_*`` combinations.

They are package data, so a ``pip install lightning-slim`` has them too; in a clone of the
repository ``callbacks/`` points at this folder. The ``lightning-slim`` command takes a shipped
config by name, and several ``--config`` compose (each adds its callbacks with ``callbacks+:``):

```bash
lightning-slim fit --config pruning.yaml --config compression_report.yaml \\
    --model lightning_slim.MNIST1DCNN --data lightning_slim.MNIST1DDataModule
```

>>> from lightning_slim import configs
>>> "pruning" in configs.list_configs()
True
>>> configs.path("pruning").name
'pruning.yaml'
>>> "IterativeMagnitudePruning" in configs.path("pruning.yaml").read_text()
True
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["list_configs", "path"]

_SUFFIX = ".yaml"


def _folder() -> Path:
    # a regular (unzipped) install, editable or not, gives a real directory; the CLI needs a file path
    return Path(str(resources.files(__name__)))


def list_configs() -> list[str]:
    """Names of the shipped configs, sorted, without the ``.yaml`` suffix."""
    return sorted(p.name.removesuffix(_SUFFIX) for p in _folder().iterdir() if p.name.endswith(_SUFFIX))


def path(name: str) -> Path:
    """The file of the shipped config ``name`` (with or without ``.yaml``), for ``--config``.

    Raises:
        ValueError: ``name`` is not a shipped config; the message lists the ones that are.
    """
    stem = name.removesuffix(_SUFFIX)
    names = list_configs()
    if stem not in names:
        raise ValueError(f"no shipped config named {name!r}; available: {', '.join(names)}")
    return _folder() / f"{stem}{_SUFFIX}"
