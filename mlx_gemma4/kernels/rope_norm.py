"""rope_norm: one layer's attention-projection epilogue in one launch: q/k RMSNorm, v's
scale-free norm, per-layer RoPE on q and k, and the [B, H, L, D] transpose
(metal/rope_norm.metal). It reads the fused projection's output as the matmul writes it and
writes q, k and v as three arrays: no reshape or slice node around it in the decode step."""

from __future__ import annotations

import mlx.core as mx

from ..rope import LayerRoPE
from ._source import build, gpu_backend, round_up, scalars

Heads = tuple[mx.array, mx.array | None, mx.array | None]
# A decode step's cache slot for the new K and V: (keys buffer, values buffer [B, kv heads, slots,
# D], the slot int32 [1]), as cache.StepView holds them.
CacheSlot = tuple[mx.array, mx.array, mx.array]


def _query_heads(x: mx.array, head_dim: int, num_kv_heads: int, k_eq_v: bool) -> int:
    return x.shape[2] // head_dim - num_kv_heads * (1 if k_eq_v else 2)


def rope_norm_ref(
    x: mx.array, q_weight: mx.array, k_weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE,
    eps: float, num_kv_heads: int = 0, k_eq_v: bool = False, into: CacheSlot | None = None,
) -> Heads:
    """(queries, keys, values), each [B, heads, L, D], from the fused projection output.

    x: [B, L, (q heads + k heads (+ v heads)) * D], D = q_weight's width. num_kv_heads 0: a
    KV-shared layer, only queries (keys, values None). k_eq_v: values are the scale-free norm of
    the raw k heads. offset: int, or int32 [B] token positions of each row's first query.
    into (one query, L = 1): keys and values are the cache buffers with the new ones at the slot.
    """
    queries, keys, values = _heads_ref(x, q_weight, k_weight, offset, rope, eps, num_kv_heads, k_eq_v)
    return (queries, *_written(into, keys, values)) if into is not None else (queries, keys, values)


def _written(into: CacheSlot, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    """The buffers of `into` with keys and values at its slot."""
    key_buffer, value_buffer, slot = into
    # A scatter, not `slice_update`: MLX's CUDA slice update at an array position runs a thread for
    # every element of the buffer (about 35 us a write on the 31B's rings, 4 ms a step on an H100),
    # the scatter one for each element written (6 us).
    slot = slot.reshape(1, 1, 1, 1)
    return mx.put_along_axis(key_buffer, slot, keys, axis=2), mx.put_along_axis(value_buffer, slot, values, axis=2)


def _heads_ref(
    x: mx.array, q_weight: mx.array, k_weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE,
    eps: float, num_kv_heads: int, k_eq_v: bool,
) -> Heads:
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


def rope_positions(offset: int | mx.array, batch: int) -> mx.array:
    """The kernels' `pos` input: each row's position of its first query, int32 [batch]."""
    if isinstance(offset, mx.array):
        return mx.broadcast_to(offset.astype(mx.int32), (batch,))
    # Every layer of one forward asks for the same offset: make the array once per step.
    key = (int(offset), batch)
    if key not in _POSITIONS:
        if len(_POSITIONS) > 8:
            _POSITIONS.clear()
        _POSITIONS[key] = mx.full((batch,), key[0], dtype=mx.int32)
    return _POSITIONS[key]


def writes_in_place() -> bool:
    """Whether rope_norm writes a decode step's K and V into the cache buffers themselves (INTO_CACHE):
    on CUDA, two scatter launches and two outputs a layer fewer. MLX sees the buffers as inputs
    that do not change, so the caches hand out no other handle to them (cache.SlidingKVCache's
    snapshot copies). Metal keeps the outputs and the scatters: its writes to an input are untested here."""
    return gpu_backend() == "cuda"


def rope_norm(
    x: mx.array, q_weight: mx.array, k_weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE,
    eps: float, num_kv_heads: int = 0, k_eq_v: bool = False, into: CacheSlot | None = None,
) -> Heads:
    B, L, _ = x.shape
    D = q_weight.shape[-1]
    hq = _query_heads(x, D, num_kv_heads, k_eq_v)
    heads_out = hq + 2 * num_kv_heads
    in_place = into is not None and num_kv_heads > 0 and writes_in_place()
    # A KV-shared layer, or K and V written into the cache: the queries output alone.
    queries_only = not num_kv_heads or in_place
    output_shapes = [(B, hq, L, D)] + [(B, num_kv_heads, L, D)] * 2 * (not queries_only)
    cache_inputs = ("k_cache", "v_cache", "slot") if in_place else ()
    kernel = build(
        "rope_norm", "rope_norm", ("x", "q_w", "k_w", "pos", "inv_freq", "params", *cache_inputs),
        ("queries", "keys", "values")[: len(output_shapes)],
        defines=(("QUERIES_ONLY", int(queries_only)), ("INTO_CACHE", int(in_place))),
    )
    threads = max(32, round_up(D // 2, 32))
    heads = kernel(
        inputs=[x, q_weight, q_weight if k_weight is None else k_weight, rope_positions(offset, B), rope.inv_freq,
                scalars(eps), *(into if in_place else ())],
        template=[("T", x.dtype), ("D", D), ("TG", threads), ("NQ", hq), ("NKV", num_kv_heads),
                  ("V_FROM_K", k_eq_v)],
        grid=(B * L * heads_out * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=output_shapes,
        output_dtypes=[x.dtype] * len(output_shapes),
    )
    if in_place:
        return heads[0], into[0], into[1]
    if not num_kv_heads:
        return heads[0], None, None
    return (heads[0], *_written(into, *heads[1:])) if into is not None else tuple(heads)
