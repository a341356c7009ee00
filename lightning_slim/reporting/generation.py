"""How fast a language model generates: greedy decoding at batch 1, the way a deployed LM serves
one request, several models timed side by side (one token of each in turn).

>>> import torch
>>> from torch import nn
>>> lm = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
>>> speed = generation_speed({"lm": lm}, torch.tensor([[1, 2, 3]]), new_tokens=5)["lm"]
>>> speed["generate_tokens"], speed["generate_kv_cache"], speed["generate_prompt_tokens"]
(5, False, 3)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.modules import evaluating, forward_target, named_arguments, output_tensor, without_cache
from lightning_slim.reporting.measure import Timing


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model's position embeddings allow (from its config), if it says."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


class _Decoder:
    """Greedy decoding of one model: a fresh token stream per :meth:`steps` call."""

    def __init__(self, model: nn.Module):
        _, self.target = forward_target(model)
        names = named_arguments(self.target)
        self.cache_arg = next((n for n in ("cache", "past_key_values") if n in names), None)
        self.kv_cache = bool(self.cache_arg and "use_cache" in names)
        self.limit = max_positions(self.target)

    def steps(self, ids: torch.Tensor, window: int) -> Iterator[torch.Tensor]:
        return _cached_steps(self.target, ids, self.cache_arg) if self.kv_cache else self._window_steps(ids, window)

    def _window_steps(self, ids: torch.Tensor, window: int) -> Iterator[torch.Tensor]:
        kwargs = without_cache(self.target, {})
        while True:
            logits = output_tensor(self.target(ids[:, -window:], **kwargs))
            token = logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, token], dim=1)
            yield token


def _cached_steps(target: nn.Module, ids: torch.Tensor, cache_arg: str) -> Iterator[torch.Tensor]:
    out = target(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise TypeError(f"{type(target).__name__} takes use_cache but returned no key/value cache")
    while True:
        token = output_tensor(out)[:, -1:].argmax(-1)
        yield token
        out = target(input_ids=token, use_cache=True, **{cache_arg: cache})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@torch.inference_mode()
def generation_speed(
    models: Mapping[str, nn.Module],
    prompt: torch.Tensor,
    new_tokens: int = 256,
    window: int | None = None,
    warmup: int = 4,
) -> dict[str, dict[str, Any]]:
    """Greedy generation of ``new_tokens`` tokens after ``prompt`` (``(1, P)`` token ids) by each
    model, one token of each in turn so that drift on a shared machine hits all alike. Per model:
    tokens per second over the whole run (the first token pays for reading the prompt), the
    median and interquartile range of one token's milliseconds, and how it decoded.

    A model whose ``forward`` takes a key/value cache (Hugging Face: ``cache`` or
    ``past_key_values``) decodes one token per forward with it; any other model re-reads the last
    ``window`` tokens (default ``P``) at every step. The prompt and the number of new tokens are
    cut to what every model's position embeddings allow. A model that cannot generate gets a
    ``generate_error`` and the others are still timed."""
    out: dict[str, dict[str, Any]] = {}
    decoders: dict[str, _Decoder] = {}
    for name, model in models.items():
        try:
            decoders[name] = _Decoder(model)
        except Exception as err:  # a model that cannot generate; the others are still timed
            out[name] = _error(err)
    limits = [d.limit for d in decoders.values() if d.limit is not None]
    ids = prompt[:1].long().cpu()
    if limits:
        ids = ids[:, : max(1, min(ids.shape[1], min(limits) // 2))]
        new_tokens = max(1, min(new_tokens, min(limits) - ids.shape[1]))
    window = window or ids.shape[1]
    streams: dict[str, Iterator[torch.Tensor]] = {}
    times: dict[str, list[float]] = {}
    with contextlib.ExitStack() as modes:
        for name, decoder in decoders.items():
            modes.enter_context(evaluating(decoder.target))
            try:
                warm = decoder.steps(ids, window)
                for _ in range(min(warmup, new_tokens)):  # first calls allocate; not timed
                    next(warm)
                streams[name], times[name] = decoder.steps(ids, window), []
            except Exception as err:
                out[name] = _error(err)
        for i in range(new_tokens):
            names = list(streams)
            for name in names[i % max(len(names), 1) :] + names[: i % max(len(names), 1)]:
                start = time.perf_counter()
                try:
                    next(streams[name])
                except Exception as err:
                    out[name] = _error(err)
                    del streams[name], times[name]
                    continue
                times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        token = Timing.of(seconds)
        out[name] = {
            "generate_tokens_per_s": new_tokens / sum(seconds),
            "generate_ms_per_token": token.median_ms,
            "generate_iqr_ms_per_token": token.iqr_ms,
            "generate_tokens": new_tokens,
            "generate_kv_cache": decoders[name].kv_cache,
            "generate_prompt_tokens": int(ids.shape[1]),
        }
    return out


def _error(err: Exception) -> dict[str, str]:
    return {"generate_error": f"not measurable: {type(err).__name__}: {err}"[:240]}
