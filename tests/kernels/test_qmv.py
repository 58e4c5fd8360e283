"""qmv kernel vs its twin (MLX's quantized_matmul) on the decode projections of the four models,
4- and 8-bit, 1 to MAX_DECODE_QUERIES rows, and a row count N that no threadgroup divides; its
GATED build (gelu_gate made as x is loaded) on quantized and 16-bit dense weights, and both
builds ending the sub-block with norm_residual (NORM_RESIDUAL), and attention's q|k|v projection
with its rope_norm (ROPE_NORM), and a feed-forward end with the PLE gate after it (THEN_QMV), of
a gated x or of x as it is; and the gate|up projection leaving through gelu_gate (GELU_HALVES)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import pytest
from test_rope_norm import LAYOUTS, QUERY_HEADS, ROPES
from tolerances import DTYPES, assert_close, random, requires_gpu, run_and_replayed

from mlx_gemma4.kernels import (
    MAX_DECODE_QUERIES, gated_qmv, gated_qmv_norm_residual, gated_qmv_norm_residual_qmv,
    gated_qmv_norm_residual_qmv_supports, gated_qmv_ref, gated_qmv_supports, gelu_gate_ref,
    norm_residual_ref, qmv, qmv_gelu, qmv_gelu_supports, qmv_norm_residual, qmv_norm_residual_qmv,
    qmv_norm_residual_qmv_supports, qmv_norm_residual_supports, qmv_ref, qmv_rope_norm, qmv_rope_norm_supports,
    rope_norm,
)
from mlx_gemma4.rope import LayerRoPE

pytestmark = requires_gpu

SHAPES = [  # (K, N): E2B q|k|v and gate|up, 26B-A4B router, 31B o_proj and down_proj, a ragged N
    (1536, 2560), (1536, 12288), (2816, 128), (8192, 5376), (21504, 5376), (2560, 1003),
]


def over_quantized_decode_calls(shapes):
    """Parametrizes a test over every dtype, 4 and 8 bits, 1 to MAX_DECODE_QUERIES rows and `shapes`."""
    def parametrized(test):
        for name, values in (("shape", shapes), ("rows", [1, 3, MAX_DECODE_QUERIES]), ("bits", [4, 8]),
                             ("dtype", DTYPES)):
            test = pytest.mark.parametrize(name, values, ids=str)(test)
        return test
    return parametrized


@over_quantized_decode_calls(SHAPES)
def test_matches_twin(dtype, bits, rows, shape):
    K, N = shape
    x, operands, oracle = quantized_case(dtype, bits, rows, K, N)
    # Float32 sums of K products taken in another order differ by up to ~K ulps of the partial sums.
    assert_close(qmv(x, *operands), oracle, dtype, f"qmv[{dtype} {bits}-bit K{K} N{N} M{rows}]", extra_atol=K * 2e-8)


def quantized_case(dtype, bits: int, rows: int, K: int, N: int) -> tuple:
    """(x [1, rows, K], qmv's operands for a quantized [N, K] weight, the oracle x @ w.T: the twin on
    the same values in float32, rounded once (the kernel sums in float32; MLX's own float16
    product drifts further at K 21504))."""
    w, scales, biases = mx.quantize(random((N, K), dtype, scale=0.05, seed=K + N), group_size=64, bits=bits)
    x = random((1, rows, K), dtype, seed=rows)
    f32 = mx.float32
    oracle = qmv_ref(x.astype(f32), w, scales.astype(f32), biases.astype(f32), 64, bits).astype(dtype)
    return x, (w, scales, biases, 64, bits), oracle


# (K, N): the gate|up projections of E4B and E2B (its KV-shared layers' double width), a small one.
GELU_SHAPES = [(2560, 20480), (1536, 24576), (512, 1000)]


@over_quantized_decode_calls(GELU_SHAPES)
def test_gelu_halves_match_gelu_gate_of_the_product(dtype, bits, rows, shape):
    """qmv_gelu = gelu_gate of the product's gate and up halves, the product rounded to dtype first."""
    K, N = shape
    x, operands, product = quantized_case(dtype, bits, rows, K, N)
    assert qmv_gelu_supports(x, *operands)
    got = qmv_gelu(x, *operands)
    assert got.shape == (1, rows, N // 2)
    assert_close(got, gelu_gate_ref(product), dtype, f"qmv_gelu[{dtype} {bits}-bit K{K} N{N} M{rows}]",
                 extra_atol=K * 2e-8)


GATED_SHAPES = [  # (K, N, up columns, up's first column): E2B's down (the gate|up halves, up None) and PLE
    # projection (its layer's 256 columns of 35 layers'), the 31B's down, a ragged N
    (6144, 1536, None, None), (256, 1536, 35 * 256, 34 * 256), (21504, 5376, None, None), (512, 1003, 1024, 512),
]


def gated_operands(dtype, bits: int, rows: int, shape) -> tuple:
    """gated_qmv's operands (gate, up, up_offset, w, scales, biases, group size, bits) for a
    GATED_SHAPES entry: a quantized weight, or (bits 16) a dense one of dtype."""
    K, N, up_columns, up_offset = shape
    weight = random((N, K), dtype if bits == 16 else mx.float32, scale=0.05, seed=K + N)
    if bits == 16:
        w, scales, biases = weight, None, None
    else:
        w, scales, biases = mx.quantize(weight.astype(dtype), group_size=64, bits=bits)
    gate = random((1, rows, K if up_columns else 2 * K), dtype, seed=rows)
    up = random((1, rows, up_columns), dtype, seed=rows + 1) if up_columns else None
    return gate, up, up_offset or 0, w, scales, biases, 64, bits


# Dense weights of 16 bits only: a float32 model's projections keep MLX's product.
GATED_KINDS = [(dtype, bits) for dtype in DTYPES for bits in (4, 8, 16) if not (bits == 16 and dtype == mx.float32)]


@pytest.mark.parametrize("dtype,bits", GATED_KINDS, ids=str)
@pytest.mark.parametrize("rows", [1, 3, MAX_DECODE_QUERIES])
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=str)
def test_gated_matches_twin(dtype, bits, rows, shape):
    """gated_qmv = gelu_gate then the product, quantized or (bits 16) a 16-bit dense weight."""
    K, N, _, up_offset = shape
    operands = gated_operands(dtype, bits, rows, shape)
    gate, up, _, w, scales, biases, _, _ = operands
    assert gated_qmv_supports(*operands)
    # The oracle: the gated input rounded to dtype (as gelu_gate's output), then the product in float32.
    f32 = mx.float32
    hidden = gelu_gate_ref(gate, up, up_offset or 0).astype(f32)
    if bits == 16:
        oracle = hidden @ w.astype(f32).T
    else:
        oracle = qmv_ref(hidden, w, scales.astype(f32), biases.astype(f32), 64, bits)
    assert_close(
        gated_qmv(*operands), oracle.astype(dtype), dtype, f"gated_qmv[{dtype} {bits}-bit K{K} N{N} M{rows}]",
        extra_atol=K * 2e-8,
    )


