"""rope_norm: q/k RMSNorm (or the scale-free v norm) + per-layer RoPE + the [B, H, L, D]
transpose, in one launch (metal/rope_norm.metal)."""

from __future__ import annotations

import functools

import mlx.core as mx

from ..rope import LayerRoPE
from ._source import build, round_up, scalars


def rope_norm_ref(
    x: mx.array, weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE | None, eps: float
) -> mx.array:
    """RMSNorm(x) * weight over head_dim, to [B, H, L, D], then `rope` at per-row `offset`.

    x: [B, L, H, D] projection output. weight None: the scale-free v norm. rope None: no
    rotation (v). offset: int, or int32 [B] token positions of each row's first query.
    """
    y = mx.fast.rms_norm(x, weight, eps).transpose(0, 2, 1, 3)
    return y if rope is None else rope(y, offset)


def _positions(offset: int | mx.array, batch: int) -> mx.array:
    if isinstance(offset, mx.array):
        return mx.broadcast_to(offset.astype(mx.int32), (batch,))
    return _int_positions(int(offset), batch)


_POSITIONS: dict[tuple[int, int], mx.array] = {}


def _int_positions(offset: int, batch: int) -> mx.array:
    # Every layer of one forward asks for the same offset: make the array once per step.
    key = (offset, batch)
    if key not in _POSITIONS:
        if len(_POSITIONS) > 8:
            _POSITIONS.clear()
        _POSITIONS[key] = mx.full((batch,), offset, dtype=mx.int32)
    return _POSITIONS[key]


@functools.cache
def _no_rotation(head_dim: int) -> mx.array:
    return mx.zeros((head_dim // 2,), mx.float32)


def rope_norm(
    x: mx.array, weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE | None, eps: float
) -> mx.array:
    B, L, H, D = x.shape
    kernel = build("rope_norm", "rope_norm", ("x", "w", "pos", "inv_freq", "params"), ("out",))
    threads = max(32, round_up(D // 2, 32))
    inv_freq = rope.inv_freq if rope is not None else _no_rotation(D)
    (out,) = kernel(
        inputs=[x, x if weight is None else weight, _positions(offset, B), inv_freq, scalars(eps)],
        template=[("T", x.dtype), ("D", D), ("TG", threads), ("HAS_WEIGHT", weight is not None),
                  ("ROTATE", rope is not None)],
        grid=(B * L * H * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, H, L, D)],
        output_dtypes=[x.dtype],
    )
    return out
