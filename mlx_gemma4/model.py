"""The Gemma 4 text decoder (E2B, E4B, 26B-A4B, 31B and any config of the family).

Reads top to bottom as transformers' `modeling_gemma4.py` does; module paths equal the keys of
a converted checkpoint. Per-layer geometry comes from `ModelConfig.layers`, never re-derived.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import lru_cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .cache import DEFAULT_SLIDING_HEADROOM, KVCache, SlidingKVCache
from .config import FULL, SLIDING, LayerConfig, ModelConfig
from .kernels import (
    MAX_DECODE_QUERIES, KernelSet, gated_qmv_norm_residual_qmv_supports, gated_qmv_supports, qmv_gelu_supports,
    qmv_norm_residual_qmv_supports, qmv_norm_residual_supports, qmv_ref, qmv_rope_norm_supports, select_kernels,
)
from .kernels._source import POOLED_MAX_BYTES, parameter_array, shared_launch_buffers
from .kernels.norm_residual import NextWeights
from .rope import LayerRoPE

# Decode of models up to this width is bound by per-operation host overhead, so fewer, larger
# operations win: the compiled step (1.3-2x on E2B, E4B, 26B-A4B, H100) and fused projections.
# A wider model (the 31B, hidden 5376) takes both only where the qmv kernel multiplies its
# quantized projections (Model.compiles_decode): with MLX's qmv the compiled step measured 38.2
# vs 40.5 tok/s plain and fused projections 41 vs 44; with ours 57.8 tok/s compiled, then 64.6
# vs 60.3 fused.
HOST_BOUND_MAX_HIDDEN = 4096

# Bytes that prefill's queued layers may allocate before the host waits for the device. Waiting
# after every layer kept the 31B's peak but cost short prompts their overlap of host and device.
QUEUED_BYTES = 1 << 29


def queues_layers() -> bool:
    """Whether prefill hands each layer to the device as soon as it is built: on a GPU only. On
    MLX's CPU back end the evaluating thread competes for the cores with the one building the
    graph (e2b-mini, 2 cores: 714 against 572 ms for a 255-token chunk)."""
    return not runs_on_cpu()


class RMSNorm(nn.Module):
    """Gemma4RMSNorm: the weight multiplies directly (no `1 + w` as in Gemma 1-3)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


# Rows (tokens) from which a prompt chunk multiplies dequantized weights on CUDA, by bits. MLX's
# CUDA quantized GEMM took 1.6-2.0x (4-bit) and 1.0-1.2x (8-bit) as long as dequantize + bf16
# GEMM at 512 rows, 2.2-3.6x at 2048, and won below these counts (H100, E2B-31B shapes).
DEQUANTIZE_MIN_ROWS = {4: 256, 8: 512}
_dequantizes = True  # off inside quantized_products_only()


@contextlib.contextmanager
def quantized_products_only():
    """Inside it, no product dequantizes its weight. A compiled prompt queues each layer while
    the one before runs, and a queued layer holds its dequantized weights: E4B 4-bit, p=512,
    H100, 0.60-0.86 GB over its weights against 0.20-0.21 with quantized products (mlx-lm
    1.10), whose prompt took 26 ms against 20 (mlx-lm 54-60)."""
    global _dequantizes
    outer, _dequantizes = _dequantizes, False
    try:
        yield
    finally:
        _dequantizes = outer  # a nested exit leaves the outer one in force


def quantized_product(ops: KernelSet, table: nn.Module, x: mx.array) -> mx.array:
    """x @ dequantized(table).T, for a QuantizedLinear or a tied QuantizedEmbedding (affine,
    bias-free: what the converter writes): through the kernel set, or for long prompt chunks
    on CUDA as a GEMM of the dequantized weight."""
    rows = x.size // x.shape[-1]
    if _dequantizes and rows >= DEQUANTIZE_MIN_ROWS.get(table.bits, math.inf) and mx.cuda.is_available():
        return dequantized_product(table, x)
    dtype = x.dtype
    if runs_on_cpu():
        x = x.astype(mx.float32)
    out = ops.quantized_matmul(x, table["weight"], table["scales"], table["biases"], table.group_size, table.bits)
    return out.astype(dtype)


def runs_on_cpu() -> bool:
    """Whether MLX's CPU back end runs the model. Its quantized matmuls (`quantized_matmul`,
    `gather_qmm`) take 8x as long on bfloat16 inputs as on float32 ones (2048 x 512, 4 and 8
    bits, 2 cores: 6.9 against 0.83 ms), so on the CPU the model hands them float32."""
    return mx.default_device() == mx.cpu


def dequantized_product(table: nn.Module, x: mx.array) -> mx.array:
    """x @ dequantize(table).T: the weight is dequantized for this one product and freed after."""
    weight = mx.dequantize(table["weight"], table["scales"], table["biases"], table.group_size, table.bits)
    return x @ weight.T


