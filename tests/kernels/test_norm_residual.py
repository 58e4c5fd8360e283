"""norm_residual kernel vs its twin: hidden sizes of the four models and the tiny checkpoints,
with and without the layer_scalar, with and without the next sub-block's norm, decode and
prefill rows."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tolerances import DTYPES, assert_close, random, requires_gpu

from mlx_gemma4.kernels import norm_residual, norm_residual_ref

pytestmark = requires_gpu


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 1536, 2560, 2816, 5376])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("then_norm", [False, True])
def test_matches_twin(dtype, hidden, length, batch, scaled, then_norm):
    x = random((batch, length, hidden), dtype, scale=4.0, seed=hidden)
    residual = random((batch, length, hidden), dtype, seed=hidden + 1)
    weight = random((hidden,), dtype, seed=2) * 0.5 + 1.0
    scale = mx.array([0.37], dtype=dtype) if scaled else None
    next_weight = random((hidden,), dtype, seed=3) * 0.5 + 1.0 if then_norm else None
    outs = norm_residual(x, weight, residual, scale, 1e-6, next_weight)
    refs = norm_residual_ref(x, weight, residual, scale, 1e-6, next_weight)
    if not then_norm:
        outs, refs = (outs,), (refs,)
    assert len(outs) == len(refs)
    for part, out, ref in zip(("h", "normed"), outs, refs):
        assert_close(out, ref, dtype, f"norm_residual[{dtype} N{hidden} L{length} B{batch} {scaled} {part}]")
