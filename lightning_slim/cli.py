"""``python -m lightning_slim.cli fit --config callbacks/<name>.yaml --model ... --data ...``

Plain LightningCLI in subclass mode: any LightningModule / DataModule by class path, and
the callbacks from the YAML configs in ``callbacks/``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
