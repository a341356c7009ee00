"""The ``lightning-slim`` command: Lightning's own LightningCLI, with the shipped callback configs.

```bash
lightning-slim fit --config pruning.yaml --config compression_report.yaml \\
    --model my_package.MyModule --data my_package.MyDataModule
```

Any LightningModule / DataModule by class path (subclass mode). ``--config NAME`` takes a file
path, or the name of a config shipped in :mod:`lightning_slim.configs` when no such file exists
(``pruning``, ``pruning.yaml``, ...). The shipped configs add their callbacks with
``trainer.callbacks+:`` (jsonargparse's list append), so several ``--config`` compose: each adds
its callbacks to those of the configs before it. ``python -m lightning_slim.cli`` is the same command.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lightning_slim import configs


def resolve_configs(args: list[str]) -> list[str]:
    """``--config NAME`` where NAME is no file but a shipped config's name becomes that config's path.

    >>> resolve_configs(["fit", "--config", "pruning.yaml"])[2].endswith("lightning_slim/configs/pruning.yaml")
    True
    >>> resolve_configs(["fit", "--config=compression_report"])[1].startswith("--config=/")
    True
    """
    shipped = set(configs.list_configs())

    def resolve(value: str) -> str:
        if Path(value).exists() or value.removesuffix(".yaml") not in shipped:
            return value  # a real file, or something jsonargparse will name in its own error
        return str(configs.path(value))

    out, expect_value = [], False
    for arg in args:
        if expect_value:
            out.append(resolve(arg))
        elif arg.startswith("--config="):
            out.append("--config=" + resolve(arg.removeprefix("--config=")))
        else:
            out.append(arg)
        expect_value = arg == "--config"
    return out


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI on ``args`` (default: the command line) and return it (tests read its trainer).
    ``run=False``: only build the model, data and trainer (``args`` then has no subcommand)."""
    args = resolve_configs(sys.argv[1:] if args is None else args)
    return LightningCLI(args=args, run=run, save_config_kwargs={"overwrite": True})


def entry_point() -> None:
    """The ``lightning-slim`` console script (``[project.scripts]``): exit status 0 on success."""
    main()


if __name__ == "__main__":
    entry_point()