class Linear(nn.Linear):
    """nn.Linear that multiplies a batch-1 input by an evaluated [1, in, out] transposed view
    of its weight (same memory), kept from `keep_transposed` until the weight is replaced.

    `x @ weight.T` on a [1, L, in] input adds transpose, flatten and unflatten nodes to the
    graph on every call, and a decode step is bound by the host's cost per graph node.
    """

    def keep_transposed(self):
        if "bias" not in self and "_weight_t" not in self:
            self["_weight_t"] = mx.expand_dims(self["weight"].T, 0)  # private key: not a parameter
            mx.eval(self["_weight_t"])

    def __setitem__(self, key, value):
        if key == "weight":
            self.pop("_weight_t", None)  # a view of the weight being replaced
        super().__setitem__(key, value)

    def __call__(self, x: mx.array) -> mx.array:
        if "_weight_t" in self and x.ndim == 3 and x.shape[0] == 1:
            return x @ self["_weight_t"]
        return super().__call__(x)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear through `quantized_product`: the kernel set's `quantized_matmul` (in
    KERNELS the qmv kernel at decode and qmm on the prompt chunks it supports on CUDA, MLX's own
    elsewhere), or a dequantized GEMM for long prompt chunks on CUDA. `Model.use_kernels` turns
    the QuantizedLinears that `nn.quantize` builds into these."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.mode != "affine" or "bias" in self:  # the converter writes neither
            return super().__call__(x)
        return quantized_product(self.ops, self, x)


def gated_projection(ops: KernelSet, linear: nn.Module, gate: mx.array, up: mx.array | None = None,
                     up_offset: int = 0) -> mx.array:
    """linear(ops.gelu_gate(gate, up, up_offset)): in one launch at decode where the kernel set
    has gated_qmv, as a decode step is bound by its host cost per graph node."""
    operands = _projection_operands(linear) if ops.gated_qmv else None
    if operands and gated_qmv_supports(gate, up, up_offset, *operands):
        return ops.gated_qmv(gate, up, up_offset, *operands)
    return linear(ops.gelu_gate(gate, up, up_offset))


def projected_residual(ops: KernelSet, linear: nn.Module, x: mx.array, weight: mx.array, residual: mx.array,
                       scale: mx.array | None, eps: float, next_weight: NextWeights = None) -> mx.array | tuple:
    """ops.norm_residual(linear(x), weight, residual, scale, eps, next_weight), the end of a
    sub-block: in one launch at decode where the kernel set has qmv_norm_residual."""
    operands = _projection_operands(linear) if ops.qmv_norm_residual else None
    if operands and qmv_norm_residual_supports(x, *operands):
        return ops.qmv_norm_residual(x, *operands, weight, residual, scale, eps, next_weight)
    return ops.norm_residual(linear(x), weight, residual, scale, eps, next_weight)


def projected_residual_then(ops: KernelSet, linear: nn.Module, x: mx.array, weight: mx.array, residual: mx.array,
                            eps: float, then: nn.Module) -> tuple[mx.array, mx.array]:
    """(h, then(h)) for h = projected_residual(ops, linear, x, weight, residual, None, eps): in one
    launch at decode where the kernel set has qmv_norm_residual_qmv (a PLE layer's feed-forward end
    of qmv_gelu's x and its PLE gate)."""
    operands = _projection_operands(linear) if ops.qmv_norm_residual_qmv else None
    then_operands = _projection_operands(then) if operands else None
    if then_operands and qmv_norm_residual_qmv_supports(x, *operands, then_operands):
        return ops.qmv_norm_residual_qmv(x, *operands, weight, residual, None, eps, then_operands)
    h = projected_residual(ops, linear, x, weight, residual, None, eps)
    return h, then(h)


def gated_residual(ops: KernelSet, linear: nn.Module, gate: mx.array, up: mx.array | None, up_offset: int,
                   weight: mx.array, residual: mx.array, scale: mx.array | None, eps: float,
                   next_weight: NextWeights = None) -> mx.array | tuple:
    """ops.norm_residual(gated_projection(...), weight, residual, scale, eps, next_weight), the end
    of a sub-block: in one launch at decode where the kernel set has gated_qmv_norm_residual."""
    operands = _projection_operands(linear) if ops.gated_qmv_norm_residual else None
    if operands and gated_qmv_supports(gate, up, up_offset, *operands):
        return ops.gated_qmv_norm_residual(gate, up, up_offset, *operands, weight, residual, scale, eps, next_weight)
    projected = gated_projection(ops, linear, gate, up, up_offset)
    return ops.norm_residual(projected, weight, residual, scale, eps, next_weight)


def gated_residual_then(ops: KernelSet, linear: nn.Module, gate: mx.array, up: mx.array | None, weight: mx.array,
                        residual: mx.array, eps: float, then: nn.Module) -> tuple[mx.array, mx.array]:
    """(h, then(h)) for h = gated_residual(ops, linear, gate, up, 0, weight, residual, None, eps): in
    one launch at decode where the kernel set has gated_qmv_norm_residual_qmv (a PLE layer's
    feed-forward end and its PLE gate)."""
    operands = _projection_operands(linear) if ops.gated_qmv_norm_residual_qmv else None
    then_operands = _projection_operands(then) if operands else None
    if then_operands and gated_qmv_norm_residual_qmv_supports(gate, up, 0, *operands, then_operands):
        return ops.gated_qmv_norm_residual_qmv(gate, up, 0, *operands, weight, residual, None, eps, then_operands)
    h = gated_residual(ops, linear, gate, up, 0, weight, residual, None, eps)
    return h, then(h)


