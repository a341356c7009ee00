import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
# fixtures for the code blocks of README.md, the method cards and docs/ (run by pytest-markdown-docs)
pytest_plugins = ["snippet_fixtures"]
# generated data sets are cached once for the whole suite (and across runs) inside the repo
os.environ.setdefault("LIGHTNING_SLIM_CACHE", str(ROOT / ".slim_cache"))
os.environ["WANDB_MODE"] = "offline"
# jsonargparse notices about its own future API; not about this code
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ["WANDB_CONSOLE"] = "off"
os.environ["WANDB_SILENT"] = "true"
# tiny test models run faster on one thread, and DDP tests start two processes on 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _wandb_dirs(tmp_path, monkeypatch):
    """Keep W&B's files out of $HOME and end any run a test left open."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    yield
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def pytest_configure(config):
    # slow model-zoo cells (part of `make test`): deselect with -m "not zoo_slow"; `make test-zoo` runs the zoo alone
    config.addinivalue_line("markers", "zoo_slow: a slow model-zoo cell (tests/zoo); `-m 'not zoo_slow'` skips them")
    # cells that load SmolLM2-135M-Instruct (lightning_slim.demos.pretrained): a forward or two each
    config.addinivalue_line("markers", "slow_real: loads the real SmolLM2-135M checkpoint (seconds to a minute)")
