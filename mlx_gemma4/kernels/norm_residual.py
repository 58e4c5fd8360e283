"""norm_residual: (residual + RMSNorm(x) * weight) * scale in one launch, and optionally the
RMSNorm the next sub-block starts with (metal/norm_residual.metal). Ends each decoder
sub-block: post-attention, post-feedforward, and the PLE epilogue (per_layer_projection output
normed, added, times layer_scalar). `moe_norm_residual` ends a MoE layer's feed-forward block:
it first mixes the experts' outputs and adds the two normed branches."""

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


def _run(body: str, leading: dict[str, mx.array], weight: mx.array, residual: mx.array, scale: mx.array | None,
         eps: float, next_weight: mx.array | None, template: list) -> mx.array | tuple[mx.array, mx.array]:
    """Launch a body of norm_residual.metal: its `leading` inputs, then w, residual, scale,
    next_w and params; one threadgroup per row of `residual`."""
    N = residual.shape[-1]
    kernel = build("norm_residual", body, (*leading, "w", "residual", "scale", "next_w", "params"), ("out", "normed"))
    # About 8 elements a thread, whole simdgroups, at most 1024 threads.
    threads = min(1024, max(32, round_up(N // 8, 32)))
    has_next = next_weight is not None
    out, normed = kernel(
        inputs=[*leading.values(), weight, residual, weight if scale is None else scale,
                next_weight if has_next else weight, scalars(eps)],
        template=[("T", residual.dtype), ("N", N), ("TG", threads), ("HAS_SCALE", scale is not None),
                  ("HAS_NEXT", has_next), *template],
        grid=(residual.size // N * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[residual.shape, residual.shape if has_next else (1,)],
        output_dtypes=[residual.dtype, residual.dtype],
    )
    return (out, normed) if has_next else out


def norm_residual(
    x: mx.array, weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float,
    next_weight: mx.array | None = None,
) -> mx.array | tuple[mx.array, mx.array]:
    return _run("norm_residual", {"x": x}, weight, residual, scale, eps, next_weight, [])


def moe_norm_residual_ref(
    dense: mx.array, experts: mx.array, weights: mx.array, dense_weight: mx.array, experts_weight: mx.array,
    weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float, next_weight: mx.array | None = None,
) -> mx.array | tuple[mx.array, mx.array]:
    """norm_residual_ref of RMSNorm(dense) * dense_weight + RMSNorm(mixed) * experts_weight,
    where mixed sums the experts' outputs [..., k, N] times their router weights [..., k]."""
    mixed = (experts * weights[..., None].astype(experts.dtype)).sum(axis=-2)
    x = mx.fast.rms_norm(dense, dense_weight, eps) + mx.fast.rms_norm(mixed, experts_weight, eps)
    return norm_residual_ref(x, weight, residual, scale, eps, next_weight)


def moe_norm_residual(
    dense: mx.array, experts: mx.array, weights: mx.array, dense_weight: mx.array, experts_weight: mx.array,
    weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float, next_weight: mx.array | None = None,
) -> mx.array | tuple[mx.array, mx.array]:
    leading = {"dense": dense, "experts": experts, "weights": weights, "dense_w": dense_weight,
               "experts_w": experts_weight}
    return _run("moe_norm_residual", leading, weight, residual, scale, eps, next_weight, [("K", weights.shape[-1])])
