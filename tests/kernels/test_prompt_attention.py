"""prompt_attention kernel vs its twin on K/V and masks produced by the real caches: a sliding
window shorter than the prompt, a chunk after earlier ones (keys before the queries), a full
cache's "causal", left padding's boolean masks, GQA, head_dim 256 and 512, chunk lengths that
are and are not whole tiles, and both tile heights."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tolerances import assert_close, random, requires_gpu, run_and_replayed

from mlx_gemma4.cache import KVCache, SlidingKVCache
from mlx_gemma4.kernels import prompt_attention, prompt_attention_ref, prompt_attention_supports
from mlx_gemma4.kernels.prompt_attention import THREADGROUP_BYTES, prompt_attention_in_tiles, threadgroup_bytes

pytestmark = requires_gpu

HALF = [mx.float16, mx.bfloat16]
WINDOW, HEADROOM = 64, 32


def chunks(kind, batch, kv_heads, head_dim, dtype, lengths):
    """Yield (mask, keys, values, length) for each chunk of `lengths` fed to a fresh cache."""
    padding = [0, 5][:batch] if batch > 1 else None
    cache = SlidingKVCache(WINDOW, HEADROOM, padding) if kind == "sliding" else KVCache(padding)
    scale = 3.0**0.5 * head_dim**-0.25  # scores of std ~3
    for seed, length in enumerate(lengths, start=1):
        mask = cache.make_mask(length)
        k = random((batch, kv_heads, length, head_dim), dtype, scale, seed=seed)
        v = random((batch, kv_heads, length, head_dim), dtype, seed=seed + 10_000)
        keys, values = cache.update_and_fetch(k, v)
        yield mask, keys, values, length
        mx.eval(cache.keys, cache.values)


def oracle(q, k, v, mask):
    """The twin on float32 copies, rounded once (the kernel's softmax and sums are float32); 0 on
    the rows that see no key (left padding's first rows), where the twin's softmax is NaN."""
    ref = prompt_attention_ref(*[a.astype(mx.float32) for a in (q, k, v)], mask).astype(q.dtype)
    if not isinstance(mask, mx.array):
        return ref
    B, L = ref.shape[:2]
    seen = mx.broadcast_to(mask, (B, 1, L, k.shape[2])).any(axis=-1).reshape(B, L, 1)
    return mx.where(seen, ref, mx.zeros_like(ref))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("head_dim", [256, 512])
@pytest.mark.parametrize("kind", ["sliding", "full"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (8, 2)])
def test_matches_twin(dtype, head_dim, kind, batch, heads, kv_heads):
    """Chunks of 100 (past the sliding window), then 40 and 128 after them."""
    for mask, keys, values, length in chunks(kind, batch, kv_heads, head_dim, dtype, (100, 40, 128)):
        q = random((batch, heads, length, head_dim), dtype, 3.0**0.5 * head_dim**-0.25, seed=length)
        label = f"prompt_attention[{dtype} D{head_dim} {kind} B{batch} L{length} S{keys.shape[2]} {heads}/{kv_heads}]"
        assert_close(prompt_attention(q, keys, values, mask), oracle(q, keys, values, mask), dtype, label)


@pytest.mark.parametrize("rows,chunk", [(16, 64), (32, 64), (16, 256), (32, 256)])
@pytest.mark.parametrize("head_dim", [256, 512])
def test_every_tile(rows, chunk, head_dim):
    """Each (BQ, DC) a back end may take (Metal's 32 KB takes DC 64), on a causal chunk of 72
    rows after 50 keys; BQ 32 with DC 256 at head_dim 512 needs more than CUDA's 48 KB."""
    if threadgroup_bytes(rows, chunk, head_dim) > THREADGROUP_BYTES["cuda"]:
        pytest.skip("more threadgroup memory than CUDA allows")
    dtype = mx.bfloat16
    (_, _, _, _), (mask, keys, values, length) = chunks("full", 1, 2, head_dim, dtype, (50, 72))
    q = random((1, 8, length, head_dim), dtype, 3.0**0.5 * head_dim**-0.25, seed=7)
    out = prompt_attention_in_tiles(q, keys, values, mask, rows, chunk)
    assert_close(out, oracle(q, keys, values, mask), dtype, f"prompt_attention[BQ{rows} DC{chunk} D{head_dim}]")


def test_rows_that_see_no_key_come_out_zero():
    """Queries that see no key (a left-padded row's first ones) come out 0, not NaN."""
    dtype, length = mx.bfloat16, 48
    q = random((1, 8, length, 256), dtype, 0.2, seed=1)
    k = random((1, 2, length, 256), dtype, 0.2, seed=2)
    v = random((1, 2, length, 256), dtype, seed=3)
    seen = mx.arange(length)[None, :] <= mx.arange(length)[:, None]
    seen = seen & (mx.arange(length)[:, None] >= 20)
    out = prompt_attention(q, k, v, seen[None, None])
    rows = out.reshape(length, -1).astype(mx.float32)
    assert mx.all(rows[:20] == 0).item()
    assert_close(out[:, 20:], oracle(q[:, :, 20:], k, v, seen[None, None, 20:]), dtype, "prompt_attention[unseen]")


def test_traced_and_replayed():
    """Inside mx.compile (the compiled prompt) the launch replays as run."""
    dtype = mx.bfloat16
    q = random((1, 8, 64, 512), dtype, 0.2, seed=1)
    k = random((1, 1, 64, 512), dtype, 0.2, seed=2)
    v = random((1, 1, 64, 512), dtype, seed=3)
    for out in run_and_replayed(lambda: prompt_attention(q, k, v, "causal")):
        assert_close(out, oracle(q, k, v, "causal"), dtype, "prompt_attention[replayed]")


def test_supports_half_precision_whole_chunks():
    assert prompt_attention_supports(mx.zeros((1, 8, 16, 256), mx.bfloat16))
    assert not prompt_attention_supports(mx.zeros((1, 8, 16, 256), mx.float32))
    assert not prompt_attention_supports(mx.zeros((1, 8, 16, 32), mx.bfloat16))
