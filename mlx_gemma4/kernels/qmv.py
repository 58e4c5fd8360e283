"""qmv: a quantized matrix-vector product for decode (metal/qmv.metal), with MLX's affine 4- and
8-bit layout. MLX's CUDA qmv reads 4-bit weights at 0.5-1.0 TB/s on an H100, a third of its
bf16 matrix-vector rate (bench/kernels.py), so a 4-bit decode step was no faster than bf16.
gated_qmv makes gelu_gate's product as it loads x; qmv_norm_residual and gated_qmv_norm_residual
also end the sub-block with norm_residual, and qmv_rope_norm is attention's q|k|v projection with
its rope_norm, on CUDA in the same launch."""

from __future__ import annotations

import mlx.core as mx

from ..rope import LayerRoPE
from ._source import arrival_counters, build, last_threadgroup_merges, scalars, scratch
from .decode_attention import MAX_DECODE_QUERIES
from .gelu_gate import column_input, gelu_gate_ref
from .norm_residual import NextWeights, next_norm_operands, norm_residual, norm_residual_ref
from .rope_norm import CacheSlot, Heads, rope_norm, rope_norm_ref, rope_positions

DENSE_BITS = 16  # a dense w's values, as the kernel's BITS (8 to a lane's 16-byte load)
RPS = 4  # weight rows per threadgroup: they share each x load
SIMDS = 4  # simdgroups per threadgroup, splitting K (4 rows x 4 simdgroups led a sweep of 1-8 x 2-8)
SUPPORTED_BITS = (4, 8)
# Simdgroups a threadgroup of a NORM_RESIDUAL launch over a dense 16-bit w whose K gives every
# lane of them a 16-byte load, K >= 2048 (ncu, H100, E2B bf16 with its norms: the down projection
# at K 12288 24.6 against 30.9 us with SIMDS, at K 6144 16.0 against 18.4; o_proj at K 2048 9.4
# against 9.8). At 4 bits 8 were slower (19.8 against 18.3 us at K 12288).
DENSE_NORM_SIMDS = 8


def qmv_ref(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int) -> mx.array:
    """x [..., K] @ dequantize(w [N, K * bits / 32]).T -> [..., N]: MLX's quantized_matmul."""
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def qmv_supports(x: mx.array, w: mx.array, biases: mx.array | None, group_size: int, bits: int) -> bool:
    """Shapes the kernel takes: affine 4/8-bit, whole 16-byte loads within one group."""
    return _fits_quantized(x.shape[-1], biases, group_size, bits)


def _fits_quantized(K: int, biases: mx.array | None, group_size: int, bits: int) -> bool:
    values_per_load = 128 // bits if bits in SUPPORTED_BITS else 0
    return bool(values_per_load) and biases is not None and group_size % values_per_load == 0 and K % group_size == 0