NORM_RESIDUAL_KINDS = [(mx.bfloat16, 16), (mx.bfloat16, 4), (mx.float16, 8), (mx.float32, 4)]
# The sub-block ends: plain (the MLP's down in a PLE layer), layer_scalar and the next norm (the
# PLE projection), the MoE layer's three next norms after o_proj.
ENDS = {"plain": (False, 0), "scaled_next_norm": (True, 1), "three_next_norms": (False, 3)}


def norm_residual_cases(shapes) -> list:
    """(dtype, bits, rows, shape, ends): each kind on each shape, the row counts and ends taken in
    turn; every case is a build of its own, and each takes seconds to compile."""
    kinds_on_shapes = [(kind, shape) for kind in NORM_RESIDUAL_KINDS for shape in shapes]
    return [
        pytest.param(dtype, bits, (1, 3)[i % 2], shape, list(ENDS)[i % len(ENDS)],
                     id=f"{dtype}-{bits}-{(1, 3)[i % 2]}-{shape}-{list(ENDS)[i % len(ENDS)]}")
        for i, ((dtype, bits), shape) in enumerate(kinds_on_shapes)
    ]


def sub_block_end(dtype, rows: int, N: int, ends: str) -> tuple:
    """norm_residual's (weight, residual, scale, next_weight) for an ENDS entry."""
    scaled, next_norms = ENDS[ends]
    residual = random((1, rows, N), dtype, seed=5)
    weight = random((N,), dtype, seed=6)
    scale = mx.array([0.7], dtype) if scaled else None
    next_weights = tuple(random((N,), dtype, seed=7 + i) for i in range(next_norms))
    return weight, residual, scale, next_weights[0] if next_norms == 1 else next_weights or None