def _projection_operands(linear: nn.Module) -> tuple | None:
    """qmv's (w, scales, biases, group_size, bits) for a bias-free Linear or affine
    QuantizedLinear (what the converter writes); None for other layers."""
    if "bias" in linear:
        return None
    if isinstance(linear, nn.QuantizedLinear):
        if linear.mode != "affine":
            return None
        return linear["weight"], linear["scales"], linear["biases"], linear.group_size, linear.bits
    return linear["weight"], None, None, 0, 0


def fuse_linears(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> bool:
    """Replace the bias-free linears `names` of `parent` by one whose outputs are theirs, in order.

    Decode is bound by per-operation overhead, so one matmul beats several smaller ones. Rows of
    a (quantized) weight are independent, so concatenating weights, scales and biases along the
    output axis is exact. Modules of differing kinds or quantization stay as they are (False).
    """
    modules = [parent[name] for name in names]
    if len(modules) < 2:
        return False
    first = modules[0]
    settings = [(type(m), sorted(m.parameters()), getattr(m, "bits", None), getattr(m, "group_size", None),
                 getattr(m, "mode", None)) for m in modules]
    if "bias" in first or any(s != settings[0] for s in settings):
        return False
    for key in list(first.parameters()):
        first[key] = mx.concatenate([m[key] for m in modules], axis=first[key].ndim - 2)
    for name in names:
        parent.pop(name)
    parent[fused_name] = first
    return True


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerConfig, index: int, ops: KernelSet):
        super().__init__()
        self.ops = ops  # custom kernels or their MLX twins, chosen at build (mlx_gemma4.kernels)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = layer.num_kv_heads
        self.head_dim = layer.head_dim
        self.eps = config.rms_norm_eps
        self.owns_cache = layer.kv_source == index
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, self.eps)
        if self.owns_cache:  # KV-shared layers have no k/v weights at all
            self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, self.eps)
            if not layer.k_eq_v:
                self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        # attention_k_eq_v: V is the PRE-norm k_proj output (modular_gemma4 "alternative attention").
        self.k_eq_v = self.owns_cache and layer.k_eq_v
        self.projections = tuple(name for name in ("q_proj", "k_proj", "v_proj") if name in self)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rope = LayerRoPE(layer.rope, layer.head_dim)
        self.is_sliding = layer.is_sliding

    @property
    def decode_attention(self):
        return self.ops.sliding_decode_attention if self.is_sliding else self.ops.full_decode_attention

    def __call__(self, x, mask, rope_offset, cache=None, shared_kv=None):
        """(the heads' output [B, L, heads * D], kv): o_proj is the layer's, which ends the
        sub-block with it (projected_residual)."""
        B, L, _ = x.shape
        # A compiled decode step's cache (cache.StepView) takes the new K/V at its slot from rope_norm.
        into = cache.step_slot() if shared_kv is None and hasattr(cache, "step_slot") else None
        queries, keys, values = self.heads(x, rope_offset, into)
        if shared_kv is not None:
            keys, values = shared_kv
        elif into is not None:
            keys, values = cache.store(keys, values)
        else:
            keys, values = cache.update_and_fetch(keys, values)
        # scale 1.0: q_norm / k_norm replace the 1/sqrt(head_dim) factor (Gemma4TextAttention.scaling).
        if L <= MAX_DECODE_QUERIES:  # decode / verify: a shape, fixed per traced step, not data
            out = self.decode_attention(queries, keys, values, mask)  # already [B, L, heads * D]
        else:
            out = self.ops.prompt_attention(queries, keys, values, mask)
        return out, (keys, values)

    def heads(self, x: mx.array, rope_offset, into) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """(queries, keys, values) [B, heads, L, D]: the q|k|v projections, then their norms, RoPE and
        the head transpose at once (ops.rope_norm); in one launch at decode where the kernel set has
        qmv_rope_norm and the projections are one (fused, or a KV-shared layer's q alone)."""
        kv_heads = self.num_kv_heads if self.owns_cache else 0
        norms = (self.q_norm.weight, self.k_norm.weight if self.owns_cache else None)
        operands = None
        if self.ops.qmv_rope_norm and len(self.projections) == 1:
            operands = _projection_operands(self[self.projections[0]])
        if operands and qmv_rope_norm_supports(x, *operands, self.head_dim, kv_heads, into):
            return self.ops.qmv_rope_norm(x, *operands, *norms, rope_offset, self.rope, self.eps, kv_heads,
                                          self.k_eq_v, into)
        projected = [self[name](x) for name in self.projections]
        projected = projected[0] if len(projected) == 1 else mx.concatenate(projected, axis=-1)
        return self.ops.rope_norm(projected, *norms, rope_offset, self.rope, self.eps, kv_heads, self.k_eq_v, into)

    def fuse_projections(self):
        """One q|k|v matmul instead of three (Model.fuse_projections)."""
        if fuse_linears(self, self.projections, "qkv_proj"):
            self.projections = ("qkv_proj",)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, ops: KernelSet):
        super().__init__()
        self.ops = ops
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return gated_projection(self.ops, self.down_proj, *self.gated_inputs(x))

    def activated(self, x: mx.array) -> mx.array | None:
        """gelu(gate) * up, the down projection's x, from the fused gate|up projection in one launch
        where the kernel set has qmv_gelu and takes x (decode, quantized weights); None elsewhere,
        where the down projection takes the halves (gated_inputs)."""
        operands = _projection_operands(self.gate_up_proj) if self.ops.qmv_gelu and "gate_up_proj" in self else None
        if operands and qmv_gelu_supports(x, *operands):
            return self.ops.qmv_gelu(x, *operands)
        return None

    def gated_inputs(self, x: mx.array) -> tuple[mx.array, mx.array | None]:
        """The down projection's gate and up: the fused projection's halves, read in place (up None)."""
        if "gate_up_proj" in self:
            return self.gate_up_proj(x), None
        return self.gate_proj(x), self.up_proj(x)

    def fuse_projections(self):
        fuse_linears(self, ("gate_proj", "up_proj"), "gate_up_proj")


