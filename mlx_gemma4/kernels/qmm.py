"""qmm: a quantized matrix product for prompt chunks on the tensor cores (metal/qmm.metal), with
MLX's affine 4- and 8-bit layout. At 128 rows MLX's CUDA quantized_matmul runs the 31B's
projections at 100-140 TFLOPs on an H100 (bench/kernels.py), and they take most of its time to
the first token."""

from __future__ import annotations

import mlx.core as mx

from ._source import build, multiprocessors
from .qmv import qmv_ref, qmv_supports

BK = 64  # values of K a step of the kernel takes
# A threadgroup's tile of out and its grid of simdgroups (BM, BN, WM, WN). It led 128 x 64 and
# 64 x 128 tiles and 4 x 4 or 4 x 2 grids on the 31B's and E4B's projections (metal/README.md).
TILE = (128, 128, 2, 4)
RUN = TILE[1] * BK // (32 * TILE[2] * TILE[3])  # values of a row of w one thread dequantizes a step
MAX_SPLITS = 8
MIN_SPLIT_STEPS = 8  # steps of K a split takes at least, so that its partial sums stay a small cost


def qmm_ref(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
            bits: int) -> mx.array:
    """x [..., K] @ dequantize(w [N, K * bits / 32]).T -> [..., N]: MLX's quantized_matmul."""
    return qmv_ref(x, w, scales, biases, group_size, bits)


def qmm_supports(x: mx.array, w: mx.array, biases: mx.array | None, group_size: int, bits: int) -> bool:
    """16-bit x over a layout qmv reads (affine 4/8-bit w) whose K, w's, holds whole steps and
    whose groups hold whole runs."""
    K = x.shape[-1]
    return (
        x.dtype in (mx.bfloat16, mx.float16) and qmv_supports(x, w, biases, group_size, bits)
        and K % BK == 0 and group_size % RUN == 0 and w.shape[-1] * 32 // bits == K
    )


def k_splits(rows: int, N: int, K: int) -> int:
    """Splits of K that fill the GPU's multiprocessors, one threadgroup each (its registers allow
    no more), in one wave where out has fewer tiles than there are multiprocessors: at 128 rows
    the 31B's o_proj and down have 42 tiles, which took 2.4 times as long as bench/kernels.py's
    overlapping calls showed (ncu over a whole prompt, H100)."""
    tiles = -(-rows // TILE[0]) * -(-N // TILE[1])
    return max(1, min(MAX_SPLITS, multiprocessors() // tiles, K // BK // MIN_SPLIT_STEPS))


def qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
        bits: int) -> mx.array:
    splits = k_splits(x.size // x.shape[-1], w.shape[0], x.shape[-1])
    return qmm_in_splits(x, w, scales, biases, group_size, bits, splits)


def qmm_in_splits(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                  bits: int, splits: int) -> mx.array:
    """qmm with K in `splits`: past one, the splits' float32 partial sums are added by MLX."""
    rows, N = x.size // x.shape[-1], w.shape[0]
    bm, bn, wm, wn = TILE
    kernel = build("qmm", "qmm", ("x", "w", "scales", "biases"), ("out",))
    (out,) = kernel(
        inputs=[x, w, scales, biases],
        template=[("T", x.dtype), ("BITS", bits), ("GROUP", group_size), ("BM", bm), ("BN", bn), ("WM", wm),
                  ("WN", wn), ("SPLITS", splits)],
        grid=(-(-rows // bm) * 32 * wm * wn, -(-N // bn), splits),
        threadgroup=(32 * wm * wn, 1, 1),
        output_shapes=[(*x.shape[:-1], N) if splits == 1 else (splits, rows, N)],
        output_dtypes=[x.dtype if splits == 1 else mx.float32],
    )
    return out if splits == 1 else out.sum(axis=0).astype(x.dtype).reshape(*x.shape[:-1], N)
