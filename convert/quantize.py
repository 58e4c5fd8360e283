"""Which converted tensors get quantized, and at how many bits."""

from __future__ import annotations

import re

import mlx.core as mx

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Layers whose error feeds every token strongly: 4-bit PLE projections and routers give garbage
# (peers' reports), so they stay at `sensitive_bits` (8 by default) when asked for fewer.
SENSITIVE = re.compile(
    r"^per_layer_model_projection\.weight$|\.(per_layer_input_gate|per_layer_projection|router\.proj)\.weight$"
)
# The PLE table, 1.2-1.4 GB more at 8 bits than at 4 on E2B/E4B: peers ship it at 4 (mlx-lm), 4.5 (llama.cpp
# IQ4_NL) and 5.5 bits a weight (Unsloth's Q5_K); one reports garbage at 4 (Rapid-MLX#1114). 5 bits here.
PLE_TABLE = "embed_tokens_per_layer.weight"
PLE_TABLE_BITS = 5
SENSITIVE_BITS = 8


def quantizable(key: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Matrices of Linear / Embedding / SwitchLinear modules whose rows split into whole groups."""
    return key.endswith(".weight") and len(shape) >= 2 and shape[-1] % group_size == 0


def bits_for(key: str, bits: int, sensitive_bits: int = SENSITIVE_BITS, ple_table_bits: int = PLE_TABLE_BITS) -> int:
    if key == PLE_TABLE:
        return max(bits, ple_table_bits)
    return max(bits, sensitive_bits) if SENSITIVE.search(key) else bits


def quantize_weight(key: str, weight: mx.array, bits: int, group_size: int) -> dict[str, mx.array]:
    """`module.weight` -> packed weight plus `module.scales` / `module.biases` (affine mode)."""
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    stem = key[: -len(".weight")]
    return {key: packed, f"{stem}.scales": scales, f"{stem}.biases": biases}
