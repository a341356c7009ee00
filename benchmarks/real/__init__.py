"""The arms of ``benchmarks/real_models.py``: one module each, ``run(args) -> dict``."""
