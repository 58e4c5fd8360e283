"""gelu_gate kernel vs its twin, on the layouts the model passes: the halves of the MLP's fused
gate|up output, the PLE gate with one layer's slice of the per-layer inputs, the MoE experts'
gathered [B, L, k, I] rows, and plain contiguous arrays; widths of the four models and a ragged one."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tolerances import DTYPES, assert_close, random, requires_gpu

from mlx_gemma4.kernels import gelu_gate, gelu_gate_ref

pytestmark = requires_gpu


def operands(layout, batch, length, width, dtype):
    if layout == "fused halves":  # MLP: mx.split of the gate|up projection, strided views
        gate, up = mx.split(random((batch, length, 2 * width), dtype, scale=2.0, seed=width), 2, axis=-1)
    elif layout == "ple slice":  # PLE: the gate output and per_layer_inputs[:, :, layer]
        gate = random((batch, length, width), dtype, scale=2.0, seed=width)
        up = random((batch, length, 5, width), dtype, seed=width + 1)[:, :, 3]
    elif layout == "experts":  # SwitchGLU: [B, L, top_k, I]
        gate = random((batch, length, 8, width), dtype, scale=2.0, seed=width)
        up = random((batch, length, 8, width), dtype, seed=width + 1)
    else:
        gate = random((batch, length, width), dtype, scale=2.0, seed=width)
        up = random((batch, length, width), dtype, seed=width + 1)
    return gate, up


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [100, 256, 704, 6144, 21504])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "fused halves", "ple slice", "experts"])
def test_matches_twin(dtype, width, length, batch, layout):
    gate, up = operands(layout, batch, length, width, dtype)
    out, ref = gelu_gate(gate, up), gelu_gate_ref(gate, up)
    assert_close(out, ref, dtype, f"gelu_gate[{dtype} N{width} L{length} B{batch} {layout}]")
