"""The twins themselves, on CPU (CI): each `_ref` against a float64 NumPy statement of the
math, and the RoPE angles the kernel reads (LayerRoPE.inv_freq) against the twin's rotation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_decode_attention import cache_steps
from test_rope_norm import LAYOUTS, fused_input, oracle

from mlx_gemma4.config import RopeConfig
from mlx_gemma4.kernels import (
    decode_attention_ref, gelu_gate_ref, moe_norm_residual_ref, moe_router_ref, norm_residual_ref, ple_inputs_ref,
    qmv_ref, qmv_supports, rope_norm_ref,
)
from mlx_gemma4.rope import LayerRoPE

EPS = 1e-6


def rms(x, w=None):
    y = x / np.sqrt((x**2).mean(-1, keepdims=True) + EPS)
    return y if w is None else y * w


def np64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


@pytest.mark.parametrize("rope", [RopeConfig("default", 10_000.0, 256), RopeConfig("proportional", 1_000_000.0, 128)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rope_norm_ref_and_inv_freq(rope, layout):
    D = 256 if rope.scheme == "default" else 512
    x, q_weight, k_weight, num_kv_heads, k_eq_v = fused_input(2, 5, D, layout, mx.float32, seed=0)
    offset = mx.array([7, 600], dtype=mx.int32)
    layer_rope = LayerRoPE(rope, D)
    pairs = rope.rotated_dims // 2
    inv = np.zeros(D // 2)
    inv[:pairs] = rope.theta ** (-np.arange(0, 2 * pairs, 2) / D)  # exponents over the full D
    # What the kernel reads: float32 value + remainder, together inv_freq to float64 precision.
    np.testing.assert_allclose(np.array(layer_rope.inv_freq, dtype=np.float64).sum(0), inv, rtol=1e-13)
    outs = rope_norm_ref(x, q_weight, k_weight, offset, layer_rope, EPS, num_kv_heads, k_eq_v)
    expected = oracle(x, q_weight, k_weight, offset, rope, num_kv_heads, k_eq_v)
    assert [o is None for o in outs] == [False] + [num_kv_heads == 0] * 2
    for out, exact in zip(outs, expected):
        np.testing.assert_allclose(np64(out), exact, atol=2e-4, rtol=1e-4)


def test_norm_residual_ref():
    x, r = mx.random.normal((2, 3, 64), key=mx.random.key(2)), mx.random.normal((2, 3, 64), key=mx.random.key(3))
    w, s = mx.random.uniform(0.5, 1.5, (64,), key=mx.random.key(4)), mx.array([0.3])
    np.testing.assert_allclose(np64(norm_residual_ref(x, w, r, s, EPS)), (np64(r) + rms(np64(x), np64(w))) * 0.3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(norm_residual_ref(x, w, r, None, EPS)), np64(r) + rms(np64(x), np64(w)), rtol=1e-5, atol=1e-6)
    next_w = mx.random.uniform(0.5, 1.5, (64,), key=mx.random.key(5))
    h, normed = norm_residual_ref(x, w, r, s, EPS, next_w)
    expected = (np64(r) + rms(np64(x), np64(w))) * 0.3
    np.testing.assert_allclose(np64(h), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(normed), rms(expected, np64(next_w)), rtol=1e-5, atol=1e-5)
    # A MoE layer's post-attention block: one normed output per next weight, in order.
    next_ws = tuple(mx.random.uniform(0.5, 1.5, (64,), key=mx.random.key(k)) for k in (6, 7, 8))
    h, *normeds = norm_residual_ref(x, w, r, s, EPS, next_ws)
    np.testing.assert_allclose(np64(h), expected, rtol=1e-5, atol=1e-6)
    assert len(normeds) == 3
    for normed, weight in zip(normeds, next_ws):
        np.testing.assert_allclose(np64(normed), rms(expected, np64(weight)), rtol=1e-5, atol=1e-5)


def test_ple_inputs_ref():
    shape = (2, 3, 4 * 16)  # 4 layers of 16
    tokens, context = mx.random.normal(shape, key=mx.random.key(5)), mx.random.normal(shape, key=mx.random.key(6)) * 8
    w = mx.random.uniform(0.5, 1.5, (16,), key=mx.random.key(7))
    out = np64(ple_inputs_ref(tokens, context, w, 64, EPS))
    context_rows = np64(context).reshape(2, 3, 4, 16) * 64**-0.5
    expected = (rms(context_rows, np64(w)).reshape(shape) + np64(tokens) * 4.0) * 2**-0.5
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_gelu_gate_ref():
    """Separate gate and up, the halves of one gate|up array, and a layer's columns of a wider up."""
    gate_up = mx.random.normal((2, 3, 64), key=mx.random.key(8)) * 3
    x, up = np64(gate_up[..., :32]), np64(gate_up[..., 32:])
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))) * up
    wide_up = mx.concatenate([mx.zeros((2, 3, 16)), gate_up[..., 32:], mx.zeros((2, 3, 8))], axis=-1)
    for args in [(gate_up[..., :32], gate_up[..., 32:]), (gate_up,), (gate_up[..., :32], wide_up, 16)]:
        np.testing.assert_allclose(np64(gelu_gate_ref(*args)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not cover"):
        gelu_gate_ref(gate_up[..., :32], wide_up, 32)


def test_chosen_gelu_gate_takes_the_twin_only_for_separate_decode_operands():
    """KERNELS.gelu_gate: the twin for separate gate and up of fewer than PROMPT_ROWS rows; the
    kernel from PROMPT_ROWS rows, and for halves or columns read in place at any size."""
    from mlx_gemma4.kernels import KERNELS, PROMPT_ROWS, gpu_backend

    small = mx.random.normal((1, PROMPT_ROWS - 1, 64), key=mx.random.key(9))
    assert mx.array_equal(KERNELS.gelu_gate(small, small), gelu_gate_ref(small, small))
    large = mx.random.normal((1, PROMPT_ROWS, 64), key=mx.random.key(10))
    for args in [(large, large), (small,), (small[..., :16], small, 16)]:
        if gpu_backend() is None:  # the kernel needs a GPU back end: reaching it raises here
            with pytest.raises(RuntimeError, match="Metal or CUDA"):
                KERNELS.gelu_gate(*args)
        else:
            np.testing.assert_allclose(np64(KERNELS.gelu_gate(*args)), np64(gelu_gate_ref(*args)), atol=1e-5)


@pytest.mark.parametrize("kind", ["sliding", "full"])
@pytest.mark.parametrize("queries", [1, 4])
def test_decode_attention_ref_on_cache_masks(kind, queries):
    """The twin (and so the kernel's oracle) with the caches' masks, wrapped ring included."""
    for offset, mask, keys, values in cache_steps(kind, 2, 2, 32, mx.float32, queries):
        q = mx.random.normal((2, 4, queries, 32), key=mx.random.key(offset)) * 0.5
        out = np64(decode_attention_ref(q, keys, values, mask))
        k = np.repeat(np64(keys), 2, axis=1)
        v = np.repeat(np64(values), 2, axis=1)
        scores = np64(q) @ k.transpose(0, 1, 3, 2)
        S = k.shape[2]
        if isinstance(mask, str):
            visible = np.arange(S)[None, :] <= np.arange(S - queries, S)[:, None]
        elif mask is None:
            visible = np.ones((queries, S), bool)
        else:
            visible = np.array(mask)
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        expected = (p / p.sum(-1, keepdims=True)) @ v  # [B, Hq, Lq, D] -> [B, Lq, Hq * D]
        np.testing.assert_allclose(out, expected.transpose(0, 2, 1, 3).reshape(2, queries, -1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_qmv_ref_unpacks_low_bits_first(bits):
    """What the kernel assumes of MLX's affine layout: value j of a row sits in word j * bits / 32,
    from bit (j * bits) % 32, and stands for scale * q + bias of its group of 64."""
    K, N = 256, 6
    w, scales, biases = mx.quantize(mx.random.normal((N, K), key=mx.random.key(10)), group_size=64, bits=bits)
    words = np.array(w).astype(np.uint64)
    j = np.arange(K, dtype=np.uint64)
    q = (words[:, (j * bits // 32).astype(int)] >> ((j * bits) % 32)) & np.uint64((1 << bits) - 1)
    dequantized = q * np.repeat(np64(scales), 64, axis=1) + np.repeat(np64(biases), 64, axis=1)
    x = mx.random.normal((2, K), key=mx.random.key(11))
    np.testing.assert_allclose(np64(qmv_ref(x, w, scales, biases, 64, bits)), np64(x) @ dequantized.T, rtol=1e-4, atol=1e-4)


def test_chosen_quantized_matmul_takes_mlx_outside_the_kernels_shapes():
    """The dispatch by rows keeps MLX's product for small weights, layouts qmv lacks and, where
    qmm's tiles do not run, prompt chunks."""
    from mlx_gemma4.kernels import MAX_DECODE_QUERIES, QMV_MIN_WEIGHTS, _quantized_matmul_by_rows
    from mlx_gemma4.kernels._source import runs_mma_tiles

    def quantized(N, K, bits):
        return mx.quantize(mx.random.normal((N, K), key=mx.random.key(12)), group_size=64, bits=bits)

    big = quantized(QMV_MIN_WEIGHTS // 128, 128, 4)
    prompt = mx.random.normal((1, MAX_DECODE_QUERIES + 1, 128), key=mx.random.key(13))
    token = prompt[:, :1]
    # Calling the kernel on CPU raises, so equal results show the twin was taken.
    if not runs_mma_tiles():
        bf16_prompt = prompt.astype(mx.bfloat16)
        assert mx.array_equal(_quantized_matmul_by_rows(bf16_prompt, *big, 64, 4), qmv_ref(bf16_prompt, *big, 64, 4))
    assert mx.array_equal(_quantized_matmul_by_rows(prompt, *big, 64, 4), qmv_ref(prompt, *big, 64, 4))
    small = quantized(32, 128, 4)
    assert mx.array_equal(_quantized_matmul_by_rows(token, *small, 64, 4), qmv_ref(token, *small, 64, 4))
    three_bit = quantized(QMV_MIN_WEIGHTS // 128, 128, 3)
    assert mx.array_equal(_quantized_matmul_by_rows(token, *three_bit, 64, 3), qmv_ref(token, *three_bit, 64, 3))
    w, _, biases = small
    assert qmv_supports(token, w, biases, 64, 4) and qmv_supports(token, w, biases, 32, 8)
    assert not qmv_supports(token, w, biases, 64, 3) and not qmv_supports(token, w, biases, 16, 4)
    assert not qmv_supports(token, w, None, 64, 4)


def test_chosen_full_decode_attention_takes_the_twin_past_its_head_keys():
    """KERNELS.full_decode_attention: the kernel up to FULL_KERNEL_MAX_HEAD_KEYS query heads x
    keys (each query head reads its group's K/V), the twin past it."""
    from mlx_gemma4.kernels import FULL_KERNEL_MAX_HEAD_KEYS, KERNELS, gpu_backend

    def operands(keys):
        q = mx.random.normal((1, 8, 1, 32), key=mx.random.key(14)) * 0.3
        kv = mx.random.normal((1, 2, keys, 32), key=mx.random.key(15))
        return q, kv, kv, None

    past = operands(FULL_KERNEL_MAX_HEAD_KEYS // 8 + 1)
    assert mx.array_equal(KERNELS.full_decode_attention(*past), decode_attention_ref(*past))
    within = operands(FULL_KERNEL_MAX_HEAD_KEYS // 8)
    if gpu_backend() is None:  # the kernel needs a GPU back end: reaching it raises here
        with pytest.raises(RuntimeError, match="Metal or CUDA"):
            KERNELS.full_decode_attention(*within)
    else:
        np.testing.assert_allclose(np64(KERNELS.full_decode_attention(*within)), np64(decode_attention_ref(*within)),
                                   atol=1e-4)


def test_moe_router_ref():
    """Logits scaled, softmax in float32, the top k by probability, renormalised, times each
    expert's scale."""
    logits = mx.random.normal((2, 3, 16), key=mx.random.key(16)) * 2
    scale = mx.random.uniform(0.5, 1.5, (16,), key=mx.random.key(17))
    weights, indices = moe_router_ref(logits, scale, 4, 0.7)
    probs = np.exp(np64(logits) * 0.7)
    probs /= probs.sum(-1, keepdims=True)
    top = np.sort(np.argsort(-probs, axis=-1)[..., :4], axis=-1)
    order = np.argsort(np.array(indices), axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(np.array(indices), order, -1), top)
    kept = np.take_along_axis(probs, top, -1)
    expected = kept / kept.sum(-1, keepdims=True) * np64(scale)[top]
    np.testing.assert_allclose(np.take_along_axis(np64(weights), order, -1), expected, rtol=1e-5)


def test_moe_norm_residual_ref():
    """The experts' outputs mixed by their weights, both branches normed and added, then norm_residual."""
    dense, residual = (mx.random.normal((2, 3, 64), key=mx.random.key(k)) for k in (18, 19))
    experts = mx.random.normal((2, 3, 4, 1, 64), key=mx.random.key(20))  # model.Experts' output
    weights = mx.random.uniform(0.1, 1.0, (2, 3, 4), key=mx.random.key(21))
    w1, w2, w, next_w = (mx.random.uniform(0.5, 1.5, (64,), key=mx.random.key(k)) for k in (22, 23, 24, 25))
    h, normed = moe_norm_residual_ref(dense, experts, weights, w1, w2, w, residual, mx.array([0.5]), EPS, next_w)
    mixed = (np64(experts)[..., 0, :] * np64(weights)[..., None]).sum(-2)
    expected = (np64(residual) + rms(rms(np64(dense), np64(w1)) + rms(mixed, np64(w2)), np64(w))) * 0.5
    np.testing.assert_allclose(np64(h), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np64(normed), rms(expected, np64(next_w)), rtol=1e-5, atol=1e-5)


def test_kernel_parameters_are_padded_past_mlx_small_array_pool():
    """Kernel parameter arrays keep their values first and take more than POOLED_MAX_BYTES, so
    MLX's CUDA allocator does not place them in its shared pool of host-written managed memory."""
    from mlx_gemma4.kernels._source import POOLED_MAX_BYTES, parameter_array, scalars
    from mlx_gemma4.kernels.gelu_gate import column_input

    for array, leading in ((scalars(1e-6), [1e-6]), (column_input(768), [768]),
                           (parameter_array([1.5], mx.bfloat16), [1.5]), (scalars(1, 2, 3, 4, 5), [1, 2, 3, 4, 5])):
        assert array.nbytes > POOLED_MAX_BYTES and array.ndim == 1
        np.testing.assert_allclose(np.array(array[: len(leading)].astype(mx.float32)), leading, rtol=1e-6)
        assert not np.array(array[len(leading):].astype(mx.float32)).any()


def test_gated_qmv_takes_decode_calls_its_loads_can_read():
    """gated_qmv applies to 1-8 rows of 16-byte-aligned bfloat16 operands whose gate|up halves or
    columns cover the weight's K; prompt chunks, misaligned columns and wrong widths keep two ops."""
    from mlx_gemma4.kernels import gated_qmv_supports

    w, scales, biases = mx.quantize(mx.zeros((32, 128)), group_size=64, bits=4)
    dense = mx.zeros((32, 128), dtype=mx.bfloat16)
    halves = mx.zeros((1, 1, 256), dtype=mx.bfloat16)
    gate, up = mx.zeros((1, 1, 128), dtype=mx.bfloat16), mx.zeros((1, 1, 1024), dtype=mx.bfloat16)
    assert gated_qmv_supports(halves, None, 0, w, scales, biases, 64, 4)
    assert gated_qmv_supports(halves, None, 0, dense, None, None, 0, 0)
    assert gated_qmv_supports(gate, up, 896, w, scales, biases, 64, 4)
    assert not gated_qmv_supports(mx.zeros((1, 9, 256), dtype=mx.bfloat16), None, 0, w, scales, biases, 64, 4)
    assert not gated_qmv_supports(gate, up, 900, w, scales, biases, 64, 4)  # misaligned column
    assert not gated_qmv_supports(gate, up, 960, w, scales, biases, 64, 4)  # past up's end
    assert not gated_qmv_supports(mx.zeros((1, 1, 384), dtype=mx.bfloat16), None, 0, w, scales, biases, 64, 4)
    assert not gated_qmv_supports(halves, None, 0, dense.astype(mx.float32), None, None, 0, 0)
