"""Token generation: chunked prefill, then a decode loop that keeps the device busy."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .model import Model

# <eos>, <turn|> and <|tool_response>: a turn ends on any of them (reference section 3.2).
DEFAULT_STOP_IDS = (1, 106, 50)


def prefill(model: Model, prompt: mx.array, cache: list, step_size: int) -> mx.array:
    """Feed `prompt` [B, L] in chunks of `step_size`; logits of the last position, [B, vocab].

    All but the last token only fill the caches; the last one runs as an ordinary step, so
    nothing is computed for positions whose outputs no one reads.
    """
    if step_size < 1:
        raise ValueError("prefill_step_size must be at least 1")
    for start in range(0, prompt.shape[1] - 1, step_size):
        model.prefill(prompt[:, start : min(start + step_size, prompt.shape[1] - 1)], cache)
        mx.eval([c.state for c in cache])
    return model(prompt[:, -1:], cache)[:, -1]


def generate_tokens(
    model: Model,
    prompt_ids: Sequence[int] | mx.array,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    prefill_step_size: int = 512,
    stop_ids: Sequence[int] | None = None,
    cache: list | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids, the stop token included when one is hit.

    Greedy at temperature 0. `stop_ids=None` stops on <eos>, <turn|>, <|tool_response>
    and the config's eos ids; `stop_ids=[]` never stops early. A passed `cache` is extended.
    """
    prompt = mx.array(prompt_ids, dtype=mx.int32)
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt_ids must be a non-empty 1-D sequence of token ids")
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    stops = set(DEFAULT_STOP_IDS) | set(model.config.eos_token_ids) if stop_ids is None else set(stop_ids)
    sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        mx.random.seed(seed)
    cache = model.make_cache() if cache is None else cache

    def sample(logits: mx.array) -> mx.array:
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    if max_tokens == 0:
        return
    token = sample(prefill(model, prompt[None], cache, prefill_step_size))
    mx.async_eval(token)
    for produced in range(1, max_tokens + 1):
        if produced < max_tokens:  # queue the next step before reading this token back
            next_token = sample(model(token[:, None], cache)[:, -1])
            mx.async_eval(next_token)
        value = token.item()
        yield value
        if value in stops or produced == max_tokens:
            return
        token = next_token
