"""qmm kernel (prompt chunks on the tensor cores) vs its oracle: x times w dequantized and rounded
to x's dtype, as the kernel multiplies them, summed in float32. 16-bit x, 4- and 8-bit w in groups
of 32, 64 and 128; row counts that fill no 128-row tile and N that fills no 128-column tile."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tolerances import assert_close, random, requires_gpu

from mlx_gemma4.kernels import qmm, qmm_supports

CASES = [  # (dtype, bits, group size): one build each
    (mx.bfloat16, 4, 64), (mx.bfloat16, 8, 64), (mx.float16, 4, 32), (mx.bfloat16, 4, 128),
]
SHAPES = [  # (rows, K, N): E2B q|k|v at a full tile, the 31B's o_proj rows at p=128 over a ragged N, more
    (128, 1536, 2560), (127, 8192, 1003), (200, 2048, 384), (9, 1024, 640),
]


@requires_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_the_rounded_dequantized_product(case, shape):
    dtype, bits, group_size = case
    rows, K, N = shape
    w, scales, biases = mx.quantize(random((N, K), dtype, scale=0.05, seed=K + N), group_size=group_size, bits=bits)
    x = random((1, rows, K), dtype, seed=rows)
    assert qmm_supports(x, w, biases, group_size, bits)
    f32 = mx.float32
    weights = mx.dequantize(w, scales.astype(f32), biases.astype(f32), group_size=group_size, bits=bits)
    oracle = (x.astype(f32) @ weights.astype(dtype).astype(f32).T).astype(dtype)
    out = qmm(x, w, scales, biases, group_size, bits)
    # Float32 sums of K products taken in another order differ by up to ~K ulps of the partial sums.
    assert_close(out, oracle, dtype, f"qmm[{dtype} {bits}-bit g{group_size} M{rows} K{K} N{N}]", extra_atol=K * 2e-8)


def test_supports_only_what_the_kernel_reads():
    w, scales, biases = mx.quantize(random((64, 256), mx.bfloat16, seed=1), group_size=64, bits=4)
    x = random((1, 16, 256), mx.bfloat16, seed=2)
    assert qmm_supports(x, w, biases, 64, 4)
    assert not qmm_supports(x.astype(mx.float32), w, biases, 64, 4)  # the tensor cores take 16-bit x
    assert not qmm_supports(x, w, None, 64, 4)
    assert not qmm_supports(x, w, biases, 16, 4)  # a group shorter than a thread's run
    assert not qmm_supports(x[..., :192], w, biases, 64, 4)  # K is w's
