"""Which converted tensors get quantized, and at how many bits."""

from __future__ import annotations

import re

import mlx.core as mx

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Layers whose error feeds every token strongly: 4-bit PLE tables and routers give garbage
# (peers' reports), so they stay at `sensitive_bits` (8 by default) when asked for fewer.
SENSITIVE = re.compile(
    r"^(embed_tokens_per_layer|per_layer_model_projection)\.weight$"
    r"|\.(per_layer_input_gate|per_layer_projection|router\.proj)\.weight$"
)


def quantizable(key: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Matrices of Linear / Embedding / SwitchLinear modules whose rows split into whole groups."""
    return key.endswith(".weight") and len(shape) >= 2 and shape[-1] % group_size == 0


def bits_for(key: str, bits: int, sensitive_bits: int) -> int:
    return max(bits, sensitive_bits) if SENSITIVE.search(key) else bits


def quantize_weight(key: str, weight: mx.array, bits: int, group_size: int) -> dict[str, mx.array]:
    """`module.weight` -> packed weight plus `module.scales` / `module.biases` (affine mode)."""
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    stem = key[: -len(".weight")]
    return {key: packed, f"{stem}.scales": scales, f"{stem}.biases": biases}
