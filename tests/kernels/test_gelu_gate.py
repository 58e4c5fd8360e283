"""gelu_gate kernel vs its twin, on the layouts the model passes: the MLP's fused gate|up output
(halves read in place), the PLE gate with one layer's columns of the per-layer inputs, the MoE
experts' gathered [B, L, k, I] rows, plain contiguous arrays, and strided views; widths of the
four models and a ragged one."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tolerances import DTYPES, assert_close, random, requires_gpu

from mlx_gemma4.kernels import gelu_gate, gelu_gate_ref

pytestmark = requires_gpu


def operands(layout, batch, length, width, dtype):
    """gelu_gate's arguments for one layout."""
    if layout == "fused halves":  # MLP: the gate|up projection's output alone
        return (random((batch, length, 2 * width), dtype, scale=2.0, seed=width),)
    if layout == "split halves":  # strided views of one buffer
        return mx.split(random((batch, length, 2 * width), dtype, scale=2.0, seed=width), 2, axis=-1)
    gate = random((batch, length, width), dtype, scale=2.0, seed=width)
    if layout == "ple columns":  # PLE: the gate output, every layer's inputs [B, L, 5 * P], layer 3's columns
        return gate, random((batch, length, 5 * width), dtype, seed=width + 1), 3 * width
    if layout == "experts":  # model.Experts: the gate|up gather's output [B, L, top_k, 1, 2I]
        return (random((batch, length, 8, 1, 2 * width), dtype, scale=2.0, seed=width),)
    return gate, random((batch, length, width), dtype, seed=width + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [100, 256, 704, 6144, 21504])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "fused halves", "split halves", "ple columns", "experts"])
def test_matches_twin(dtype, width, length, batch, layout):
    args = operands(layout, batch, length, width, dtype)
    out, ref = gelu_gate(*args), gelu_gate_ref(*args)
    assert out.shape == ref.shape == (*args[0].shape[:-1], width)
    assert_close(out, ref, dtype, f"gelu_gate[{dtype} N{width} L{length} B{batch} {layout}]")