def assert_ends_sub_block(fused, product: mx.array, end: tuple, dtype, label: str, replayed: bool = False) -> None:
    """fused(*end) = norm_residual_ref(product, *end); with `replayed` (one row, as each trace
    compiles for seconds), also replayed from a trace, twice: its counter is 0 after each launch."""
    expected = norm_residual_ref(product, *end[:3], 1e-6, end[3])
    expected = expected if isinstance(expected, tuple) else (expected,)
    call = partial(fused, *end[:3], 1e-6, end[3])
    for out in run_and_replayed(call, replayed):
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(expected)
        for name, got, want in zip(("out", "normed", "normed_2", "normed_3"), out, expected):
            assert_close(got, want, dtype, f"{label} {name}")


@pytest.mark.parametrize("dtype,bits,rows,shape,ends", norm_residual_cases(GATED_SHAPES))
def test_gated_norm_residual_matches_the_product_through_norm_residual(dtype, bits, rows, shape, ends):
    """gated_qmv_norm_residual = norm_residual of gated_qmv's product: on CUDA one launch whose
    last threadgroup norms the rows."""
    N = shape[1]
    operands = gated_operands(dtype, bits, rows, shape)
    assert_ends_sub_block(partial(gated_qmv_norm_residual, *operands), gated_qmv(*operands),
                          sub_block_end(dtype, rows, N, ends), dtype,
                          f"gated_qmv_norm_residual[{dtype} {bits}-bit N{N} M{rows} {ends}]", replayed=rows == 1)


# (K, N): E2B's and the 31B's o_proj, a ragged N.
PLAIN_SHAPES = [(2048, 1536), (16384, 5376), (512, 1003)]


def projection_case(dtype, bits: int, rows: int, K: int, N: int) -> tuple:
    """(x [1, rows, K], qmv's operands for an [N, K] weight, x @ w.T as the oracle): the weight
    quantized, or (bits 16) dense in dtype with the product in float32, rounded once."""
    weight = random((N, K), dtype, scale=0.05, seed=K + N)
    x = random((1, rows, K), dtype, seed=rows)
    if bits == 16:
        return x, (weight, None, None, 0, 0), (x.astype(mx.float32) @ weight.astype(mx.float32).T).astype(dtype)
    operands = (*mx.quantize(weight, group_size=64, bits=bits), 64, bits)
    return x, operands, qmv(x, *operands)


@pytest.mark.parametrize("dtype,bits,rows,shape,ends", norm_residual_cases(PLAIN_SHAPES))
def test_norm_residual_matches_the_product_through_norm_residual(dtype, bits, rows, shape, ends):
    """qmv_norm_residual = norm_residual of x @ w.T (quantized, or a 16-bit dense w), as
    attention's o_proj ends its sub-block."""
    K, N = shape
    x, operands, product = projection_case(dtype, bits, rows, K, N)
    assert qmv_norm_residual_supports(x, *operands)
    assert_ends_sub_block(partial(qmv_norm_residual, x, *operands), product, sub_block_end(dtype, rows, N, ends),
                          dtype, f"qmv_norm_residual[{dtype} {bits}-bit K{K} N{N} M{rows} {ends}]", replayed=rows == 1)


