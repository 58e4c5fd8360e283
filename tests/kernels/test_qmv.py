"""qmv kernel vs its twin (MLX's quantized_matmul) on the decode projections of the four models,
4- and 8-bit, 1 to MAX_DECODE_QUERIES rows, and a row count N that no threadgroup divides."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tolerances import DTYPES, assert_close, random, requires_gpu

from mlx_gemma4.kernels import MAX_DECODE_QUERIES, qmv, qmv_ref

pytestmark = requires_gpu

SHAPES = [  # (K, N): E2B q|k|v and gate|up, 26B-A4B router, 31B o_proj and down_proj, a ragged N
    (1536, 2560), (1536, 12288), (2816, 128), (8192, 5376), (21504, 5376), (2560, 1003),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, MAX_DECODE_QUERIES])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_twin(dtype, bits, rows, shape):
    K, N = shape
    w, scales, biases = mx.quantize(random((N, K), dtype, scale=0.05, seed=K + N), group_size=64, bits=bits)
    x = random((1, rows, K), dtype, seed=rows)
    # The oracle: the twin on the same values in float32, rounded once (the kernel sums in float32;
    # MLX's own float16 product drifts further at K 21504).
    f32 = mx.float32
    oracle = qmv_ref(x.astype(f32), w, scales.astype(f32), biases.astype(f32), 64, bits).astype(dtype)
    # Float32 sums of K products taken in another order differ by up to ~K ulps of the partial sums.
    assert_close(
        qmv(x, w, scales, biases, 64, bits), oracle, dtype, f"qmv[{dtype} {bits}-bit K{K} N{N} M{rows}]", extra_atol=K * 2e-8
    )
