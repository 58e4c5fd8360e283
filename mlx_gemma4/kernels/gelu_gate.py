"""gelu_gate: gelu_tanh(gate) * up in one launch (metal/gelu_gate.metal), reading gate and up in
place: the halves of the MLP's fused gate|up output, or the PLE gate and the layer's slice of
the per-layer inputs. The matmuls around it stay MLX ops (quantized or not)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ._source import build, round_up

THREADS = 256


@partial(mx.compile, shapeless=True)
def gelu_gate_ref(gate: mx.array, up: mx.array) -> mx.array:
    """gelu_pytorch_tanh(gate) * up, in float32: torch rounds GELU once, not after every op.
    gate, up [..., N] of one shape; returns [..., N] in up's dtype."""
    return (nn.gelu_approx(gate.astype(mx.float32)) * up.astype(mx.float32)).astype(up.dtype)


def gelu_gate(gate: mx.array, up: mx.array) -> mx.array:
    N = gate.shape[-1]
    rows = gate.size // N
    threads = min(THREADS, round_up(N, 32))
    kernel = build("gelu_gate", "gelu_gate", ("gate", "up"), ("out",), contiguous=False)
    (out,) = kernel(
        inputs=[gate, up],
        template=[("T", up.dtype), ("N", N), ("NDIM", gate.ndim)],
        grid=(round_up(N, threads), rows, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[gate.shape],
        output_dtypes=[up.dtype],
    )
    return out