def groups_experts_by_block() -> bool:
    """Whether MoE prompt chunks multiply each expert's rows as one block (grouped_experts): on
    CUDA, where SwitchGLU's sorted path runs one row at a time."""
    return mx.cuda.is_available()


# A compiled prompt chunk cannot read the experts' row counts on the host, so each expert gets
# room for this many times its even share of the chunk's rows at first; a bucket whose prompt
# overflows an expert gets twice the room (generate.CompiledPrompt).
EXPERT_CAPACITY_FACTOR = 4


@dataclass
class ExpertRows:
    """How grouped_experts places a compiled prompt chunk's rows (batch 1): rows past `last`
    are padding and reach no expert, each expert takes up to `capacity` rows, and `overflows`
    gathers one flag per layer: whether an expert was routed more rows than that."""

    last: mx.array
    capacity: int
    overflows: list = field(default_factory=list)

    @staticmethod
    def for_chunk(config: ModelConfig, length: int, last: mx.array, factor: float) -> "ExpertRows":
        """Room for `factor` times an expert's even share of `length` rows; at most `length`,
        which no expert can overflow (a row's k experts are distinct)."""
        share = length * config.top_k_experts / config.num_experts
        return ExpertRows(last, min(length, math.ceil(factor * share)))


# Routed rows (tokens x k) from which the experts sort their rows by expert first, as mlx-lm's
# SwitchGLU does: each expert's weights are then read for a run of rows.
SORT_MIN_ROWS = 64


