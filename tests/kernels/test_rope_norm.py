"""rope_norm kernel vs its twin: dtypes, head_dim 256 (default RoPE) / 512 (proportional
partial), q/k (weighted norm + RoPE) and v (scale-free norm), L 1 and prefill, batch 1 and 2,
positions as int and per row, before and after a sliding window's wrap."""

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


def oracle(x, weight, offset, rope: RopeConfig | None) -> np.ndarray:
    """float64 NumPy norm + RoPE, [B, H, L, D]."""
    x = np.array(x.astype(mx.float32), dtype=np.float64)
    B, L, H, D = x.shape
    y = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    if weight is not None:
        y = y * np.array(weight.astype(mx.float32), dtype=np.float64)
    y = y.transpose(0, 2, 1, 3)
    if rope is None:
        return y
    pairs = rope.rotated_dims // 2
    inv = np.zeros(D // 2)
    inv[:pairs] = rope.theta ** (-np.arange(0, 2 * pairs, 2) / D)
    start = np.broadcast_to(np.array(offset), (B,)).astype(np.float64)
    angle = (start[:, None, None, None] + np.arange(L)[None, None, :, None]) * inv
    a, b = y[..., : D // 2], y[..., D // 2 :]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [256, 512, 16, 32])
@pytest.mark.parametrize("length", [1, 37, 128])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("role", ["qk", "v"])
def test_matches_twin(dtype, head_dim, length, batch, role):
    heads = 8 if role == "qk" else 2
    x = random((batch, length, heads, head_dim), dtype, scale=3.0, seed=length + head_dim)
    rope = LayerRoPE(ROPES[head_dim], head_dim) if role == "qk" else None
    weight = random((head_dim,), dtype, seed=1) * 0.5 + 1.0 if role == "qk" else None
    # Offsets: start, past a 512 window (a wrapped ring), and per row with left padding.
    offsets = [0, 700, mx.array([5000, 4991][:batch], dtype=mx.int32)]
    for offset in offsets:
        out = rope_norm(x, weight, offset, rope, 1e-6)
        ref = rope_norm_ref(x, weight, offset, rope, 1e-6)
        # MLX's RoPE loses ~1e-4..1e-3 at positions in the thousands; the kernel computes its
        # frequencies in float64 and uses precise sin/cos. Allow the twin's own float32 error,
        # and require the kernel to be about as accurate as the twin.
        exact = oracle(x, weight, offset, ROPES[head_dim] if rope else None)
        twin32 = rope_norm_ref(x.astype(mx.float32), None if weight is None else weight.astype(mx.float32),
                               offset, rope, 1e-6)
        twin_diff = np.array(twin32, dtype=np.float64) - exact
        twin_error, twin_nmse = float(np.abs(twin_diff).max()), float((twin_diff**2).sum() / (exact**2).sum())
        label = f"rope_norm[{dtype} D{head_dim} L{length} B{batch} {role} {np.array(offset).tolist()}]"
        if dtype == mx.float32:
            # Both take float32 angles (position * inv_freq): at position 5000 their ulp alone
            # costs ~1e-3 here, so "as accurate" means within a quarter of the twin's error.
            assert np.abs(np.array(out, dtype=np.float64) - exact).max() <= 1.25 * twin_error + 2e-5, label
        # |kernel - twin| <= |kernel - exact| + |twin - exact| <= 2 twin errors (+ the bounds);
        # squared: (a + b)^2 <= 2a^2 + 2b^2 <= 4 twin NMSE.
        assert_close(out, ref, dtype, label, extra_atol=2 * twin_error, extra_nmse=4 * twin_nmse)
