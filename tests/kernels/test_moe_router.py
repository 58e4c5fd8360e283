"""moe_router kernel vs its twin: 26B-A4B's 128 experts (top 8), a ragged count, one token and
prompt rows, batch 1 and 2, logits as they are and times 26B-A4B's hidden_size^-0.5. The
kernel gives the top k in descending order, the twin in none, so both are compared sorted by
expert."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tolerances import DTYPES, random, requires_gpu

from mlx_gemma4.kernels import moe_router, moe_router_ref

pytestmark = requires_gpu


def by_expert(weights, indices):
    order = mx.argsort(indices, axis=-1)
    return np.array(mx.take_along_axis(weights, order, -1)), np.array(mx.take_along_axis(indices, order, -1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("experts,top_k", [(128, 8), (100, 3), (32, 2)])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("logit_scale", [1.0, 2816**-0.5])
def test_matches_twin(dtype, experts, top_k, length, batch, logit_scale):
    # Distinct logits (a random order of evenly spaced values): ties at the k-th place would
    # let kernel and twin pick different experts, both correctly.
    ranks = mx.argsort(mx.random.uniform(shape=(batch, length, experts), key=mx.random.key(experts + length)), -1)
    logits = (ranks.astype(mx.float32) * (6.0 / experts) - 3.0).astype(dtype)
    scale = random((experts,), dtype, seed=1) * 0.2 + 1.0
    weights, indices = moe_router(logits, scale, top_k, logit_scale)
    assert weights.dtype == mx.float32 and indices.dtype == mx.uint32
    assert weights.shape == indices.shape == (batch, length, top_k)
    kernel_weights, kernel_experts = by_expert(weights, indices)
    twin_weights, twin_experts = by_expert(*moe_router_ref(logits, scale, top_k, logit_scale))
    label = f"moe_router[{dtype} E{experts} k{top_k} L{length} B{batch} x{logit_scale:.3f}]"
    np.testing.assert_array_equal(kernel_experts, twin_experts, err_msg=label)
    np.testing.assert_allclose(kernel_weights, twin_weights, rtol=1e-5, atol=1e-6, err_msg=label)
    renormalised = np.array(weights / scale[indices].astype(mx.float32))
    assert (np.diff(renormalised, axis=-1) <= 0).all(), f"{label}: not in descending order"
    np.testing.assert_allclose(renormalised.sum(-1), 1.0, rtol=1e-5)