@lru_cache(maxsize=32)
def _row_indices(shape: tuple[int, ...], rows_per_index: int) -> mx.array:
    """gather_qmm's lhs indices [*shape] for inputs whose batch rows each serve `rows_per_index`
    routed slots, as a constant: left out, gather_qmm builds them in the graph on every call
    (arange, reshape and broadcast nodes), and a decode step is bound by its host cost per node."""
    return mx.array((np.arange(math.prod(shape), dtype=np.uint32) // rows_per_index).reshape(shape))


def gather_product(linear: nn.Module, x: mx.array, indices: mx.array | None, rows: mx.array | None = None,
                   sorted_indices: bool = False) -> mx.array:
    """x [..., M, in] times the experts' weights of a SwitchLinear or QuantizedSwitchLinear
    (bias-free, as the converter writes them): rows[i] of x's batch with expert indices[i];
    `indices` None: x [experts, M, in], a block of rows per expert in order."""
    if indices is None:
        if not isinstance(linear, QuantizedSwitchLinear):
            # A batched matmul: MLX's CUDA gather_mm failed on such blocks from 200 rows (float32, H100).
            return x @ linear["weight"].swapaxes(-1, -2)
        indices = mx.arange(x.shape[0], dtype=mx.uint32)
    if isinstance(linear, QuantizedSwitchLinear):
        return mx.gather_qmm(
            x, linear["weight"], linear["scales"], linear.get("biases"), lhs_indices=rows, rhs_indices=indices,
            transpose=True, group_size=linear.group_size, bits=linear.bits, mode=linear.mode,
            sorted_indices=sorted_indices,
        )
    return mx.gather_mm(x, linear["weight"].swapaxes(-1, -2), rows, indices, sorted_indices=sorted_indices)


class Experts(nn.Module):
    """Gemma4TextExperts: every expert a GELU-gated MLP; each token runs its k routed experts.

    Weights as mlx-lm's SwitchGLU keeps them ([experts, out, in] SwitchLinears, quantized by
    `nn.quantize`), the gate and up projections fused into one at load (`fuse_projections`).
    `__call__` returns [..., k, 1, D], the gathered products' own shape, which
    `moe_norm_residual` reads as it is.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, ops: KernelSet):
        super().__init__()
        self.ops = ops
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias=False)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias=False)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts, bias=False)

    @property
    def num_experts(self) -> int:
        return self.down_proj.num_experts

    def fuse_projections(self):
        fuse_linears(self, ("gate_proj", "up_proj"), "gate_up_proj")

    def products(self, x: mx.array, indices: mx.array | None, rows: tuple[mx.array, mx.array] | None = None,
                 sorted_indices: bool = False) -> mx.array:
        """down(gelu(gate(x)) * up(x)) of expert indices[i] on x's batch row rows[0][i] (default:
        row i); rows[1] indexes the hidden rows for the down projection. `indices` None: x's
        batch row i takes expert i (gather_product)."""
        up_rows, down_rows = rows or (None, None)
        if "gate_up_proj" in self:
            gate_up = gather_product(self.gate_up_proj, x, indices, up_rows, sorted_indices)
            hidden = self.ops.gelu_gate(gate_up)  # the halves, read in place
        else:
            gate = gather_product(self.gate_proj, x, indices, up_rows, sorted_indices)
            hidden = self.ops.gelu_gate(gate, gather_product(self.up_proj, x, indices, up_rows, sorted_indices))
        return gather_product(self.down_proj, hidden, indices, down_rows, sorted_indices)

    def __call__(self, x: mx.array, indices: mx.array, rows: ExpertRows | None = None) -> mx.array:
        """x [B, L, D], indices [B, L, k] -> [B, L, k, 1, D]; `rows`: see grouped_experts."""
        dtype = x.dtype
        if runs_on_cpu():
            x = x.astype(mx.float32)
        B, L, D = x.shape
        k = indices.shape[-1]
        if L > MAX_DECODE_QUERIES and groups_experts_by_block():  # prompt chunks on CUDA
            out = grouped_experts(self, x, indices, rows)
        elif indices.size >= SORT_MIN_ROWS:
            flat = indices.reshape(-1)
            order = mx.argsort(flat)
            out = self.products(x.reshape(-1, 1, D)[order // k], flat[order], sorted_indices=True)
            out = out[mx.argsort(order)].reshape(B, L, k, 1, D)
        else:  # decode: each token's row of x for each of its k slots, by constant row indices
            rows_of = (_row_indices(indices.shape, k), _row_indices(indices.shape, 1))
            out = self.products(x.reshape(B * L, 1, D), indices, rows_of)
        return out.astype(dtype)


def grouped_experts(experts: Experts, x: mx.array, indices: mx.array, rows: ExpertRows | None = None) -> mx.array:
    """`experts(x, indices)` for a prompt chunk, as one [capacity, D] matrix product per expert.

    x [..., D], indices [..., k] -> [..., k, 1, D]. Each token's copies are grouped by expert into
    [num_experts, capacity, D], so every expert multiplies a block of rows; SwitchGLU's sorted
    path runs one row at a time on MLX's CUDA back end (26B-A4B shapes, H100: 47 -> 5.3 ms a
    layer at 512 tokens, same bits). The capacity is the busiest expert's count, read on the
    host, unless `rows` sets it (a compiled prompt: no host reads).
    """
    num_experts, D, k = experts.num_experts, x.shape[-1], indices.shape[-1]
    flat = indices.reshape(-1)
    bins = num_experts
    if rows is not None:  # the padding's copies go to a bin past the last expert, which no expert reads
        flat = mx.where(mx.arange(flat.size) // k <= rows.last, flat, num_experts)
        bins += 1
    order = mx.argsort(flat)
    expert_of = flat[order]
    counts = (flat[:, None] == mx.arange(bins)[None, :]).sum(axis=0)
    busiest = counts[:num_experts].max()
    if rows is None:
        capacity = busiest.item()
    else:
        capacity = rows.capacity
        rows.overflows.append(busiest > capacity)
    rank = mx.arange(flat.size) - (mx.cumsum(counts) - counts)[expert_of]  # place within its expert's rows
    # Rows past a capacity (the padding bin's, or an overflow's, which the caller discards) share its last slot.
    slots = expert_of.astype(mx.int32) * capacity + mx.minimum(rank, capacity - 1).astype(mx.int32)
    grouped = mx.zeros((bins * capacity, D), dtype=x.dtype)
    grouped[slots] = x.reshape(-1, D)[order // k]
    grouped = grouped[: num_experts * capacity].reshape(num_experts, capacity, D)
    out = experts.products(grouped, None).reshape(-1, D)
    out = out[mx.minimum(slots, num_experts * capacity - 1)]
    return out[mx.argsort(order)].reshape(*indices.shape, 1, D)


class Router(nn.Module):
    """Gemma4TextRouter: softmax over all experts in fp32, top-k, renormalise, per-expert scale.

    Its input norm, RMSNorm(x) * scale, comes with the layer's post-attention norm_residual
    (one launch for every norm of that residual); the hidden_size^-0.5 factor after it is
    applied to the logits instead (the projection is linear), inside `moe_router`."""

    def __init__(self, config: ModelConfig, ops: KernelSet):
        super().__init__()
        self.ops = ops
        self.top_k = config.top_k_experts
        self.proj = Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = mx.ones((config.hidden_size,))
        self.per_expert_scale = mx.ones((config.num_experts,))
        self.root_size = config.hidden_size**-0.5  # Gemma4TextRouter.scalar_root_size

    def __call__(self, normed: mx.array) -> tuple[mx.array, mx.array]:
        """(weights float32, expert indices), k per token, from RMSNorm(x) * scale."""
        return self.ops.moe_router(self.proj(normed), self.per_expert_scale, self.top_k, self.root_size)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, ops: KernelSet):
        super().__init__()
        layer = config.layers[index]
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.eps = eps
        self.ops = ops
        self.self_attn = Attention(config, layer, index, ops)
        self.mlp = MLP(hidden, layer.intermediate_size, ops)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.layer_scalar = mx.ones((1,))
        if config.enable_moe_block:
            self.router = Router(config, ops)
            self.experts = Experts(hidden, config.moe_intermediate_size, config.num_experts, ops)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        if config.hidden_size_per_layer_input:
            self.ple_column = index * config.hidden_size_per_layer_input  # this layer's first per-layer input
            self.per_layer_input_gate = Linear(hidden, config.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = Linear(config.hidden_size_per_layer_input, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)

    def __call__(self, h, normed, mask, rope_offset, next_norm, cache=None, shared_kv=None, per_layer_inputs=None,
                 expert_rows=None):
        """`normed`: input_layernorm(h), computed by the layer before; `per_layer_inputs`: every
        layer's, [B, L, layers * P]; `expert_rows`: see grouped_experts. Returns (h, h normed by
        `next_norm`, the next layer's input norm or the final norm, kv)."""
        # Each sub-block ends in (residual + RMSNorm(x) * w) * scale and the next one's norms, in one pass.
        heads, kv = self.self_attn(normed, mask, rope_offset, cache, shared_kv)
        next_norms = (self.pre_feedforward_layernorm.weight,)
        if "router" in self:
            # The router and the experts read the post-attention residual, each through its own norm.
            next_norms += (self.router.scale, self.pre_feedforward_layernorm_2.weight)
        h, mlp_input, *moe_inputs = projected_residual(self.ops, self.self_attn.o_proj, heads,
                                                       self.post_attention_layernorm.weight, h, None, self.eps,
                                                       next_norms)

        residual = h
        if "router" in self:
            m = self.mlp(mlp_input)
            router_input, experts_input = moe_inputs
            weights, indices = self.router(router_input)
            experts = self.experts(experts_input, indices, expert_rows)
            # The experts mixed by their weights and normed, plus the normed dense branch, then as below.
            branch_norms = (self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight)
            feed_forward_end = partial(self.ops.moe_norm_residual, m, experts, weights, *branch_norms)
        elif (activated := self.mlp.activated(mlp_input)) is not None:
            feed_forward_end = partial(projected_residual, self.ops, self.mlp.down_proj, activated)
            feed_forward_end_then = partial(projected_residual_then, self.ops, self.mlp.down_proj, activated)
        else:
            gate, up = self.mlp.gated_inputs(mlp_input)
            feed_forward_end = partial(gated_residual, self.ops, self.mlp.down_proj, gate, up, 0)
            feed_forward_end_then = partial(gated_residual_then, self.ops, self.mlp.down_proj, gate, up)
        # layer_scalar scales the whole residual stream, after PLE (Gemma4TextDecoderLayer.forward).
        if per_layer_inputs is None:
            return *feed_forward_end(self.post_feedforward_layernorm.weight, residual, self.layer_scalar, self.eps,
                                     next_norm), kv
        if "router" in self:
            h = feed_forward_end(self.post_feedforward_layernorm.weight, residual, None, self.eps)
            ple_gate = self.per_layer_input_gate(h)
        else:
            h, ple_gate = feed_forward_end_then(self.post_feedforward_layernorm.weight, residual, self.eps,
                                                self.per_layer_input_gate)
        return *gated_residual(self.ops, self.per_layer_projection, ple_gate, per_layer_inputs,
                               self.ple_column, self.post_per_layer_input_norm.weight, h, self.layer_scalar, self.eps,
                               next_norm), kv


