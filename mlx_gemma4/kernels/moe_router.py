"""moe_router: Gemma4TextRouter after its projection in one launch (metal/moe_router.metal):
logits scaled, softmax in float32, top k, renormalise, per-expert scale."""

from __future__ import annotations

import mlx.core as mx

from ._source import build, round_up, scalars


def moe_router_ref(
    logits: mx.array, per_expert_scale: mx.array, top_k: int, logit_scale: float = 1.0
) -> tuple[mx.array, mx.array]:
    """(weights float32 [..., k], indices uint32 [..., k]) from router logits [..., E] times
    `logit_scale`; the k experts come in no set order."""
    probs = mx.softmax(logits.astype(mx.float32) * logit_scale, axis=-1)
    indices = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(probs, indices, axis=-1)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights * per_expert_scale[indices], indices


def moe_router(
    logits: mx.array, per_expert_scale: mx.array, top_k: int, logit_scale: float = 1.0
) -> tuple[mx.array, mx.array]:
    E = logits.shape[-1]
    rows = logits.size // E
    threads = round_up(E, 32)
    kernel = build("moe_router", "moe_router", ("logits", "scale", "params"), ("weights", "indices"))
    weights, indices = kernel(
        inputs=[logits, per_expert_scale, scalars(logit_scale)],
        template=[("T", logits.dtype), ("E", E), ("K", top_k), ("TG", threads)],
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(*logits.shape[:-1], top_k)] * 2,
        output_dtypes=[mx.float32, mx.uint32],
    )
    return weights, indices
