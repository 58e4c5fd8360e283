"""qmm kernel (prompt chunks on the tensor cores) vs its oracle: x times w dequantized and rounded
to x's dtype, as the kernel multiplies them, summed in float32. 16-bit x, 4- and 8-bit w in groups
of 32, 64 and 128; row counts that fill no 128-row tile and N that fills no 128-column tile."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
from tolerances import assert_close, random, requires_gpu

from mlx_gemma4.kernels import qmm, qmm_supports
from mlx_gemma4.kernels.qmm import qmm_in_splits

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
    check_against_the_oracle(case, shape, splits=None)


# Splits of K: 16 steps in 2 and 3 (uneven), a split starting inside a group of 128.
@requires_gpu
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("shape", [(128, 1024, 640), (9, 8192, 1003)], ids=str)
@pytest.mark.parametrize("case", [(mx.bfloat16, 4, 128), (mx.float16, 8, 32)], ids=str)
def test_split_k_matches_the_rounded_dequantized_product(case, shape, splits):
    check_against_the_oracle(case, shape, splits)


def check_against_the_oracle(case, shape, splits):
    dtype, bits, group_size = case
    rows, K, N = shape
    w, scales, biases = mx.quantize(random((N, K), dtype, scale=0.05, seed=K + N), group_size=group_size, bits=bits)
    x = random((1, rows, K), dtype, seed=rows)
    assert qmm_supports(x, w, biases, group_size, bits)
    f32 = mx.float32
    weights = mx.dequantize(w, scales.astype(f32), biases.astype(f32), group_size=group_size, bits=bits)
    oracle = (x.astype(f32) @ weights.astype(dtype).astype(f32).T).astype(dtype)
    out = (qmm(x, w, scales, biases, group_size, bits) if splits is None
           else qmm_in_splits(x, w, scales, biases, group_size, bits, splits))
    assert out.shape == oracle.shape and out.dtype == dtype
    # Float32 sums of K products taken in another order differ by up to ~K ulps of the partial sums.
    assert_close(out, oracle, dtype, f"qmm[{dtype} {bits}-bit g{group_size} M{rows} K{K} N{N} splits {splits}]",
                 extra_atol=K * 2e-8)


def test_k_splits_fill_the_multiprocessors_in_one_wave(monkeypatch):
    qmm_module = importlib.import_module("mlx_gemma4.kernels.qmm")
    monkeypatch.setattr(qmm_module, "multiprocessors", lambda: 132)  # an H100
    assert qmm_module.k_splits(128, 5376, 21504) == 3  # the 31B's down projection: 42 tiles
    assert qmm_module.k_splits(128, 43008, 5376) == 1  # its gate|up: 336 tiles, waves enough
    assert qmm_module.k_splits(128, 2560, 10240) == 6  # E4B's down: 20 tiles
    assert qmm_module.k_splits(128, 640, 2048) == 4  # 5 tiles, but each split keeps 8 steps
    assert qmm_module.k_splits(512, 640, 8192) == 6  # 20 tiles over 4 row tiles
    monkeypatch.setattr(qmm_module, "multiprocessors", lambda: 0)  # no driver to ask
    assert qmm_module.k_splits(128, 5376, 21504) == 1


def test_supports_only_what_the_kernel_reads():
    w, scales, biases = mx.quantize(random((64, 256), mx.bfloat16, seed=1), group_size=64, bits=4)
    x = random((1, 16, 256), mx.bfloat16, seed=2)
    assert qmm_supports(x, w, biases, 64, 4)
    assert not qmm_supports(x.astype(mx.float32), w, biases, 64, 4)  # the tensor cores take 16-bit x
    assert not qmm_supports(x, w, None, 64, 4)
    assert not qmm_supports(x, w, biases, 16, 4)  # a group shorter than a thread's run
    assert not qmm_supports(x[..., :192], w, biases, 64, 4)  # K is w's
