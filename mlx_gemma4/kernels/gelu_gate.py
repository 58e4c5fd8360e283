"""gelu_gate: gelu_tanh(gate) * up in one launch (metal/gelu_gate.metal), reading gate and up in
place, so the step needs no split or slice node first: the halves of the MLP's fused gate|up
output, the PLE gate with its layer's columns of the per-layer inputs, or the MoE experts'
gate and up. The matmuls around it stay MLX ops (quantized or not)."""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from ._source import build, parameter_array, round_up

THREADS = 256


def _operands(gate: mx.array, up: mx.array | None, up_offset: int) -> tuple[mx.array, int, int]:
    """(up, N, up's first column): up None means gate holds the gate|up halves [..., 2N];
    otherwise N is gate's width and up's columns [up_offset, up_offset + N) are read."""
    if up is None:
        return gate, gate.shape[-1] // 2, gate.shape[-1] // 2
    if up.shape[:-1] != gate.shape[:-1] or up.shape[-1] < up_offset + gate.shape[-1]:
        raise ValueError(f"gelu_gate: up {up.shape} from column {up_offset} does not cover gate {gate.shape}")
    return up, gate.shape[-1], up_offset


@functools.partial(mx.compile, shapeless=True)
def _gelu_gate_twin(gate: mx.array, up: mx.array) -> mx.array:
    # float32: torch rounds GELU once, not after every op.
    return (nn.gelu_approx(gate.astype(mx.float32)) * up.astype(mx.float32)).astype(up.dtype)


def gelu_gate_ref(gate: mx.array, up: mx.array | None = None, up_offset: int = 0) -> mx.array:
    """gelu_pytorch_tanh(gate) * up, rounded once to up's dtype; returns [..., N].

    gate [..., N] with up [..., >= up_offset + N] of the same leading shape (its columns from
    up_offset are used), or gate [..., 2N] alone: its two halves are gate and up.
    """
    up, N, column = _operands(gate, up, up_offset)
    if up.shape[-1] != N:
        gate, up = gate[..., :N], up[..., column : column + N]
    return _gelu_gate_twin(gate, up)


@functools.lru_cache(maxsize=256)
def column_input(offset: int) -> mx.array:
    # A runtime input rather than a template: one compiled kernel serves every layer's columns.
    return parameter_array([offset], mx.int32)


def gelu_gate(gate: mx.array, up: mx.array | None = None, up_offset: int = 0) -> mx.array:
    up, N, column = _operands(gate, up, up_offset)
    rows = gate.size // gate.shape[-1]
    threads = min(THREADS, round_up(N, 32))
    kernel = build("gelu_gate", "gelu_gate", ("gate", "up", "up_column"), ("out",), contiguous=False)
    (out,) = kernel(
        inputs=[gate, up, column_input(column)],
        template=[("T", up.dtype), ("N", N), ("NDIM", gate.ndim)],
        grid=(round_up(N, threads), rows, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(*gate.shape[:-1], N)],
        output_dtypes=[up.dtype],
    )
    return out
