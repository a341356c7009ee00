"""Context for the Python code blocks of README.md, the method cards and docs/, which pytest-markdown-docs
runs as tests (``--markdown-docs``; registered from the root conftest.py).

A block that uses what the reader brings (their model, data, teacher) names it in its fence, which
GitHub and PyPI do not show and the docs site strips (docs/hooks.py)::

    ```python fixture:model fixture:dm
    trainer.fit(model, datamodule=dm)  # model: your LightningModule
    ```

Each fixture below is that object for real: small modules on scikit-learn's digits, so every block runs
as written. Every block runs in a fresh temporary folder (files it writes land there), and Lightning's
own ``PL_TRAINER_*`` environment variables shorten the Trainers it builds to a few batches per epoch
(and 2 epochs where a block leaves ``max_epochs`` unset): arguments a block passes still win.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

MARKER = "markdown-docs"  # pytest-markdown-docs marks every code-block item with it
# Lightning reads these as Trainer defaults (lightning.pytorch.utilities.argparse._defaults_from_env_vars)
SHORT_TRAINER = {
    "PL_TRAINER_LIMIT_TRAIN_BATCHES": "12",  # epochs of 12 steps: room for step-counted knobs (rewind_step)
    "PL_TRAINER_LIMIT_VAL_BATCHES": "2",
    "PL_TRAINER_MAX_EPOCHS": "2",
    "PL_TRAINER_LOGGER": "False",
    "PL_TRAINER_ENABLE_PROGRESS_BAR": "False",
    "PL_TRAINER_ENABLE_MODEL_SUMMARY": "False",
    "PL_TRAINER_ENABLE_CHECKPOINTING": "False",
}


# Lightning's note that a model came in eval mode: the cards load Hugging Face models as from_pretrained
# returns them (eval mode) on purpose, to show the callbacks work on them unchanged
SNIPPET_WARNINGS = [r"Found .* module\(s\) in eval mode"]


@pytest.fixture(autouse=True)
def _code_block_sandbox(request, tmp_path, monkeypatch):
    if request.node.get_closest_marker(MARKER) is None:
        yield
        return
    for message in SNIPPET_WARNINGS:  # inside pytest's per-test warnings context: undone after the block
        warnings.filterwarnings("ignore", message=message)
    monkeypatch.chdir(tmp_path)
    for key, value in SHORT_TRAINER.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    yield


# --- what the reader brings --------------------------------------------------------------------------
def _quickstart():
    """examples/quickstart.py: a user's own module and data (digits), the ones docs/own-model.md follows."""
    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def MyModel():
    """A user's own module class: its own layer names, ``val_acc`` as its metric, ``(x, y)`` batches."""
    return _quickstart().DigitsClassifier


@pytest.fixture
def MyDataModule():
    return _quickstart().DigitsData


@pytest.fixture
def model():
    """A LightningModule logging ``val/loss`` and ``val/acc`` (the callbacks' default metric names)."""
    from lightning_slim import DigitsCNN

    return DigitsCNN(channels=8)


@pytest.fixture
def student(model):
    return model


@pytest.fixture
def dm():
    from lightning_slim import DigitsDataModule

    return DigitsDataModule(batch_size=64)


@pytest.fixture
def data(dm):
    return dm


@pytest.fixture
def trained_teacher():
    from lightning_slim import DigitsCNN

    return DigitsCNN(channels=16)


@pytest.fixture
def my_teacher(trained_teacher):
    return trained_teacher


@pytest.fixture
def my_reference_model():
    from lightning_slim import DigitsCNN

    return DigitsCNN(channels=8)


@pytest.fixture
def x_numpy(dm):
    """A batch of inputs as a NumPy array, as a serving process would have it."""
    dm.setup("fit")
    x, _y = next(iter(dm.val_dataloader()))
    return x[:8].numpy()