def _launch(kernel, inputs: list, x: mx.array, w: mx.array, group_size: int, bits: int, simds: int,
            template: tuple = (), output_shapes: list | None = None, extra_threadgroups: int = 0) -> list[mx.array]:
    """One qmv launch over x's rows (the gate's, where GATED) and w's N rows, plus
    `extra_threadgroups`: arrays of x's type, one [..., N] unless `output_shapes` says otherwise."""
    N = w.shape[0]
    output_shapes = output_shapes or [(*x.shape[:-1], N)]
    return kernel(
        inputs=inputs,
        template=[("T", x.dtype), ("WT", w.dtype), ("M", x.size // x.shape[-1]), ("BITS", bits), ("GROUP", group_size),
                  ("RPS", RPS), ("SIMDS", simds), ("X_BF16", x.dtype == mx.bfloat16),
                  ("W_BF16", w.dtype == mx.bfloat16), *template],
        grid=(((N + RPS - 1) // RPS + extra_threadgroups) * 32 * simds, 1, 1),
        threadgroup=(32 * simds, 1, 1),
        output_shapes=output_shapes,
        output_dtypes=[x.dtype] * len(output_shapes),
    )


def _scale_inputs(scales: mx.array | None, biases: mx.array | None) -> tuple[mx.array, mx.array]:
    """A launch's scales and biases inputs: a dense w's (scales None) are placeholders its build never reads."""
    return (scales, biases) if scales is not None else (column_input(0), column_input(0))


def qmv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int) -> mx.array:
    kernel = build("qmv", "qmv", ("x", "w", "scales", "biases"), ("out",))
    return _launch(kernel, [x, w, scales, biases], x, w, group_size, bits, SIMDS)[0]


def qmv_gelu_ref(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                 bits: int) -> mx.array:
    """gelu_gate_ref of the product's halves [..., N / 2]: w's rows are a gate half and an up
    half (the MLP's fused gate|up projection)."""
    return gelu_gate_ref(qmv_ref(x, w, scales, biases, group_size, bits))


def qmv_gelu_supports(x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int,
                      bits: int) -> bool:
    """Decode-sized calls over quantized weights qmv reads whose halves split into whole pairs
    of a threadgroup's rows."""
    return (scales is not None and x.size <= MAX_DECODE_QUERIES * x.shape[-1] and w.shape[0] % RPS == 0
            and qmv_supports(x, w, biases, group_size, bits))


def qmv_gelu(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
             bits: int) -> mx.array:
    """One launch (GELU_HALVES): the product's halves leave it through gelu_gate, so the next
    projection reads its x as it is instead of remaking it in each threadgroup (GATED)."""
    kernel = build("qmv", "qmv", ("x", "w", "scales", "biases"), ("out",), defines=(("GELU_HALVES", 1),))
    output_shapes = [(*x.shape[:-1], w.shape[0] // 2)]
    return _launch(kernel, [x, w, scales, biases], x, w, group_size, bits, SIMDS, output_shapes=output_shapes)[0]


def _product_ref(x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int,
                 bits: int) -> mx.array:
    """x @ w.T: w dequantized as in qmv_ref, or a dense [N, K] w where scales is None."""
    return x @ w.T if scales is None else qmv_ref(x, w, scales, biases, group_size, bits)


def _fits_layout(K: int, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int,
                 bits: int) -> bool:
    """Whether qmv reads w over K values a row: one of its quantized layouts or a 16-bit dense w."""
    if scales is None:
        return w.dtype in (mx.bfloat16, mx.float16) and K % (128 // DENSE_BITS) == 0
    return _fits_quantized(K, biases, group_size, bits)


def gated_qmv_ref(gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array, scales: mx.array | None,
                  biases: mx.array | None, group_size: int, bits: int) -> mx.array:
    """gelu_gate_ref(gate, up, up_offset) @ w.T: dequantized w as in qmv_ref, or a dense [N, K] w
    where scales is None (group_size and bits then unread)."""
    return _product_ref(gelu_gate_ref(gate, up, up_offset), w, scales, biases, group_size, bits)


def _gated_operands(gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array, scales: mx.array | None,
                    bits: int) -> tuple[mx.array, int, int, int]:
    """(up, up's first column, K, the kernel's BITS): up None reads the gate|up halves of gate,
    and a dense w (scales None) holds 16-bit values."""
    if up is None:
        up, up_offset = gate, gate.shape[-1] // 2
    if scales is None:
        return up, up_offset, w.shape[-1], DENSE_BITS
    return up, up_offset, w.shape[-1] * 32 // bits, bits


def gated_qmv_supports(gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array, scales: mx.array | None,
                       biases: mx.array | None, group_size: int, bits: int) -> bool:
    """Decode-sized calls whose operands the GATED kernel reads: whole 16-byte loads (of rows
    that start 16-byte aligned where x is bfloat16) and qmv's quantized layouts or a 16-bit w."""
    halves = up is None
    up, up_offset, K, _ = _gated_operands(gate, up, up_offset, w, scales, bits)
    if gate.size > MAX_DECODE_QUERIES * gate.shape[-1] or up.shape[:-1] != gate.shape[:-1]:
        return False
    fits_layout = _fits_layout(K, w, scales, biases, group_size, bits)
    aligned = gate.dtype != mx.bfloat16 or all(n % 8 == 0 for n in (gate.shape[-1], up.shape[-1], up_offset))
    covered = gate.shape[-1] == 2 * K if halves else gate.shape[-1] >= K and up.shape[-1] >= up_offset + K
    return fits_layout and aligned and covered


def gated_qmv(gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array, scales: mx.array | None,
              biases: mx.array | None, group_size: int, bits: int) -> mx.array:
    up, up_offset, K, kernel_bits = _gated_operands(gate, up, up_offset, w, scales, bits)
    # Short rows (the PLE projection's 256 values) leave a threadgroup's later simdgroups no work.
    simds = max(1, min(SIMDS, K // (32 * (128 // kernel_bits))))
    kernel = build("qmv", "qmv", ("x", "up", "up_column", "w", "scales", "biases"), ("out",), defines=(("GATED", 1),))
    scales, biases = _scale_inputs(scales, biases)
    return _launch(kernel, [gate, up, column_input(up_offset), w, scales, biases], gate, w, group_size, kernel_bits,
                   simds)[0]


def qmv_norm_residual_ref(
    x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int, bits: int,
    weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float, next_weight: NextWeights = None,
) -> mx.array | tuple[mx.array, ...]:
    """norm_residual_ref(x @ w.T, weight, residual, scale, eps, next_weight), w as in
    gated_qmv_ref: the end of a sub-block whose last op is a projection (attention's o_proj)."""
    product = _product_ref(x, w, scales, biases, group_size, bits)
    return norm_residual_ref(product, weight, residual, scale, eps, next_weight)


def qmv_norm_residual_supports(x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None,
                               group_size: int, bits: int) -> bool:
    """Decode-sized calls over a layout qmv reads (its K keeps rows of x 16-byte aligned)."""
    return _reads_product(x, w, scales, biases, group_size, bits)


def _reads_product(x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int,
                   bits: int) -> bool:
    """Whether a launch ending in an epilogue takes x @ w.T: decode-sized x over a layout qmv reads."""
    K = x.shape[-1]
    stored = w.shape[-1] if scales is None else w.shape[-1] * 32 // bits
    return x.size <= MAX_DECODE_QUERIES * K and stored == K and _fits_layout(K, w, scales, biases, group_size, bits)


def gated_qmv_norm_residual_ref(
    gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array, scales: mx.array | None,
    biases: mx.array | None, group_size: int, bits: int, weight: mx.array, residual: mx.array,
    scale: mx.array | None, eps: float, next_weight: NextWeights = None,
) -> mx.array | tuple[mx.array, ...]:
    """qmv_norm_residual_ref of gelu_gate_ref(gate, up, up_offset): the end of a sub-block whose
    last op is a gated projection (the MLP's down, the PLE projection)."""
    x = gelu_gate_ref(gate, up, up_offset)
    return qmv_norm_residual_ref(x, w, scales, biases, group_size, bits, weight, residual, scale, eps, next_weight)


def _norm_residual_launch(
    leading: dict[str, mx.array], gated: bool, x: mx.array, w: mx.array, scales: mx.array | None,
    biases: mx.array | None, group_size: int, kernel_bits: int, weight: mx.array, residual: mx.array,
    scale: mx.array | None, eps: float, next_weight: NextWeights, then: tuple | None = None,
) -> mx.array | tuple[mx.array, ...]:
    """A NORM_RESIDUAL launch (CUDA): the `leading` inputs before w (x's rows, and where gated
    also up and its first column), then norm_residual's operands, arrivals and the scratch; with
    `then` (a projection's operands as qmv's) THEN_QMV, whose product of out comes last."""
    next_weights, next_inputs, normed = next_norm_operands(next_weight)
    count = len(next_weights)
    kernel = build(
        "qmv", "qmv",
        (*leading, "w", "scales", "biases", "residual", "norm_w", "scale", *next_inputs, "params", "arrivals",
         "projected", *(("then_w", "then_scales", "then_biases") if then else ())),
        ("out", *normed, *(("then_out",) if then else ())),
        defines=(("GATED", int(gated)), ("NORM_RESIDUAL", 1), ("NEXT_NORMS", count), ("THEN_QMV", int(bool(then)))),
    )
    scales, biases = _scale_inputs(scales, biases)
    inputs = [*leading.values(), w, scales, biases, residual, weight, weight if scale is None else scale,
              *next_weights, scalars(eps), arrival_counters(3 if then else 1), scratch(residual.size)]
    # Every simdgroup, even where rows are short: the last threadgroup's norms take them all.
    wide_dense = kernel_bits == DENSE_BITS and w.shape[-1] >= DENSE_NORM_SIMDS * 32 * (128 // DENSE_BITS)
    simds = DENSE_NORM_SIMDS if wide_dense else SIMDS
    template = (("HAS_SCALE", scale is not None), ("HIDDEN", w.shape[0]))
    output_shapes = [residual.shape] * (1 + count)
    then_threadgroups = 0
    if then:
        then_w, then_scales, then_biases, then_group, then_bits = then
        then_bits = DENSE_BITS if then_scales is None else then_bits
        inputs += [then_w, *_scale_inputs(then_scales, then_biases)]
        then_threadgroups = -(-then_w.shape[0] // simds)  # a simdgroup a row
        template += (("THEN_BITS", then_bits), ("THEN_GROUP", then_group), ("THEN_TGS", then_threadgroups))
        output_shapes.append((*residual.shape[:-1], then_w.shape[0]))
    outputs = _launch(kernel, inputs, x, w, group_size, kernel_bits, simds, template, output_shapes, then_threadgroups)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def qmv_norm_residual(
    x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int, bits: int,
    weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float, next_weight: NextWeights = None,
) -> mx.array | tuple[mx.array, ...]:
    """One launch on CUDA (NORM_RESIDUAL: the last threadgroup norms the product's rows), as a
    decode step is bound by its host cost per graph node; the product then norm_residual on Metal."""
    if not last_threadgroup_merges():
        product = _product_ref(x, w, scales, biases, group_size, bits)
        return norm_residual(product, weight, residual, scale, eps, next_weight)
    return _norm_residual_launch({"x": x}, False, x, w, scales, biases, group_size,
                                 DENSE_BITS if scales is None else bits, weight, residual, scale, eps, next_weight)


def gated_qmv_norm_residual(
    gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array, scales: mx.array | None,
    biases: mx.array | None, group_size: int, bits: int, weight: mx.array, residual: mx.array,
    scale: mx.array | None, eps: float, next_weight: NextWeights = None,
) -> mx.array | tuple[mx.array, ...]:
    """As qmv_norm_residual, of gelu_gate's product (GATED); gated_qmv then norm_residual on Metal."""
    if not last_threadgroup_merges():
        product = gated_qmv(gate, up, up_offset, w, scales, biases, group_size, bits)
        return norm_residual(product, weight, residual, scale, eps, next_weight)
    up, up_offset, _, kernel_bits = _gated_operands(gate, up, up_offset, w, scales, bits)
    leading = {"x": gate, "up": up, "up_column": column_input(up_offset)}
    return _norm_residual_launch(leading, True, gate, w, scales, biases, group_size, kernel_bits, weight, residual,
                                 scale, eps, next_weight)


def qmv_rope_norm_ref(
    x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int, bits: int,
    q_weight: mx.array, k_weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE, eps: float,
    num_kv_heads: int = 0, k_eq_v: bool = False, into: CacheSlot | None = None,
) -> Heads:
    """rope_norm_ref(x @ w.T, ...), w as in gated_qmv_ref: attention's fused q|k|v projection (a
    KV-shared layer's q projection) and its epilogue."""
    product = _product_ref(x, w, scales, biases, group_size, bits)
    return rope_norm_ref(product, q_weight, k_weight, offset, rope, eps, num_kv_heads, k_eq_v, into)


def qmv_rope_norm_supports(x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None,
                           group_size: int, bits: int, head_dim: int, num_kv_heads: int,
                           into: CacheSlot | None) -> bool:
    """Decode-sized calls over a layout qmv reads whose heads whole threadgroups take, that write
    queries alone (a KV-shared layer) or a decode step's K and V into its cache slot."""
    writes = not num_kv_heads or (into is not None and x.shape[1] == 1)
    return writes and head_dim % RPS == 0 and _reads_product(x, w, scales, biases, group_size, bits)


def qmv_rope_norm(
    x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int, bits: int,
    q_weight: mx.array, k_weight: mx.array | None, offset: int | mx.array, rope: LayerRoPE, eps: float,
    num_kv_heads: int = 0, k_eq_v: bool = False, into: CacheSlot | None = None,
) -> Heads:
    """One launch on CUDA (ROPE_NORM: the last threadgroup of each head norms and rotates it), as a
    decode step is bound by its host cost per graph node; the product then rope_norm on Metal."""
    if not last_threadgroup_merges():
        product = _product_ref(x, w, scales, biases, group_size, bits)
        return rope_norm(product, q_weight, k_weight, offset, rope, eps, num_kv_heads, k_eq_v, into)
    B, L, K = x.shape
    D = q_weight.shape[-1]
    heads_in = w.shape[0] // D
    query_heads = heads_in - num_kv_heads * (1 if k_eq_v else 2)
    in_cache = num_kv_heads > 0
    kernel = build(
        "qmv", "qmv",
        ("x", "w", "scales", "biases", "q_w", "k_w", "pos", "inv_freq", "params", "arrivals", "projected",
         *(("k_cache", "v_cache", "slot") if in_cache else ())),
        ("queries",),
        defines=(("ROPE_NORM", 1), ("INTO_CACHE", int(in_cache))),
    )
    kernel_bits = DENSE_BITS if scales is None else bits
    inputs = [x, w, *_scale_inputs(scales, biases), q_weight, q_weight if k_weight is None else k_weight,
              rope_positions(offset, B), rope.inv_freq, scalars(eps), arrival_counters(heads_in),
              scratch(B * L * w.shape[0]), *(into if in_cache else ())]
    # Enough simdgroups for a row's 16-byte loads in one pass (E2B's K of 1536: 6 dense, 2 at 4 bits).
    simds = min(DENSE_NORM_SIMDS, -(-K // (32 * (128 // kernel_bits))))
    template = (("D", D), ("NQ", query_heads), ("NKV", num_kv_heads), ("V_FROM_K", k_eq_v))
    (queries,) = _launch(kernel, inputs, x, w, group_size, kernel_bits, simds, template, [(B, query_heads, L, D)])
    return (queries, *into[:2]) if in_cache else (queries, None, None)


def gated_qmv_norm_residual_qmv_ref(
    gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array, scales: mx.array | None,
    biases: mx.array | None, group_size: int, bits: int, weight: mx.array, residual: mx.array,
    scale: mx.array | None, eps: float, then: tuple,
) -> tuple[mx.array, mx.array]:
    """(out, out @ then's w.T): gated_qmv_norm_residual_ref's out (no next norm) and the next
    projection of it, `then` as qmv's operands (w, scales, biases, group_size, bits; scales None:
    a dense w). A PLE layer's feed-forward block ends so, and its PLE gate follows."""
    out = gated_qmv_norm_residual_ref(gate, up, up_offset, w, scales, biases, group_size, bits, weight, residual,
                                      scale, eps)
    return out, _product_ref(out, *then)


def qmv_norm_residual_qmv_ref(
    x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int, bits: int,
    weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float, then: tuple,
) -> tuple[mx.array, mx.array]:
    """(out, out @ then's w.T): qmv_norm_residual_ref's out (no next norm) and the next
    projection of it, `then` as in gated_qmv_norm_residual_qmv_ref."""
    out = qmv_norm_residual_ref(x, w, scales, biases, group_size, bits, weight, residual, scale, eps)
    return out, _product_ref(out, *then)


def qmv_norm_residual_qmv_supports(x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None,
                                   group_size: int, bits: int, then: tuple) -> bool:
    """qmv_norm_residual's operands and a `then` as gated_qmv_norm_residual_qmv takes it."""
    return _reads_product(x, w, scales, biases, group_size, bits) and _then_fits(w, scales, then)


def qmv_norm_residual_qmv(
    x: mx.array, w: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int, bits: int,
    weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float, then: tuple,
) -> tuple[mx.array, mx.array]:
    """As gated_qmv_norm_residual_qmv, of x as it is (THEN_QMV without GATED)."""
    if not last_threadgroup_merges():
        out = qmv_norm_residual(x, w, scales, biases, group_size, bits, weight, residual, scale, eps)
        return out, _product_ref(out, *then)
    return _norm_residual_launch({"x": x}, False, x, w, scales, biases, group_size,
                                 DENSE_BITS if scales is None else bits, weight, residual, scale, eps, None, then)


def _then_fits(w: mx.array, scales: mx.array | None, then: tuple) -> bool:
    """Whether THEN_QMV's waiters read `then` over out's rows (w's N): qmv's layouts, quantized where w is."""
    then_w, then_scales, then_biases, then_group, then_bits = then
    hidden = w.shape[0]
    stored = then_w.shape[-1] if then_scales is None else then_w.shape[-1] * 32 // then_bits
    return ((then_scales is None) == (scales is None) and (then_scales is not None or then_w.dtype == w.dtype)
            and stored == hidden and _fits_layout(hidden, then_w, then_scales, then_biases, then_group, then_bits))


def gated_qmv_norm_residual_qmv_supports(gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array,
                                         scales: mx.array | None, biases: mx.array | None, group_size: int,
                                         bits: int, then: tuple) -> bool:
    """gated_qmv's operands, and a `then` of qmv's layouts over out's rows, quantized where w is."""
    return gated_qmv_supports(gate, up, up_offset, w, scales, biases, group_size, bits) and _then_fits(w, scales, then)


def gated_qmv_norm_residual_qmv(
    gate: mx.array, up: mx.array | None, up_offset: int, w: mx.array, scales: mx.array | None,
    biases: mx.array | None, group_size: int, bits: int, weight: mx.array, residual: mx.array,
    scale: mx.array | None, eps: float, then: tuple,
) -> tuple[mx.array, mx.array]:
    """One launch on CUDA (THEN_QMV: threadgroups past the product's wait for out and project it),
    as a decode step is bound by its host cost per graph node; gated_qmv_norm_residual then the
    product elsewhere."""
    if not last_threadgroup_merges():
        out = gated_qmv_norm_residual(gate, up, up_offset, w, scales, biases, group_size, bits, weight, residual,
                                      scale, eps)
        return out, _product_ref(out, *then)
    up, up_offset, _, kernel_bits = _gated_operands(gate, up, up_offset, w, scales, bits)
    leading = {"x": gate, "up": up, "up_column": column_input(up_offset)}
    return _norm_residual_launch(leading, True, gate, w, scales, biases, group_size, kernel_bits, weight, residual,
                                 scale, eps, None, then)
