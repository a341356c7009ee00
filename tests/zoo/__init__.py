"""The model zoo shared by every technique's zoo tests: see ``models.py``."""
