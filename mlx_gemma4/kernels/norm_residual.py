"""norm_residual: (residual + RMSNorm(x) * weight) * scale in one launch, and optionally the
RMSNorm the next sub-block starts with (metal/norm_residual.metal). Ends each decoder
sub-block: post-attention, post-feedforward, and the PLE epilogue (per_layer_projection output
normed, added, times layer_scalar). A MoE layer's post-attention block writes three next norms
(the dense MLP's, the router's and the experts' inputs). `moe_norm_residual` ends a MoE layer's
feed-forward block: it first mixes the experts' outputs and adds the two normed branches."""

from __future__ import annotations

import mlx.core as mx

from ._source import build, round_up, scalars


# One next norm's weight, several (a tuple: one normed output each) or none.
NextWeights = mx.array | tuple[mx.array, ...] | None
MAX_NEXT_NORMS = 3  # the MoE layer's post-attention block: the dense MLP's, the router's and the experts' inputs


def _as_tuple(next_weight: NextWeights) -> tuple[mx.array, ...]:
    return () if next_weight is None else next_weight if isinstance(next_weight, tuple) else (next_weight,)


def norm_residual_ref(
    x: mx.array, weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float,
    next_weight: NextWeights = None,
) -> mx.array | tuple[mx.array, ...]:
    """h = residual + RMSNorm(x) * weight, times `scale` ([1], e.g. layer_scalar) when given;
    with `next_weight`, (h, RMSNorm(h) * next_weight); with a tuple of next weights, (h, then
    RMSNorm(h) times each)."""
    h = residual + mx.fast.rms_norm(x, weight, eps)
    h = h if scale is None else h * scale
    if next_weight is None:
        return h
    return h, *(mx.fast.rms_norm(h, w, eps) for w in _as_tuple(next_weight))


def next_norm_operands(next_weight: NextWeights) -> tuple[tuple[mx.array, ...], tuple[str, ...], tuple[str, ...]]:
    """(the next norms' weights, their input names, their normed outputs' names), as the bodies
    that end a sub-block (here and qmv.metal's NORM_RESIDUAL) declare them. Only the next norms
    asked for are inputs and outputs: each one costs the host time per call."""
    next_weights = _as_tuple(next_weight)
    count = len(next_weights)
    if count > MAX_NEXT_NORMS:
        raise ValueError(f"a sub-block's end writes at most {MAX_NEXT_NORMS} next norms, got {count}")
    return next_weights, ("next_w", "next_w_2", "next_w_3")[:count], ("normed", "normed_2", "normed_3")[:count]


def _threads(N: int) -> int:
    # About 8 elements a thread, whole simdgroups, at most 1024 threads.
    return min(1024, max(32, round_up(N // 8, 32)))


def _run(body: str, leading: dict[str, mx.array], weight: mx.array, residual: mx.array, scale: mx.array | None,
         eps: float, next_weight: NextWeights, template: list) -> mx.array | tuple[mx.array, ...]:
    """Launch a body of norm_residual.metal: its `leading` inputs, then w, residual, scale, the
    next norms' weights (up to MAX_NEXT_NORMS) and params; one threadgroup per row of `residual`."""
    N = residual.shape[-1]
    next_weights, next_inputs, normed = next_norm_operands(next_weight)
    count = len(next_weights)
    kernel = build(
        "norm_residual", body, (*leading, "w", "residual", "scale", *next_inputs, "params"), ("out", *normed),
        defines=(("NEXT_NORMS", count),),
    )
    threads = _threads(N)
    outputs = kernel(
        inputs=[*leading.values(), weight, residual, weight if scale is None else scale, *next_weights, scalars(eps)],
        template=[("T", residual.dtype), ("N", N), ("TG", threads), ("HAS_SCALE", scale is not None),
                  *template],
        grid=(residual.size // N * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[residual.shape] * (1 + count),
        output_dtypes=[residual.dtype] * (1 + count),
    )
    return outputs[0] if next_weight is None else tuple(outputs)


def norm_residual(
    x: mx.array, weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float,
    next_weight: NextWeights = None,
) -> mx.array | tuple[mx.array, ...]:
    N = residual.shape[-1]
    vector = residual.dtype == mx.bfloat16 and N % 8 == 0 and -(-N // _threads(N)) % 8 == 0
    weights_bf16 = all(w.dtype == mx.bfloat16 for w in (weight, *_as_tuple(next_weight)))
    template = [("VEC", vector), ("W_BF16", weights_bf16)]
    return _run("norm_residual", {"x": x}, weight, residual, scale, eps, next_weight, template)


def moe_norm_residual_ref(
    dense: mx.array, experts: mx.array, weights: mx.array, dense_weight: mx.array, experts_weight: mx.array,
    weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float, next_weight: NextWeights = None,
) -> mx.array | tuple[mx.array, ...]:
    """norm_residual_ref of RMSNorm(dense) * dense_weight + RMSNorm(mixed) * experts_weight,
    where mixed sums the experts' outputs [..., k, 1, N] (model.Experts) times their router
    weights [..., k]."""
    mixed = (experts.squeeze(-2) * weights[..., None].astype(experts.dtype)).sum(axis=-2)
    x = mx.fast.rms_norm(dense, dense_weight, eps) + mx.fast.rms_norm(mixed, experts_weight, eps)
    return norm_residual_ref(x, weight, residual, scale, eps, next_weight)


def moe_norm_residual(
    dense: mx.array, experts: mx.array, weights: mx.array, dense_weight: mx.array, experts_weight: mx.array,
    weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float, next_weight: NextWeights = None,
) -> mx.array | tuple[mx.array, ...]:
    leading = {"dense": dense, "experts": experts, "weights": weights, "dense_w": dense_weight,
               "experts_w": experts_weight}
    return _run("moe_norm_residual", leading, weight, residual, scale, eps, next_weight, [("K", weights.shape[-1])])
