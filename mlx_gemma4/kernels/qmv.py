"""qmv: a quantized matrix-vector product for decode (metal/qmv.metal), with MLX's affine 4- and
8-bit layout. MLX's CUDA qmv reads 4-bit weights at 0.5-1.0 TB/s on an H100, a third of its
bf16 matrix-vector rate (bench/kernels.py), so a 4-bit decode step was no faster than bf16."""

from __future__ import annotations

import mlx.core as mx

from ._source import build

RPS = 4  # weight rows per threadgroup: they share each x load
SIMDS = 4  # simdgroups per threadgroup, splitting K (4 rows x 4 simdgroups led a sweep of 1-8 x 2-8)
SUPPORTED_BITS = (4, 8)


def qmv_ref(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int) -> mx.array:
    """x [..., K] @ dequantize(w [N, K * bits / 32]).T -> [..., N]: MLX's quantized_matmul."""
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def qmv_supports(x: mx.array, w: mx.array, biases: mx.array | None, group_size: int, bits: int) -> bool:
    """Shapes the kernel takes: affine 4/8-bit, whole 16-byte loads within one group."""
    values_per_load = 128 // bits if bits in SUPPORTED_BITS else 0
    K = x.shape[-1]
    return bool(values_per_load) and biases is not None and group_size % values_per_load == 0 and K % group_size == 0


def qmv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int) -> mx.array:
    K, N = x.shape[-1], w.shape[0]
    rows = x.size // K
    kernel = build("qmv", "qmv", ("x", "w", "scales", "biases"), ("out",))
    (out,) = kernel(
        inputs=[x, w, scales, biases],
        template=[("T", x.dtype), ("M", rows), ("BITS", bits), ("GROUP", group_size), ("RPS", RPS), ("SIMDS", SIMDS),
                  ("X_BF16", x.dtype == mx.bfloat16)],
        grid=((N + RPS - 1) // RPS * 32 * SIMDS, 1, 1),
        threadgroup=(32 * SIMDS, 1, 1),
        output_shapes=[(*x.shape[:-1], N)],
        output_dtypes=[x.dtype],
    )
    return out
