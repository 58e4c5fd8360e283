"""prompt_attention: a prompt chunk's attention against a cache's K/V on the tensor cores, one
launch (metal/prompt_attention.metal). MLX's fused SDPA stops short of Gemma 4's head_dim 256
and 512, and its unfused fallback takes about 8 launches a layer."""

from __future__ import annotations

import mlx.core as mx

from ._source import build, gpu_backend
from .decode_attention import _no_mask, decode_attention_ref

KEYS_PER_TILE = 32  # BK
CHUNKS = (256, 64)  # head_dim values of K or V a step takes (DC), the wider first: each step waits on memory
# Threadgroup memory a launch may declare: CUDA's static limit, Apple GPUs' limit.
THREADGROUP_BYTES = {"cuda": 48 * 1024, "metal": 32 * 1024}


def prompt_attention_ref(queries: mx.array, keys: mx.array, values: mx.array,
                         mask: mx.array | str | None) -> mx.array:
    """softmax(q k^T) v, scale 1.0: decode_attention_ref's signature and [B, L, Hq * D] result."""
    return decode_attention_ref(queries, keys, values, mask)


def prompt_attention_supports(queries: mx.array) -> bool:
    """16-bit queries with a head_dim of whole chunks (the tiny test checkpoints' 32 is not)."""
    return queries.dtype in (mx.bfloat16, mx.float16) and queries.shape[-1] % min(CHUNKS) == 0


def threadgroup_bytes(query_rows: int, chunk: int, head_dim: int) -> int:
    """The threadgroup memory the body declares for BQ = query_rows and DC = chunk (2-byte values)."""
    bq, bk = query_rows, KEYS_PER_TILE
    return 2 * bq * (head_dim + 8) + 2 * bk * (chunk + 8) + 4 * bq * (bk + 4) + 2 * bq * (bk + 8) + 4 * bq + 4


def tile(head_dim: int) -> tuple[int, int]:
    """(BQ, DC): the widest chunk of head_dim, then the most query rows (32 or 16), that fit this
    back end's threadgroup memory."""
    limit = THREADGROUP_BYTES.get(gpu_backend(), THREADGROUP_BYTES["metal"])
    fitting = [(bq, dc) for dc in CHUNKS for bq in (32, 16)
               if head_dim % dc == 0 and threadgroup_bytes(bq, dc, head_dim) <= limit]
    return fitting[0]


def prompt_attention(queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None) -> mx.array:
    """queries [B, Hq, L, D]; keys, values [B, Hkv, S, D] as the cache returns them (each head_dim
    row contiguous); mask None, "causal" or boolean [B or 1, 1, L, S]. Returns [B, L, Hq * D]."""
    return prompt_attention_in_tiles(queries, keys, values, mask, *tile(queries.shape[-1]))


def prompt_attention_in_tiles(queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None,
                              bq: int, dc: int) -> mx.array:
    """prompt_attention with `bq` query rows a threadgroup, taking `dc` values of head_dim a step."""
    B, Hq, L, D = queries.shape
    S = keys.shape[2]
    has_mask = isinstance(mask, mx.array)
    if has_mask:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = mx.broadcast_to(mask, (mask.shape[0], 1, L, S))
    kernel = build("prompt_attention", "prompt_attention", ("q", "k", "v", "mask"), ("out",), contiguous=False)
    (out,) = kernel(
        inputs=[queries, keys, values, mask if has_mask else _no_mask()],
        template=[("T", queries.dtype), ("D", D), ("BQ", bq), ("BK", KEYS_PER_TILE), ("DC", dc),
                  ("HAS_MASK", has_mask),
                  ("CAUSAL", isinstance(mask, str))],
        grid=(-(-L // bq) * 128, B * Hq, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(B, L, Hq * D)],
        output_dtypes=[queries.dtype],
    )
    return out
