"""Per-layer rotary embeddings: Gemma 4's default and proportional (partial) schemes.

Both use the NeoX "rotate_half" layout: dim j pairs with dim j + head_dim/2. The proportional
scheme rotates only the first `rotated_dims/2` pairs, with exponents over the FULL head_dim
(modeling_rope_utils._compute_proportional_rope_parameters); the other pairs pass through.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .config import RopeConfig


class LayerRoPE:
    """Applies one layer's rotation to [B, heads, L, head_dim] at per-row position offsets."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        self.head_dim = head_dim
        pairs = rope.rotated_dims // 2
        if rope.scheme == "default" and rope.factor == 1.0 and pairs == head_dim // 2:
            self.base, self.periods = rope.theta, None
        else:
            # mx.fast.rope takes periods (1 / inv_freq); an infinite period is an identity pair.
            exponents = mx.arange(0, 2 * pairs, 2, dtype=mx.float32) / head_dim
            rotated = rope.factor * mx.power(mx.array(rope.theta, mx.float32), exponents)
            still = mx.full((head_dim // 2 - pairs,), mx.inf, dtype=mx.float32)
            self.base, self.periods = None, mx.concatenate([rotated, still])
        # The same angles for the fused rope_norm kernel: inv_freq per pair (0 = pass-through),
        # computed in float64 and kept as a float32 pair [2, D/2] (value, remainder), so the
        # kernel's angles at positions in the thousands stay exact to float32.
        exponents64 = np.arange(0, 2 * pairs, 2, dtype=np.float64) / head_dim
        inv_freq = np.zeros(head_dim // 2, dtype=np.float64)
        inv_freq[:pairs] = 1.0 / (rope.factor * np.power(float(rope.theta), exponents64))
        high = inv_freq.astype(np.float32)
        self.inv_freq = mx.array(np.stack([high, (inv_freq - high).astype(np.float32)]))

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.base, scale=1.0, offset=offset, freqs=self.periods
        )
