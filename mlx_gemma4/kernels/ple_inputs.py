"""ple_inputs: the per-layer-input (PLE) combine in one launch (metal/ple_inputs.metal):
(RMSNorm(context * hidden^-0.5) * weight + tokens * sqrt(P)) * 2^-0.5. The table lookup and
the projection matmul stay MLX ops (quantized or not)."""

from __future__ import annotations

import math

import mlx.core as mx

from ._source import build, scalars

ROWS_PER_TG = 4  # one simdgroup per (token, layer) row


def ple_inputs_ref(tokens: mx.array, context: mx.array, weight: mx.array, hidden_size: int, eps: float) -> mx.array:
    """Per-layer inputs [B, L, layers * P] from the gathered table rows and the projection.

    tokens: embed_tokens_per_layer rows, context: per_layer_model_projection(h), both
    [B, L, layers * P] as those produce them (layer i's columns are [i * P, (i + 1) * P));
    weight: per_layer_projection_norm.weight [P].
    """
    P = weight.shape[0]
    tokens = tokens * mx.array(math.sqrt(P), dtype=tokens.dtype)  # the table's embed scale
    # hidden^-0.5 brings the projection of the scaled embedding back to unit scale.
    context = context * mx.array(hidden_size**-0.5, dtype=context.dtype)
    context = mx.fast.rms_norm(context.reshape(*context.shape[:-1], -1, P), weight, eps).reshape(context.shape)
    return (context + tokens) * mx.array(2.0**-0.5, dtype=context.dtype)  # mix two unit-scale signals


def ple_inputs(tokens: mx.array, context: mx.array, weight: mx.array, hidden_size: int, eps: float) -> mx.array:
    P = weight.shape[0]
    rows = tokens.size // P
    kernel = build("ple_inputs", "ple_inputs", ("tokens", "context", "w", "params"), ("out",))
    groups = (rows + ROWS_PER_TG - 1) // ROWS_PER_TG
    (out,) = kernel(
        inputs=[tokens, context, weight, scalars(hidden_size**-0.5, math.sqrt(P), 2.0**-0.5, eps)],
        template=[("T", tokens.dtype), ("P", P), ("ROWS_PER_TG", ROWS_PER_TG)],
        grid=(groups * ROWS_PER_TG * 32, 1, 1),
        threadgroup=(ROWS_PER_TG * 32, 1, 1),
        output_shapes=[tokens.shape],
        output_dtypes=[tokens.dtype],
    )
    return out
