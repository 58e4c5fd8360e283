"""norm_residual: (residual + RMSNorm(x) * weight) * scale in one launch, and optionally the
RMSNorm the next sub-block starts with (metal/norm_residual.metal). Ends each decoder
sub-block: post-attention, post-feedforward, and the PLE epilogue (per_layer_projection output
normed, added, times layer_scalar)."""

from __future__ import annotations

import mlx.core as mx

from ._source import build, round_up, scalars


def norm_residual_ref(
    x: mx.array, weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float,
    next_weight: mx.array | None = None,
) -> mx.array | tuple[mx.array, mx.array]:
    """h = residual + RMSNorm(x) * weight, times `scale` ([1], e.g. layer_scalar) when given;
    with `next_weight`, (h, RMSNorm(h) * next_weight)."""
    h = residual + mx.fast.rms_norm(x, weight, eps)
    h = h if scale is None else h * scale
    return h if next_weight is None else (h, mx.fast.rms_norm(h, next_weight, eps))


def norm_residual(
    x: mx.array, weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float,
    next_weight: mx.array | None = None,
) -> mx.array | tuple[mx.array, mx.array]:
    N = x.shape[-1]
    rows = x.size // N
    kernel = build(
        "norm_residual", "norm_residual", ("x", "w", "residual", "scale", "next_w", "params"), ("out", "normed")
    )
    # About 8 elements a thread, whole simdgroups, at most 1024 threads.
    threads = min(1024, max(32, round_up(N // 8, 32)))
    has_next = next_weight is not None
    out, normed = kernel(
        inputs=[x, weight, residual, weight if scale is None else scale, next_weight if has_next else weight,
                scalars(eps)],
        template=[("T", residual.dtype), ("N", N), ("TG", threads), ("HAS_SCALE", scale is not None),
                  ("HAS_NEXT", has_next)],
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[residual.shape, residual.shape if has_next else (1,)],
        output_dtypes=[residual.dtype, residual.dtype],
    )
    return (out, normed) if has_next else out
