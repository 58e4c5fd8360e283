"""ple_inputs kernel vs its twin: E2B (35 layers) / E4B (42) / tiny (8 layers, P 8) geometry,
decode and prefill (incl. a length that is not a multiple of 32), batch 1 and 2."""

from __future__ import annotations

import pytest
from tolerances import DTYPES, assert_close, random, requires_gpu

from mlx_gemma4.kernels import ple_inputs, ple_inputs_ref

pytestmark = requires_gpu


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layers,per_layer,hidden", [(35, 256, 1536), (42, 256, 2560), (8, 8, 64)])
@pytest.mark.parametrize("length", [1, 37, 128])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_twin(dtype, layers, per_layer, hidden, length, batch):
    shape = (batch, length, layers * per_layer)
    tokens = random(shape, dtype, scale=0.05, seed=length)  # table rows are small; sqrt(P) scales them
    context = random(shape, dtype, scale=hidden**0.5, seed=length + 1)
    weight = random((per_layer,), dtype, seed=3) * 0.5 + 1.0
    out = ple_inputs(tokens, context, weight, hidden, 1e-6)
    ref = ple_inputs_ref(tokens, context, weight, hidden, 1e-6)
    assert_close(out, ref, dtype, f"ple_inputs[{dtype} N{layers} P{per_layer} L{length} B{batch}]")