# (dtype, bits, layout, head_dim, rows): every kind, each layout, both head widths (sliding 256
# with K 1536, full 512 with K 2560), K and V into a cache slot at one row, queries alone at three.
ROPE_NORM_CASES = [
    (dtype, bits, layout, (256, 512)[i % 2], 3 if layout == "q_only" and i % 2 else 1)
    for i, ((dtype, bits), layout) in enumerate((kind, layout) for kind in NORM_RESIDUAL_KINDS for layout in LAYOUTS)
]


@pytest.mark.parametrize("dtype,bits,layout,head_dim,rows", ROPE_NORM_CASES, ids=str)
def test_rope_norm_matches_the_product_through_rope_norm(dtype, bits, layout, head_dim, rows):
    """qmv_rope_norm = rope_norm of x @ w.T: the queries, and a decode step's K and V in its cache
    slot with every other slot as it was; at one row also replayed from a trace, twice."""
    K = 1536 if head_dim == 256 else 2560
    num_kv_heads, k_eq_v = LAYOUTS[layout]
    N = (QUERY_HEADS + num_kv_heads * (1 if k_eq_v else 2)) * head_dim
    x, operands, product = projection_case(dtype, bits, rows, K, N)
    rope = LayerRoPE(ROPES[head_dim], head_dim)
    q_weight = random((head_dim,), dtype, seed=1) * 0.5 + 1.0
    k_weight = random((head_dim,), dtype, seed=2) * 0.5 + 1.0 if num_kv_heads else None
    position = mx.array([700], dtype=mx.int32)
    buffers = [random((1, num_kv_heads, 40, head_dim), dtype, seed=s) for s in (7, 8)]
    copies, pristine = [mx.array(b) for b in buffers], [mx.array(b) for b in buffers]
    mx.eval(buffers, copies, pristine)
    slot = mx.array([29], dtype=mx.int32)
    into = (*buffers, slot) if num_kv_heads else None
    args = (q_weight, k_weight, position, rope, 1e-6, num_kv_heads, k_eq_v)
    assert qmv_rope_norm_supports(x, *operands, head_dim, num_kv_heads, into)
    expected = rope_norm(product, *args, (*copies, slot) if num_kv_heads else None)
    mx.eval(expected)
    label = f"qmv_rope_norm[{dtype} {bits}-bit D{head_dim} M{rows} {layout}]"
    call = partial(qmv_rope_norm, x, *operands, *args, into)
    for heads in run_and_replayed(call, replayed=rows == 1):
        mx.eval(heads)
        for part, got, want in zip("qkv", heads, expected):
            assert (got is None) == (want is None) == (part != "q" and not num_kv_heads)
            if got is not None:
                assert_close(got, want, dtype, f"{label}:{part}")
    for buffer, before in zip(buffers if num_kv_heads else (), pristine):
        for others in (slice(0, 29), slice(30, 40)):
            assert mx.array_equal(buffer[:, :, others], before[:, :, others]).item()


# (dtype, bits, then's bits, rows, (K, N)): the down projections of E2B and E4B ending their
# feed-forward blocks, then the PLE gate of 256 rows: dense after dense, 8 bits after 4 (the
# default quantization), and the other kinds.
THEN_CASES = [
    (mx.bfloat16, 16, 16, 1, (6144, 1536)), (mx.bfloat16, 4, 8, 1, (6144, 1536)),
    (mx.float16, 8, 8, 3, (10240, 2560)), (mx.float32, 4, 4, 3, (6144, 1536)), (mx.bfloat16, 16, 16, 3, (10240, 2560)),
]


