"""norm_residual: (residual + RMSNorm(x) * weight) * scale in one launch
(metal/norm_residual.metal). Ends each decoder sub-block: post-attention, post-feedforward,
and the PLE epilogue (per_layer_projection output normed, added, times layer_scalar)."""

from __future__ import annotations

import mlx.core as mx

from ._source import build, round_up, scalars


def norm_residual_ref(
    x: mx.array, weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float
) -> mx.array:
    """residual + RMSNorm(x) * weight, times `scale` ([1], e.g. layer_scalar) when given."""
    h = residual + mx.fast.rms_norm(x, weight, eps)
    return h if scale is None else h * scale


def norm_residual(
    x: mx.array, weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float
) -> mx.array:
    N = x.shape[-1]
    rows = x.size // N
    kernel = build("norm_residual", "norm_residual", ("x", "w", "residual", "scale", "params"), ("out",))
    # About 8 elements a thread, whole simdgroups, at most 1024 threads.
    threads = min(1024, max(32, round_up(N // 8, 32)))
    (out,) = kernel(
        inputs=[x, weight, residual, weight if scale is None else scale, scalars(eps)],
        template=[("T", residual.dtype), ("N", N), ("TG", threads), ("HAS_SCALE", scale is not None)],
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[residual.shape],
        output_dtypes=[residual.dtype],
    )
    return out
