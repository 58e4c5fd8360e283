"""Custom kernels: one wrapper module per `metal/<name>.metal`, each with its pure-MLX twin
`<name>_ref` (same signature) above the kernel call. `select_kernels()` picks, once, the set a
model uses: the kernels where a GPU back end exists and MLX_GEMMA4_KERNELS is not "0", else the
twins (the CPU path and the oracle of the parity tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from ._source import gpu_backend, kernels_enabled, runs_mma_tiles
from .decode_attention import MAX_DECODE_QUERIES, decode_attention, decode_attention_ref
from .gelu_gate import gelu_gate, gelu_gate_ref
from .moe_router import moe_router, moe_router_ref
from .norm_residual import moe_norm_residual, moe_norm_residual_ref, norm_residual, norm_residual_ref
from .ple_inputs import ple_inputs, ple_inputs_ref
from .prompt_attention import prompt_attention, prompt_attention_ref, prompt_attention_supports
from .qmm import qmm, qmm_ref, qmm_supports
from .qmv import (
    gated_qmv, gated_qmv_norm_residual, gated_qmv_norm_residual_qmv, gated_qmv_norm_residual_qmv_ref,
    gated_qmv_norm_residual_qmv_supports, gated_qmv_norm_residual_ref, gated_qmv_ref, gated_qmv_supports, qmv,
    qmv_gelu, qmv_gelu_ref, qmv_gelu_supports, qmv_norm_residual, qmv_norm_residual_qmv, qmv_norm_residual_qmv_ref,
    qmv_norm_residual_qmv_supports, qmv_norm_residual_ref, qmv_norm_residual_supports, qmv_ref, qmv_rope_norm,
    qmv_rope_norm_ref, qmv_rope_norm_supports, qmv_supports,
)
from .rope_norm import rope_norm, rope_norm_ref


@dataclass(frozen=True)
class KernelSet:
    """The functions a model calls; each is a kernel or its twin, chosen when the model is built
    (`Model.use_kernels` switches sets)."""

    rope_norm: Callable
    ple_inputs: Callable
    norm_residual: Callable
    gelu_gate: Callable  # the activation of the MLP, the MoE experts and the PLE gate
    sliding_decode_attention: Callable  # head_dim 256, K/V of a sliding ring
    full_decode_attention: Callable  # head_dim 512, K/V of a full-attention cache
    prompt_attention: Callable  # a prompt chunk's queries (more than MAX_DECODE_QUERIES)
    quantized_matmul: Callable  # quantized projections and the tied LM head (model.quantized_product): qmv's signature
    moe_router: Callable  # softmax, top k, renormalise and per-expert scale of the router's logits
    moe_norm_residual: Callable  # the end of a MoE feed-forward block: experts mixed, branches normed, norm_residual
    uses_kernels: bool
    # gelu_gate and the projection after it in one launch at decode (model.gated_projection);
    # None: the projection's own op after gelu_gate
    gated_qmv: Callable | None = None
    # gated_qmv and the norm_residual that ends the sub-block in one launch at decode
    # (model.gated_residual); None: the two ops
    gated_qmv_norm_residual: Callable | None = None
    # a projection and the norm_residual that ends the sub-block in one launch at decode
    # (model.projected_residual: attention's o_proj); None: the two ops
    qmv_norm_residual: Callable | None = None
    # gated_qmv_norm_residual (no next norm) and the next projection of its output in one launch at
    # decode (model.gated_residual_then: a PLE layer's feed-forward end and PLE gate); None: the two ops
    gated_qmv_norm_residual_qmv: Callable | None = None
    # attention's q|k|v projection and its rope_norm in one launch at decode (model.Attention.heads);
    # None: the two ops
    qmv_rope_norm: Callable | None = None
    # the MLP's quantized gate|up projection and gelu_gate of its halves in one launch at decode
    # (model.MLP.activated), so the down projection reads x as it is; None: the halves go to it
    qmv_gelu: Callable | None = None
    # qmv_norm_residual (no next norm) and the next projection of its output in one launch at decode
    # (model.projected_residual_then: the down projection of qmv_gelu's x and the PLE gate); None: the two ops
    qmv_norm_residual_qmv: Callable | None = None


PROMPT_ROWS = 32  # rows of a call from which gelu_gate's kernel beats its compiled twin


def _gelu_gate_by_rows(gate: mx.array, up: mx.array | None = None, up_offset: int = 0) -> mx.array:
    """The kernel on prompt chunks (1.5-1.9x its twin) and wherever up is read from part of a
    wider array (the MLP's gate|up halves, a layer's PLE columns): there the twin needs split
    or slice nodes first, and a decode step is bound by its host cost per node. Separate gate
    and up at decode (the MoE experts) take the compiled twin, fused with its neighbours."""
    reads_part = up is None or up.shape[-1] != gate.shape[-1]
    kernel = reads_part or gate.size >= PROMPT_ROWS * gate.shape[-1]
    return (gelu_gate if kernel else gelu_gate_ref)(gate, up, up_offset)


# Values of w from which qmv runs at decode (metal/README.md). In the model (H100, interleaved
# trials) 2^22 took E2B 4-bit from 158-162 to 177-190 tok/s but 26B-A4B from 95.7 to 81.3 and
# E4B from 134.8 to 127.3: qmv leaves lanes idle on short rows (K of 1536-2816).
QMV_MIN_WEIGHTS = 1 << 25


def _quantized_matmul_by_rows(x, w, scales, biases, group_size, bits):
    """qmv for decode-sized calls it supports on weights of QMV_MIN_WEIGHTS values or more, qmm
    for the prompt chunks it supports where its tiles run (runs_mma_tiles); MLX's
    quantized_matmul otherwise. In chains of dependent 4-bit calls (bench/qmv_chain.py, H100)
    qmv ran the 31B's MLP at 1.46-1.58x MLX's speed, its attention projections at 1.16-1.34x and
    E4B's MLP at 1.11-1.40x; in the model, E4B 4-bit decode 1.07x and, with the compiled step, 31B
    1.43x. In a whole prompt (ncu, H100, 128 rows) MLX's product ran E2B's and E4B's narrow
    projections, 20-24 threadgroups of 64 x 128, at 42-97 us a call, which qmm's split K spreads
    over the GPU; E4B 4-bit to the first token, p=128: 13.1 against 14.6 ms with qmm on every
    shape and bit width, interleaved."""
    if x.size <= MAX_DECODE_QUERIES * x.shape[-1]:
        fits = w.shape[0] * x.shape[-1] >= QMV_MIN_WEIGHTS and qmv_supports(x, w, biases, group_size, bits)
        return (qmv if fits else qmv_ref)(x, w, scales, biases, group_size, bits)
    fits = runs_mma_tiles() and qmm_supports(x, w, biases, group_size, bits)
    return (qmm if fits else qmm_ref)(x, w, scales, biases, group_size, bits)


# Query heads x keys up to which decode_attention runs a full layer. Each query head reads its
# group's K/V (bench/kernels.py, H100, against the twin): 1.8-1.9x at 8 heads x 768 keys, 1.0-1.1x
# at 16-32 x 768, 1.3-2.8x at 8-16 x 2048 and E2B's 8 x 4096 (1.4x); 0.91x at 32 x 2048, 0.77-0.92x
# at 8-32 x 4096 with several KV heads. In the decode step the twin also costs ~9 graph nodes.
FULL_KERNEL_MAX_HEAD_KEYS = 1 << 15


def _full_decode_attention(queries, keys, values, mask):
    """decode_attention on a full layer's cache up to FULL_KERNEL_MAX_HEAD_KEYS, the twin past it
    (a shape of the traced step: the compiled step retraces when the cache buffer grows)."""
    fits = queries.shape[1] * keys.shape[2] <= FULL_KERNEL_MAX_HEAD_KEYS
    return (decode_attention if fits else decode_attention_ref)(queries, keys, values, mask)


# Keys up to which prompt_attention runs. A threadgroup walks all of its queries' keys, 32 at a
# time, so its time grows with the keys where MLX's SDPA spreads them over the GPU. In E4B bf16's
# prompt (ncu, H100) a sliding layer took 26.5 us at 128 tokens and 77.9 at 512, where the twin
# took about 38 and 49: the whole prompt 7,409 against 7,621 us at 128, 12,281 against 11,469 at 512.
PROMPT_KERNEL_MAX_KEYS = 128


def _prompt_attention(queries, keys, values, mask):
    """prompt_attention where its tiles run (runs_mma_tiles) on the shapes it supports and wins,
    the twin (MLX's SDPA) elsewhere."""
    fits = runs_mma_tiles() and prompt_attention_supports(queries) and keys.shape[2] <= PROMPT_KERNEL_MAX_KEYS
    return (prompt_attention if fits else prompt_attention_ref)(queries, keys, values, mask)


# Where a GPU runs: a kernel only where bench/kernels.py shows it beating its twin there
# (metal/README.md has the tables).
KERNELS = KernelSet(
    rope_norm=rope_norm,
    ple_inputs=ple_inputs,
    norm_residual=norm_residual,
    gelu_gate=_gelu_gate_by_rows,
    sliding_decode_attention=decode_attention,
    full_decode_attention=_full_decode_attention,
    prompt_attention=_prompt_attention,
    quantized_matmul=_quantized_matmul_by_rows,
    moe_router=moe_router,
    moe_norm_residual=moe_norm_residual,
    uses_kernels=True,
    gated_qmv=gated_qmv,
    gated_qmv_norm_residual=gated_qmv_norm_residual,
    qmv_norm_residual=qmv_norm_residual,
    qmv_rope_norm=qmv_rope_norm,
    gated_qmv_norm_residual_qmv=gated_qmv_norm_residual_qmv,
    qmv_gelu=qmv_gelu,
    qmv_norm_residual_qmv=qmv_norm_residual_qmv,
)
# Every kernel on: the model-level GPU check runs this set too.
ALL_KERNELS = KernelSet(
    rope_norm, ple_inputs, norm_residual, gelu_gate, decode_attention, decode_attention, _prompt_attention,
    _quantized_matmul_by_rows, moe_router, moe_norm_residual, True, gated_qmv, gated_qmv_norm_residual, qmv_norm_residual,
    gated_qmv_norm_residual_qmv, qmv_rope_norm, qmv_gelu, qmv_norm_residual_qmv,
)
TWINS = KernelSet(
    rope_norm_ref, ple_inputs_ref, norm_residual_ref, gelu_gate_ref, decode_attention_ref, decode_attention_ref,
    prompt_attention_ref, qmv_ref, moe_router_ref, moe_norm_residual_ref, False,
)


def select_kernels(enabled: bool | None = None) -> KernelSet:
    """KERNELS when `enabled` (default: a GPU back end exists and MLX_GEMMA4_KERNELS != "0");
    MLX_GEMMA4_KERNELS=all turns on every kernel, winners or not (for checks and benches)."""
    if not (kernels_enabled() if enabled is None else enabled):
        return TWINS
    return ALL_KERNELS if os.environ.get("MLX_GEMMA4_KERNELS") == "all" else KERNELS


__all__ = [
    "ALL_KERNELS", "KERNELS", "KernelSet", "MAX_DECODE_QUERIES", "PROMPT_ROWS", "TWINS", "decode_attention",
    "decode_attention_ref", "gated_qmv", "gated_qmv_norm_residual", "gated_qmv_norm_residual_qmv",
    "gated_qmv_norm_residual_qmv_ref", "gated_qmv_norm_residual_qmv_supports", "gated_qmv_norm_residual_ref",
    "gated_qmv_ref", "gated_qmv_supports", "gelu_gate", "gelu_gate_ref", "gpu_backend", "kernels_enabled",
    "moe_norm_residual", "moe_norm_residual_ref", "moe_router", "moe_router_ref", "norm_residual",
    "norm_residual_ref", "ple_inputs", "ple_inputs_ref", "prompt_attention", "prompt_attention_ref",
    "prompt_attention_supports", "qmm", "qmm_ref", "qmm_supports", "qmv", "qmv_gelu", "qmv_gelu_ref",
    "qmv_gelu_supports", "qmv_norm_residual", "qmv_norm_residual_qmv", "qmv_norm_residual_qmv_ref",
    "qmv_norm_residual_qmv_supports", "qmv_norm_residual_ref", "qmv_norm_residual_supports", "qmv_ref", "qmv_rope_norm",
    "qmv_rope_norm_ref", "qmv_rope_norm_supports", "qmv_supports", "rope_norm", "rope_norm_ref", "select_kernels",
]
