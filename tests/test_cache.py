"""Caches: the sliding ring buffer against plain windowed attention over the true history."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.cache import KVCache, SlidingKVCache

HEADS, DIM = 2, 8


def windowed_attention(queries, keys, values, first_query: int, window: int | None):
    """Reference: query at position first_query + i sees keys (p - window, p], from position 0."""
    scores = np.einsum("hqd,hkd->hqk", queries, keys)
    query_pos = np.arange(first_query, first_query + queries.shape[1])[:, None]
    key_pos = np.arange(keys.shape[1])[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("hqk,hkd->hqd", weights / weights.sum(-1, keepdims=True), values)


class CheckedCache:
    """Drives a cache and checks every attention output against the true history."""

    def __init__(self, cache, window: int | None, seed: int = 0):
        self.cache, self.window, self.rng = cache, window, np.random.RandomState(seed)
        self.keys = np.zeros((HEADS, 0, DIM), np.float32)
        self.values = np.zeros((HEADS, 0, DIM), np.float32)

    def trim(self, n: int) -> int:
        trimmed = self.cache.trim(n)
        assert trimmed <= n
        self.keys, self.values = self.keys[:, : self.cache.offset], self.values[:, : self.cache.offset]
        return trimmed

    def feed(self, n: int):
        new_k, new_v, queries = (self.rng.randn(HEADS, n, DIM).astype(np.float32) for _ in range(3))
        mask = self.cache.make_mask(n)
        keys, values = self.cache.update_and_fetch(mx.array(new_k[None]), mx.array(new_v[None]))
        got = mx.fast.scaled_dot_product_attention(mx.array(queries[None]), keys, values, scale=1.0, mask=mask)
        first = self.keys.shape[1]
        self.keys = np.concatenate([self.keys, new_k], axis=1)
        self.values = np.concatenate([self.values, new_v], axis=1)
        want = windowed_attention(queries, self.keys, self.values, first, self.window)
        np.testing.assert_allclose(np.array(got[0]), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("headroom", [4, 300])  # 300: buffers grow in steps before the ring wraps
def test_sliding_cache_matches_windowed_attention_through_wraps_and_trims(seed, headroom):
    window = 6
    checked = CheckedCache(SlidingKVCache(window, headroom), window, seed)
    rng = random.Random(seed)
    for _ in range(60):
        if rng.random() < 0.25:
            checked.trim(rng.randint(1, headroom + 3))
        else:
            checked.feed(rng.choice([1, 1, 1, 1, 1, 2, 5, window + 3, 40, window + headroom + 1]))


def test_wrapped_sliding_cache_still_trims_its_headroom():
    window, headroom = 6, 4
    cache = SlidingKVCache(window, headroom)
    checked = CheckedCache(cache, window)
    for _ in range(40):
        checked.feed(1)
    assert cache.offset == 40 and cache.lowest > 0  # the ring has wrapped
    assert cache.trimmable() == headroom + 1
    assert checked.trim(100) == headroom + 1
    for n in (1, 1, 1, 7):
        checked.feed(n)


def test_full_cache_trims_and_grows():
    cache = KVCache()
    checked = CheckedCache(cache, None)
    checked.feed(300)
    assert checked.trim(50) == 50
    checked.feed(1)
    checked.feed(3)
    assert checked.trim(1000) == 254
    checked.feed(2)
    assert cache.offset == 2


def test_trimmed_model_cache_continues_like_a_fresh_run(checkpoints):
    """Roll back tokens after the sliding ring wrapped, feed others: logits as if never fed."""
    model = checkpoints.model("k_eq_v")
    ids = checkpoints.prompt("k_eq_v", 30, seed=8)[0]
    replacement = checkpoints.prompt("k_eq_v", 3, seed=9)[0]
    cache = model.make_cache(sliding_headroom=4)
    model(mx.array(ids[None]), cache)
    assert all(c.trim(3) == 3 for c in cache)
    continued = np.array(model(mx.array(replacement[None]), cache))
    fresh = np.array(model(mx.array(np.concatenate([ids[:-3], replacement])[None])))[:, -3:]
    assert np.abs(continued - fresh).max() <= 1e-4
