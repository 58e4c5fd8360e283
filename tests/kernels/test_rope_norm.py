"""rope_norm kernel vs its twin: dtypes, head_dim 256 (default RoPE) / 512 (proportional
partial), the three head layouts (q|k|v, q|k with k_eq_v, q only for KV-shared layers), L 1 and
prefill, batch 1 and 2, positions as int and per row, before and after a sliding window's wrap."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tolerances import DTYPES, assert_close, random, requires_gpu

from mlx_gemma4.config import RopeConfig
from mlx_gemma4.kernels import rope_norm, rope_norm_ref
from mlx_gemma4.rope import LayerRoPE

pytestmark = requires_gpu

ROPES = {
    256: RopeConfig("default", 10_000.0, 256),  # sliding layers
    512: RopeConfig("proportional", 1_000_000.0, 128),  # full layers: 64 of 256 pairs rotate
    16: RopeConfig("default", 10_000.0, 16),  # the tiny test checkpoints
    32: RopeConfig("proportional", 1_000_000.0, 8),
}
# (kv heads, k_eq_v): own k and v projections, attention_k_eq_v, a KV-shared layer.
LAYOUTS = {"qkv": (2, False), "qk_eq_v": (2, True), "q_only": (0, False)}
QUERY_HEADS = 8


def _norm(x, weight):
    y = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    return y if weight is None else y * np.array(weight.astype(mx.float32), dtype=np.float64)


def _rotate(y, offset, rope: RopeConfig):
    B, _, L, D = y.shape
    pairs = rope.rotated_dims // 2
    inv = np.zeros(D // 2)
    inv[:pairs] = rope.theta ** (-np.arange(0, 2 * pairs, 2) / D)  # exponents over the full D
    start = np.broadcast_to(np.array(offset), (B,)).astype(np.float64)
    angle = (start[:, None, None, None] + np.arange(L)[None, None, :, None]) * inv
    a, b = y[..., : D // 2], y[..., D // 2 :]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)


def oracle(x, q_weight, k_weight, offset, rope: RopeConfig, num_kv_heads, k_eq_v) -> list[np.ndarray]:
    """float64 NumPy (queries, keys, values) [B, heads, L, D]; only queries when num_kv_heads is 0."""
    B, L, _ = x.shape
    x = np.array(x.astype(mx.float32), dtype=np.float64).reshape(B, L, -1, q_weight.shape[0]).transpose(0, 2, 1, 3)
    hq = x.shape[1] - num_kv_heads * (1 if k_eq_v else 2)
    out = [_rotate(_norm(x[:, :hq], q_weight), offset, rope)]
    if num_kv_heads:
        raw_keys = x[:, hq : hq + num_kv_heads]
        out.append(_rotate(_norm(raw_keys, k_weight), offset, rope))
        out.append(_norm(raw_keys if k_eq_v else x[:, hq + num_kv_heads :], None))
    return out


def fused_input(batch, length, head_dim, layout, dtype, seed):
    num_kv_heads, k_eq_v = LAYOUTS[layout]
    heads = QUERY_HEADS + num_kv_heads * (1 if k_eq_v else 2)
    x = random((batch, length, heads * head_dim), dtype, scale=3.0, seed=seed)  # as the fused matmul writes it
    q_weight = random((head_dim,), dtype, seed=1) * 0.5 + 1.0
    k_weight = random((head_dim,), dtype, seed=2) * 0.5 + 1.0 if num_kv_heads else None
    return x, q_weight, k_weight, num_kv_heads, k_eq_v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [256, 512, 16, 32])
@pytest.mark.parametrize("length", [1, 37, 128])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_twin(dtype, head_dim, length, batch, layout):
    x, q_weight, k_weight, num_kv_heads, k_eq_v = fused_input(batch, length, head_dim, layout, dtype, length + head_dim)
    rope = LayerRoPE(ROPES[head_dim], head_dim)
    # Offsets: start, past a 512 window (a wrapped ring), and per row with left padding.
    for offset in [0, 700, mx.array([5000, 4991][:batch], dtype=mx.int32)]:
        outs = rope_norm(x, q_weight, k_weight, offset, rope, 1e-6, num_kv_heads, k_eq_v)
        refs = rope_norm_ref(x, q_weight, k_weight, offset, rope, 1e-6, num_kv_heads, k_eq_v)
        # MLX's RoPE loses ~1e-4..1e-3 at positions in the thousands; the kernel uses precise
        # sin/cos. Allow the twin's own float32 error, and require the kernel to be about as
        # accurate as the twin.
        exacts = oracle(x, q_weight, k_weight, offset, ROPES[head_dim], num_kv_heads, k_eq_v)
        twins32 = rope_norm_ref(x.astype(mx.float32), q_weight.astype(mx.float32),
                                None if k_weight is None else k_weight.astype(mx.float32), offset, rope, 1e-6,
                                num_kv_heads, k_eq_v)
        assert (outs[1] is None) == (num_kv_heads == 0) and (refs[1] is None) == (num_kv_heads == 0)
        for part, out, ref, exact, twin32 in zip("qkv", outs, refs, exacts, twins32):
            twin_diff = np.array(twin32, dtype=np.float64) - exact
            twin_error, twin_nmse = float(np.abs(twin_diff).max()), float((twin_diff**2).sum() / (exact**2).sum())
            label = f"rope_norm[{dtype} D{head_dim} L{length} B{batch} {layout}:{part} {np.array(offset).tolist()}]"
            if dtype == mx.float32:
                # Both take float32 angles (position * inv_freq): at position 5000 their ulp
                # alone costs ~1e-3, so "as accurate" means within a quarter of the twin's error.
                assert np.abs(np.array(out, dtype=np.float64) - exact).max() <= 1.25 * twin_error + 2e-5, label
            # |kernel - twin| <= |kernel - exact| + |twin - exact| <= 2 twin errors (+ the
            # bounds); squared: (a + b)^2 <= 2a^2 + 2b^2 <= 4 twin NMSE.
            assert_close(out, ref, dtype, label, extra_atol=2 * twin_error, extra_nmse=4 * twin_nmse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [256, 512])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["qkv", "qk_eq_v"])
def test_writes_the_step_into_the_cache_slot(dtype, head_dim, batch, layout):
    """A decode step's K and V into the cache buffers at the slot (`into`, cache.StepView): every
    slot of both buffers as the twin's scatter leaves them, the queries as without `into`."""
    x, q_weight, k_weight, num_kv_heads, k_eq_v = fused_input(batch, 1, head_dim, layout, dtype, head_dim)
    rope = LayerRoPE(ROPES[head_dim], head_dim)
    buffers = [random((batch, num_kv_heads, 40, head_dim), dtype, seed=s) for s in (7, 8)]
    copies = [mx.array(b) for b in buffers]
    mx.eval(buffers, copies)
    slot = mx.array([29], dtype=mx.int32)
    args = (x, q_weight, k_weight, mx.array([700] * batch, dtype=mx.int32), rope, 1e-6, num_kv_heads, k_eq_v)
    outs = rope_norm(*args, (*buffers, slot))
    refs = rope_norm_ref(*args, (*copies, slot))
    mx.eval(outs, refs)
    for part, out, ref in zip("qkv", outs, refs):
        assert_close(out, ref, dtype, f"rope_norm into[{dtype} D{head_dim} B{batch} {layout}:{part}]",
                     extra_atol=1e-3, extra_nmse=1e-6)
    for buffer, copy in zip(outs[1:], copies):
        for others in (slice(0, 29), slice(30, 40)):
            assert mx.array_equal(buffer[:, :, others], copy[:, :, others]).item()
