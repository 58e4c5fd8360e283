"""norm_residual and moe_norm_residual kernels vs their twins: hidden sizes of the four models
and the tiny checkpoints, with and without the layer_scalar, with no next norm, the next
sub-block's, or a MoE layer's three, decode and prefill rows; MoE with 26B-A4B's top 8 and
other k."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tolerances import DTYPES, assert_close, random, requires_gpu

from mlx_gemma4.kernels import moe_norm_residual, moe_norm_residual_ref, norm_residual, norm_residual_ref

pytestmark = requires_gpu


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 1536, 2560, 2816, 5376])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("next_norms", [0, 1, 3])
def test_matches_twin(dtype, hidden, length, batch, scaled, next_norms):
    x = random((batch, length, hidden), dtype, scale=4.0, seed=hidden)
    residual = random((batch, length, hidden), dtype, seed=hidden + 1)
    weight = random((hidden,), dtype, seed=2) * 0.5 + 1.0
    scale = mx.array([0.37], dtype=dtype) if scaled else None
    # One next norm's weight as it is; three (a MoE layer's post-attention block) as a tuple.
    next_weights = tuple(random((hidden,), dtype, seed=3 + i) * 0.5 + 1.0 for i in range(next_norms))
    next_weight = None if not next_weights else next_weights[0] if next_norms == 1 else next_weights
    outs = norm_residual(x, weight, residual, scale, 1e-6, next_weight)
    refs = norm_residual_ref(x, weight, residual, scale, 1e-6, next_weight)
    if next_weight is None:
        outs, refs = (outs,), (refs,)
    assert len(outs) == len(refs) == 1 + next_norms
    for part, out, ref in zip(("h", "normed", "normed_2", "normed_3"), outs, refs):
        assert_close(out, ref, dtype, f"norm_residual[{dtype} N{hidden} L{length} B{batch} {scaled} {part}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden,top_k", [(64, 2), (2816, 8), (1000, 3)])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("then_norm", [False, True])
def test_moe_matches_twin(dtype, hidden, top_k, length, scaled, then_norm):
    dense = random((1, length, hidden), dtype, scale=4.0, seed=hidden)
    experts = random((1, length, top_k, 1, hidden), dtype, scale=2.0, seed=hidden + 2)  # model.Experts' output
    weights = mx.softmax(random((1, length, top_k), mx.float32, seed=hidden + 3), axis=-1)
    residual = random((1, length, hidden), dtype, seed=hidden + 1)
    dense_weight, experts_weight, weight = (random((hidden,), dtype, seed=s) * 0.5 + 1.0 for s in (4, 5, 2))
    scale = mx.array([0.37], dtype=dtype) if scaled else None
    next_weight = random((hidden,), dtype, seed=3) * 0.5 + 1.0 if then_norm else None
    args = (dense, experts, weights, dense_weight, experts_weight, weight, residual, scale, 1e-6, next_weight)
    outs, refs = moe_norm_residual(*args), moe_norm_residual_ref(*args)
    # Five roundings to the dtype chain up before the output (mix, two branch norms, their sum,
    # the residual): allow the twin's own error against itself in float32, as rope_norm's test does.
    exacts = moe_norm_residual_ref(*(a.astype(mx.float32) if isinstance(a, mx.array) else a for a in args))
    if not then_norm:
        outs, refs, exacts = (outs,), (refs,), (exacts,)
    for part, out, ref, exact in zip(("h", "normed"), outs, refs, exacts):
        twin_diff = np.array(ref.astype(mx.float32), dtype=np.float64) - np.array(exact, dtype=np.float64)
        twin_error = float(np.abs(twin_diff).max())
        twin_nmse = float((twin_diff**2).sum() / (np.array(exact, dtype=np.float64) ** 2).sum())
        assert_close(out, ref, dtype, f"moe_norm_residual[{dtype} N{hidden} k{top_k} L{length} {scaled} {part}]",
                     extra_atol=2 * twin_error, extra_nmse=4 * twin_nmse)
