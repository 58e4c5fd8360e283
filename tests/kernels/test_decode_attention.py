"""decode_attention kernel vs its twin on K/V and masks produced by the real caches: sliding
ring buffer before and after it wraps, full cache ("causal" / None masks), left padding,
GQA, head_dim 256 and 512 (and the tiny checkpoints' 32), Lq 1 (decode) and 4 (verify)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import pytest
from tolerances import DTYPES, assert_close, random, requires_gpu, run_and_replayed

from mlx_gemma4.cache import KVCache, SlidingKVCache
from mlx_gemma4.kernels import decode_attention, decode_attention_ref

pytestmark = requires_gpu

WINDOW, HEADROOM = 64, 32  # capacity 96: the ring wraps after 96 tokens
PROMPT = {"sliding": 40, "full": 600}
CHECK_AFTER = {"sliding": (41, 70, 200), "full": (601, 700)}  # sliding: before the window, inside, wrapped


def cache_steps(kind, batch, kv_heads, head_dim, dtype, queries):
    """Yield (offset, mask, keys, values) as a model sees them at each checked step."""
    padding = [0, 3][:batch] if batch > 1 else None
    cache = SlidingKVCache(WINDOW, HEADROOM, padding) if kind == "sliding" else KVCache(padding)
    scale = 3.0 ** 0.5 * head_dim**-0.25  # scores of std ~3
    length, seed = PROMPT[kind], 0
    while cache.offset < max(CHECK_AFTER[kind]):
        seed += 1
        mask = cache.make_mask(length)
        k = random((batch, kv_heads, length, head_dim), dtype, scale, seed=seed)
        v = random((batch, kv_heads, length, head_dim), dtype, seed=seed + 10_000)
        keys, values = cache.update_and_fetch(k, v)
        if any(cache.offset - length < c <= cache.offset for c in CHECK_AFTER[kind]) and length == queries:
            yield cache.offset, mask, keys, values
        length = queries
        mx.eval(cache.keys, cache.values)


def oracle(q, k, v, mask):
    """The twin on float32 copies, rounded once: the kernel's softmax and sums are float32 by
    design, while MLX's half-precision SDPA rounds scores and weights to the input dtype."""
    f32 = [a.astype(mx.float32) for a in (q, k, v)]
    return decode_attention_ref(*f32, mask).astype(q.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [256, 512, 32])
@pytest.mark.parametrize("kind", ["sliding", "full"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (8, 2)])
def test_matches_twin(dtype, head_dim, kind, batch, queries, heads, kv_heads):
    checked = 0
    for offset, mask, keys, values in cache_steps(kind, batch, kv_heads, head_dim, dtype, queries):
        q = random((batch, heads, queries, head_dim), dtype, 3.0**0.5 * head_dim**-0.25, seed=offset)
        out = decode_attention(q, keys, values, mask)
        ref = oracle(q, keys, values, mask)
        label = f"decode_attention[{dtype} D{head_dim} {kind} B{batch} Lq{queries} {heads}/{kv_heads} @{offset}]"
        assert_close(out, ref, dtype, label)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_context_many_splits(dtype):
    """S of 32k keys (full layer, head_dim 512): every split and the combine pass carry weight."""
    q = random((1, 8, 1, 512), dtype, 0.2, seed=1)
    k = random((1, 1, 32768, 512), dtype, 0.2, seed=2)
    v = random((1, 1, 32768, 512), dtype, seed=3)
    assert_close(decode_attention(q, k, v, None), oracle(q, k, v, None), dtype, "decode_attention[long]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["two_passes", "fused_combine"])
@pytest.mark.parametrize("kind", ["sliding", "full"])
def test_fused_combine_and_two_passes_match_the_twin(dtype, fused, kind):
    """Both ways to merge the splits: the partial pass's last split per row (FUSED_COMBINE, the
    CUDA default) and the combine pass (Metal's); fused, also replayed from a trace, twice."""
    from mlx_gemma4.kernels._source import last_threadgroup_merges
    from mlx_gemma4.kernels.decode_attention import merged_splits_attention

    if fused and not last_threadgroup_merges():
        pytest.skip("FUSED_COMBINE runs on CUDA only")
    batch, heads = 2, 8
    for offset, mask, keys, values in cache_steps(kind, batch, 2, 256, dtype, 1):
        q = random((batch, heads, 1, 256), dtype, 3.0**0.5 * 256**-0.25, seed=offset)
        expected = oracle(q, keys, values, mask)
        call = partial(merged_splits_attention, q, keys, values, mask, fused)
        for out in run_and_replayed(call, replayed=fused):
            assert_close(out, expected, dtype, f"decode_attention[fused={fused} {kind} @{offset}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [256, 512, 32])
def test_hidden_keys_never_reach_the_output(dtype, head_dim):
    """A key the mask hides may hold anything (a ring slot not yet written, left padding): the
    kernel reads such rows along with their neighbours, and NaN there must change nothing."""
    length, hidden = 100, 13
    q = random((1, 8, 1, head_dim), dtype, 3.0**0.5 * head_dim**-0.25, seed=1)
    k = random((1, 1, length, head_dim), dtype, 3.0**0.5 * head_dim**-0.25, seed=2)
    v = random((1, 1, length, head_dim), dtype, seed=3)
    visible = (mx.arange(length) >= hidden).reshape(1, 1, 1, length)
    poisoned = [mx.where(visible.reshape(1, 1, length, 1), a, mx.nan) for a in (k, v)]
    out = decode_attention(q, *poisoned, visible)
    assert_close(out, oracle(q, k, v, visible), dtype, f"decode_attention[hidden NaN D{head_dim}]")
