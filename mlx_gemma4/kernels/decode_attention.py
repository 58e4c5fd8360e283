"""decode_attention: split-K attention for a few queries against a cache's K/V, read in place
(metal/decode_attention.metal: a partial pass and a combine pass; on CUDA the partial pass's
last split per row combines, one launch). head_dim 256 and 512 (MLX's fused SDPA stops at 256),
GQA, scale 1.0, the masks the caches build."""

from __future__ import annotations

import functools

import mlx.core as mx

from ._source import arrival_counters, build, last_threadgroup_merges, round_up, scratch

MAX_DECODE_QUERIES = 8  # decode (1) and speculative verify; longer query blocks take prefill SDPA
SIMDGROUPS = 4  # simdgroups per partial threadgroup, each walking every 4th key of the chunk
# Each simdgroup walks its keys one after another (latency-bound), so parallelism comes from
# many resident threadgroups: about 8 per SM on an H100 (132 SMs, 2048 threads each).
TARGET_THREADGROUPS = 1024
MIN_KEYS_PER_SPLIT = 32
MAX_SPLITS = 256
COMBINE_THREADS = 128


def decode_attention_ref(
    queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None
) -> mx.array:
    """softmax(q k^T) v with scale 1.0 (q_norm / k_norm replace 1/sqrt(D)).

    queries [B, Hq, Lq, D]; keys, values [B, Hkv, S, D] as the cache returns them; mask None,
    "causal" or boolean [B or 1, 1, Lq, S]. Returns [B, Lq, Hq * D], as the output projection
    reads it.
    """
    B, Hq, Lq, _ = queries.shape
    out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
    # One query's [B, Hq, 1, D] is already in that order: no transpose node.
    return (out if Lq == 1 else out.transpose(0, 2, 1, 3)).reshape(B, Lq, -1)


@functools.cache
def _no_mask() -> mx.array:
    return mx.ones((1, 1, 1, 1), dtype=mx.bool_)


def _split_scratch(rows: int, head_dim: int) -> tuple[mx.array, mx.array]:
    """FUSED_COMBINE's per-split (acc [rows, splits, D], (max, sum) [rows, splits, 2]) float32
    scratch, sized for the most splits `rows` takes."""
    room = rows * _most_splits(rows)
    return scratch(room * head_dim), scratch(room * 2)


def _most_splits(rows: int) -> int:
    return max(1, min(MAX_SPLITS, -(-TARGET_THREADGROUPS // rows)))


def _reads_words(dtype: mx.Dtype, head_dim: int) -> bool:
    """Whether each lane reads its span of a row as 16-byte words: bfloat16 spans of a multiple of
    8 values (head_dim 256 and 512). Every stride but the last is then a multiple of head_dim,
    so each row starts 16-byte aligned."""
    return dtype == mx.bfloat16 and head_dim % 8 == 0 and -(-head_dim // 32) % 8 == 0


def decode_attention(
    queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None
) -> mx.array:
    return merged_splits_attention(queries, keys, values, mask, last_threadgroup_merges())


def merged_splits_attention(
    queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None, fused: bool
) -> mx.array:
    """decode_attention with the splits merged by the partial pass itself (`fused`) or by
    the combine pass."""
    # Strides are read for every axis but the last: each head_dim row must be contiguous, as
    # cache buffers, their slices and head-axis transposes are.
    B, Hq, Lq, D = queries.shape
    S = keys.shape[2]
    rows = B * Hq * Lq
    splits = min(_most_splits(rows), max(1, -(-S // MIN_KEYS_PER_SPLIT)))
    has_mask = isinstance(mask, mx.array)
    if has_mask:
        # [Lq, S] or [.., 1, S] masks: broadcasting gives the kernel stride-0 axes to walk.
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = mx.broadcast_to(mask, (mask.shape[0], 1, Lq, S))
    causal = isinstance(mask, str) and Lq > 1  # bottom-right aligned; with one query it is no mask
    split_names = ("part_acc", "part_ml")
    partial = build(
        "decode_attention", "decode_attention_partial",
        ("q", "k", "v", "mask") + ("arrivals", *split_names) * fused, ("out",) if fused else split_names,
        contiguous=False, defines=(("FUSED_COMBINE", int(fused)),),
    )
    launch = dict(
        template=[("T", queries.dtype), ("D", D), ("NSG", SIMDGROUPS), ("HAS_MASK", has_mask), ("CAUSAL", causal),
                  ("MAX_SPLITS", MAX_SPLITS), ("VEC", _reads_words(queries.dtype, D))],
        grid=(splits * SIMDGROUPS * 32, rows, 1),
        threadgroup=(SIMDGROUPS * 32, 1, 1),
    )
    inputs = [queries, keys, values, mask if has_mask else _no_mask()]
    if fused:
        (out,) = partial(inputs=inputs + [arrival_counters(rows), *_split_scratch(rows, D)], **launch,
                         output_shapes=[(B, Lq, Hq * D)], output_dtypes=[queries.dtype])
        return out
    part_acc, part_ml = partial(inputs=inputs, **launch, output_shapes=[(rows, splits, D), (rows, splits, 2)],
                                output_dtypes=[mx.float32, mx.float32])
    combine = build("decode_attention", "decode_attention_combine", ("part_acc", "part_ml"), ("out",))
    (out,) = combine(
        inputs=[part_acc, part_ml],
        template=[("T", queries.dtype), ("D", D), ("TG", COMBINE_THREADS), ("MAX_SPLITS", MAX_SPLITS), ("HQ", Hq),
                  ("LQ", Lq)],
        grid=(rows * COMBINE_THREADS, 1, 1),
        threadgroup=(COMBINE_THREADS, 1, 1),
        output_shapes=[(B, Lq, Hq * D)],
        output_dtypes=[queries.dtype],
    )
    return out