class Model(nn.Module):
    """Gemma 4 causal LM: `model(ids[B, L]) -> logits[B, L, vocab]`, softcapped."""

    def __init__(self, config: ModelConfig, kernels: bool | None = None):
        """`kernels`: custom GPU kernels (True) or their MLX twins (False); None picks kernels
        where MLX has a GPU back end and MLX_GEMMA4_KERNELS is not "0". See `use_kernels`."""
        super().__init__()
        self.config = config
        self.ops = select_kernels(kernels)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.layers = [DecoderLayer(config, i, self.ops) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(hidden, config.vocab_size, bias=False)
        ple = config.hidden_size_per_layer_input
        if ple:
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, config.num_hidden_layers * ple)
            self.per_layer_model_projection = Linear(hidden, config.num_hidden_layers * ple, bias=False)
            self.per_layer_projection_norm = RMSNorm(ple, config.rms_norm_eps)
        self._cache_index = {layer: i for i, layer in enumerate(config.cache_owners)}
        self._first_cache_of_type = {}
        for layer, index in self._cache_index.items():
            self._first_cache_of_type.setdefault(config.layers[layer].layer_type, index)
        # Layers whose K/V a later KV-shared layer reads; only these are kept during a forward.
        self._kv_sources = {layer.kv_source for i, layer in enumerate(config.layers) if layer.kv_source != i}

    def use_kernels(self, ops: KernelSet):
        """Run with the kernel set `ops` from now on (benchmarks compare sets on one model). Call
        it again after quantizing: it routes the quantized projections through `ops` too."""
        for _, module in self.named_modules():
            if isinstance(module, nn.QuantizedLinear):
                module.__class__ = QuantizedLinear  # same fields; only __call__ differs
            if isinstance(module, QuantizedLinear) or hasattr(module, "ops"):
                module.ops = ops
        self._compiled_decode = self._compiled_prompt = None  # traced with the old set

    def compiles_decode(self) -> bool:
        """Whether decode steps run compiled (generate.CompiledDecode): up to HOST_BOUND_MAX_HIDDEN,
        and wider where the kernel set's qmv multiplies the quantized projections."""
        if self.config.hidden_size <= HOST_BOUND_MAX_HIDDEN:
            return True
        routed = any(isinstance(module, QuantizedLinear) for _, module in self.named_modules())
        return routed and self.ops.quantized_matmul is not qmv_ref

    def keep_transposed_weights(self):
        """Give every unquantized projection its transposed weight view (`Linear`); call it
        once the weights are in (the loader and the compiled decode step do)."""
        for _, module in self.named_modules():
            if isinstance(module, Linear):
                module.keep_transposed()

    def keep_scalars_off_the_small_pool(self):
        """Re-seat each layer's one-value `layer_scalar` (a kernel parameter of norm_residual) as a
        view of a padded array (kernels._source.parameter_array): MLX's CUDA allocator puts arrays
        of 8 bytes or less in a pool whose reads by a kernel's threads are slow. Call it once the
        weights are in (the loader and the compiled decode step do)."""
        for layer in self.layers:
            scalar = layer["layer_scalar"]
            if scalar.nbytes <= POOLED_MAX_BYTES:
                layer["layer_scalar"] = parameter_array(scalar.tolist(), scalar.dtype)[: scalar.size]
                mx.eval(layer["layer_scalar"])

    def fuse_projections(self) -> "Model":
        """Fuse each layer's q/k/v and gate/up projections (the MLP's and the experts') into one
        matmul each (after loading weights; the checkpoint keeps them apart, so this is done at
        load time), where decode runs compiled: a wider model's plain decode measured its unfused
        matmuls faster."""
        if not self.compiles_decode():
            return self
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
            if "experts" in layer:
                layer.experts.fuse_projections()
        return self

    def make_cache(self, left_padding: list[int] | None = None, sliding_headroom: int = DEFAULT_SLIDING_HEADROOM):
        """One cache per cache-owning layer; `left_padding[b]` pad slots lead row b."""
        caches = []
        for i in self.config.cache_owners:
            layer = self.config.layers[i]
            if layer.is_sliding:
                caches.append(SlidingKVCache(layer.sliding_window, sliding_headroom, left_padding))
            else:
                caches.append(KVCache(left_padding))
        return caches

    def _embed(self, inputs: mx.array) -> mx.array:
        h = self.embed_tokens(inputs)
        # Gemma4TextScaledWordEmbedding casts sqrt(hidden) to the weight dtype before scaling.
        return h * mx.array(math.sqrt(self.config.hidden_size), dtype=h.dtype)

    def _per_layer_inputs(self, inputs: mx.array, h: mx.array) -> mx.array | None:
        """PLE: token-identity rows plus the normed projection of the embedding, [B, L, layers * P]
        (each layer reads its own P columns in place)."""
        if not self.config.hidden_size_per_layer_input:
            return None
        tokens = self.embed_tokens_per_layer(inputs)
        context = self.per_layer_model_projection(h)
        # (RMSNorm(context * hidden^-0.5) * w + tokens * sqrt(P)) * 2^-0.5: see kernels/ple_inputs.py
        return self.ops.ple_inputs(
            tokens, context, self.per_layer_projection_norm.weight, self.config.hidden_size, self.config.rms_norm_eps
        )

    def _logits(self, normed: mx.array) -> mx.array:
        """Logits from the decoder output already through the final norm."""
        if "lm_head" in self:
            logits = self.lm_head(normed)
        elif isinstance(self.embed_tokens, nn.QuantizedEmbedding) and self.embed_tokens.mode == "affine":
            logits = quantized_product(self.ops, self.embed_tokens, normed)
        else:
            logits = self.embed_tokens.as_linear(normed)
        cap = self.config.final_logit_softcapping
        return mx.tanh(logits / cap) * cap if cap else logits

    @shared_launch_buffers()
    def _run_layers(self, inputs: mx.array, cache: list, stop_at_shared: bool, hand_over: bool = False,
                    last: mx.array | int | None = None, expert_rows: ExpertRows | None = None) -> mx.array:
        """The decoder's output through the final norm; `stop_at_shared` ends before the first
        KV-shared layer (the output is then not the model's and goes unread); `hand_over`: on a
        GPU, queue each layer as it is built (prefill; not inside a compiled graph); `last`: see
        `last_logits` (-1: the chunk's final row); `expert_rows`: see grouped_experts."""
        L = inputs.shape[1]
        h = self._embed(inputs)
        per_layer = self._per_layer_inputs(inputs, h)
        # Caches of one layer type share offsets, so the first of each type builds the mask.
        masks = {kind: cache[index].make_mask(L) for kind, index in self._first_cache_of_type.items()}
        offset = cache[0].rope_offset()
        # Each layer norms its output with the next layer's input norm (the last: the final norm).
        next_norms = [layer.input_layernorm.weight for layer in self.layers[1:]] + [self.norm.weight]
        normed = self.layers[0].input_layernorm(h)
        shared = {}
        # MoE prompt chunks wait for the device after every layer anyway (grouped_experts).
        hand_over = hand_over and not self.config.enable_moe_block and queues_layers()
        queued_from = mx.get_active_memory() if hand_over else 0  # bytes held before the layers handed over since
        for i, (layer, spec) in enumerate(zip(self.layers, self.config.layers)):
            owner = spec.kv_source == i
            if stop_at_shared and not owner:
                break
            if last is not None and not owner and h.shape[1] > 1:
                # Past the cache owners only the row at `last` goes on, seeing the keys up to it.
                if isinstance(last, mx.array):
                    h, normed = mx.take(h, last, axis=1), mx.take(normed, last, axis=1)
                    per_layer = None if per_layer is None else mx.take(per_layer, last, axis=1)
                    masks = {kind: cache[index].last_token_mask(last)
                             for kind, index in self._first_cache_of_type.items()}
                    offset = last
                else:  # the chunk's final row: its masks' final rows (a causal one sees every key)
                    h, normed = h[:, -1:], normed[:, -1:]
                    per_layer = None if per_layer is None else per_layer[:, -1:]
                    masks = {kind: None if mask is None or isinstance(mask, str) else mask[..., -1:, :]
                             for kind, mask in masks.items()}
                    offset = offset + L - 1
            h, normed, kv = layer(
                h,
                normed,
                masks[spec.layer_type],
                offset,
                next_norms[i],
                cache[self._cache_index[i]] if owner else None,
                None if owner else shared[spec.kv_source],
                per_layer,
                expert_rows,
            )
            if i in self._kv_sources:
                shared[i] = kv
            if hand_over:
                # Hand each layer to the device as soon as it is built (a 2048-token E2B chunk on
                # an H100: half the peak of live intermediates, 25% sooner). MLX allocates a layer's
                # buffers when it is queued, so a host running ahead holds every queued layer's
                # (31B 4-bit, p=512: 62 GB of dequantized weights): past QUEUED_BYTES, wait.
                mx.async_eval(h, normed, kv)
                if mx.get_active_memory() - queued_from > QUEUED_BYTES:
                    mx.eval(h)
                    queued_from = mx.get_active_memory()
        return normed

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """Logits for every position, [B, L, vocab]; advances `cache` by L."""
        cache = cache if cache is not None else self.make_cache()
        return self._logits(self._run_layers(inputs, cache, stop_at_shared=False))

    def last_logits(self, inputs: mx.array, cache: list, last: mx.array | None = None,
                    expert_rows: ExpertRows | None = None) -> mx.array:
        """Logits [B, vocab] of one position of a prompt chunk: the cache owners run on every
        position, the KV-shared layers and the LM head on that position alone.

        `last` None: the chunk's final position, into real caches (a prompt's last chunk; each
        layer is queued as it is built, as `prefill` does). Else an index array [1] into views
        that keep every position's K/V and give `last_token_mask` (generate.FillView).
        """
        final = last is None
        normed = self._run_layers(inputs, cache, stop_at_shared=False, hand_over=final,
                                  last=-1 if final else last, expert_rows=expert_rows)
        if normed.shape[1] > 1:  # no KV-shared layers narrowed it
            normed = normed[:, -1:] if final else mx.take(normed, last, axis=1)
        return self._logits(normed)[:, -1]

    def prefill(self, inputs: mx.array, cache: list) -> None:
        """Write a prompt chunk into `cache`, computing only what the caches hold.

        KV-shared layers and the LM head are skipped: no cache depends on them
        (transformers' `_maybe_slice_kv_shared_inputs`). Evaluate the cache states afterwards;
        MLX then also prunes the last owner layer's output, which no cache reads either.
        """
        self._run_layers(inputs, cache, stop_at_shared=True, hand_over=True)
