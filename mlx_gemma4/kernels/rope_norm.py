"""rope_norm: one layer's attention-projection epilogue in one launch: q/k RMSNorm, v's
scale-free norm, per-layer RoPE on q and k, and the [B, H, L, D] transpose
(metal/rope_norm.metal). It reads the fused projection's output as the matmul writes it and
writes q, k and v as three arrays: no reshape or slice node around it in the decode step."""

from __future__ import annotations

import mlx.core as mx

from ..rope import LayerRoPE
from ._source import build, round_up, scalars

Heads = tuple[mx.array, mx.array | None, mx.array | None]


def _query_heads(x: mx.array, head_dim: int, num_kv_heads: int, k_eq_v: bool) -> int:
    return x.shape[2] // head_dim - num_kv_heads * (1 if k_eq_v else 2)


def rope_norm_ref(
    x: mx.array, q_weight: mx.array, k_weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE,
    eps: float, num_kv_heads: int = 0, k_eq_v: bool = False,
) -> Heads:
    """(queries, keys, values), each [B, heads, L, D], from the fused projection output.

    x: [B, L, (q heads + k heads (+ v heads)) * D], D = q_weight's width. num_kv_heads 0: a
    KV-shared layer, only queries (keys, values None). k_eq_v: values are the scale-free norm of
    the raw k heads. offset: int, or int32 [B] token positions of each row's first query.
    """
    D = q_weight.shape[-1]
    hq = _query_heads(x, D, num_kv_heads, k_eq_v)
    x = x.reshape(*x.shape[:2], -1, D)
    queries = rope(mx.fast.rms_norm(x[:, :, :hq], q_weight, eps).transpose(0, 2, 1, 3), offset)
    if not num_kv_heads:
        return queries, None, None
    raw_keys = x[:, :, hq : hq + num_kv_heads]
    raw_values = raw_keys if k_eq_v else x[:, :, hq + num_kv_heads :]
    keys = rope(mx.fast.rms_norm(raw_keys, k_weight, eps).transpose(0, 2, 1, 3), offset)
    return queries, keys, mx.fast.rms_norm(raw_values, None, eps).transpose(0, 2, 1, 3)


_POSITIONS: dict[tuple[int, int], mx.array] = {}


def _positions(offset: int | mx.array, batch: int) -> mx.array:
    if isinstance(offset, mx.array):
        return mx.broadcast_to(offset.astype(mx.int32), (batch,))
    # Every layer of one forward asks for the same offset: make the array once per step.
    key = (int(offset), batch)
    if key not in _POSITIONS:
        if len(_POSITIONS) > 8:
            _POSITIONS.clear()
        _POSITIONS[key] = mx.full((batch,), key[0], dtype=mx.int32)
    return _POSITIONS[key]


def rope_norm(
    x: mx.array, q_weight: mx.array, k_weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE,
    eps: float, num_kv_heads: int = 0, k_eq_v: bool = False,
) -> Heads:
    B, L, _ = x.shape
    D = q_weight.shape[-1]
    hq = _query_heads(x, D, num_kv_heads, k_eq_v)
    heads_out = hq + 2 * num_kv_heads
    queries_only = not num_kv_heads  # a KV-shared layer: no keys or values outputs
    output_shapes = [(B, hq, L, D)] + [(B, num_kv_heads, L, D)] * 2 * (not queries_only)
    kernel = build(
        "rope_norm", "rope_norm", ("x", "q_w", "k_w", "pos", "inv_freq", "params"),
        ("queries", "keys", "values")[: len(output_shapes)], defines=(("QUERIES_ONLY", int(queries_only)),),
    )
    threads = max(32, round_up(D // 2, 32))
    heads = kernel(
        inputs=[x, q_weight, q_weight if k_weight is None else k_weight, _positions(offset, B), rope.inv_freq,
                scalars(eps)],
        template=[("T", x.dtype), ("D", D), ("TG", threads), ("NQ", hq), ("NKV", num_kv_heads),
                  ("V_FROM_K", k_eq_v)],
        grid=(B * L * heads_out * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=output_shapes,
        output_dtypes=[x.dtype] * len(output_shapes),
    )
    return (heads[0], None, None) if queries_only else tuple(heads)