@pytest.mark.parametrize("dtype,bits,then_bits,rows,shape", THEN_CASES, ids=str)
def test_norm_residual_then_matches_the_block_end_then_its_projection(dtype, bits, then_bits, rows, shape):
    """gated_qmv_norm_residual_qmv = (gated_qmv_norm_residual's out, out @ then.T); run plain and
    replayed from a trace, twice: its counters and flag are 0 again after each launch."""
    K, N = shape
    operands = gated_operands(dtype, bits, rows, (K, N, None, None))
    then = then_operands(dtype, N, then_bits)
    end = sub_block_end(dtype, rows, N, "plain")[:3]
    assert gated_qmv_norm_residual_qmv_supports(*operands, then)
    assert_ends_then_projects(partial(gated_qmv_norm_residual_qmv, *operands, *end, 1e-6, then),
                              gated_qmv_norm_residual(*operands, *end, 1e-6), then, dtype,
                              f"gated_qmv_norm_residual_qmv[{dtype} {bits}-bit then {then_bits}-bit N{N} M{rows}]")


def then_operands(dtype, N: int, then_bits: int) -> tuple:
    """A PLE gate's operands as qmv's, 256 rows over N: quantized, or (16 bits) dense in dtype."""
    then_weight = random((256, N), dtype, scale=0.05, seed=N)
    if then_bits == 16:
        return then_weight, None, None, 0, 0
    return (*mx.quantize(then_weight, group_size=64, bits=then_bits), 64, then_bits)


def assert_ends_then_projects(fused, expected_out: mx.array, then: tuple, dtype, label: str) -> None:
    """fused() = (expected_out, expected_out @ then.T in float32), plain and replayed from a trace,
    twice: its counters and flag are 0 again after each launch."""
    f32 = mx.float32
    then_w, then_scales, then_biases, group_size, then_bits = then
    if then_scales is None:
        expected_then = expected_out.astype(f32) @ then_w.astype(f32).T
    else:
        expected_then = qmv_ref(expected_out.astype(f32), then_w, then_scales.astype(f32), then_biases.astype(f32),
                                group_size, then_bits)
    for out, then_out in run_and_replayed(fused):
        assert_close(out, expected_out, dtype, f"{label} out")
        assert_close(then_out, expected_then.astype(dtype), dtype, f"{label} then_out",
                     extra_atol=expected_out.shape[-1] * 2e-8)


# (dtype, bits, then's bits, rows, (K, N)): THEN_CASES' kinds, the down projection's x as it is.
PLAIN_THEN_CASES = [
    (mx.bfloat16, 4, 8, 1, (10240, 2560)), (mx.bfloat16, 16, 16, 1, (6144, 1536)), (mx.float16, 8, 8, 3, (6144, 1536)),
    (mx.float32, 4, 4, 3, (10240, 2560)),
]


@pytest.mark.parametrize("dtype,bits,then_bits,rows,shape", PLAIN_THEN_CASES, ids=str)
def test_plain_norm_residual_then_matches_the_block_end_then_its_projection(dtype, bits, then_bits, rows, shape):
    """qmv_norm_residual_qmv = (qmv_norm_residual's out, out @ then.T): the down projection of
    qmv_gelu's x ending a PLE layer's feed-forward block, then its PLE gate."""
    K, N = shape
    x, operands, _ = projection_case(dtype, bits, rows, K, N)
    then = then_operands(dtype, N, then_bits)
    end = sub_block_end(dtype, rows, N, "plain")[:3]
    assert qmv_norm_residual_qmv_supports(x, *operands, then)
    assert_ends_then_projects(partial(qmv_norm_residual_qmv, x, *operands, *end, 1e-6, then),
                              qmv_norm_residual(x, *operands, *end, 1e-6), then, dtype,
                              f"qmv_norm_residual_qmv[{dtype} {bits}-bit then {then_bits}-bit N{N} M{rows}]")
