"""The ONLY key map from Hugging Face Gemma 4 names to converted names (= module paths)."""

from __future__ import annotations

import re

import mlx.core as mx

from mlx_gemma4.config import ModelConfig

# Vision / audio towers and their projections: the text runtime does not read them.
TOWER_PREFIXES = (
    "model.vision_tower.",
    "model.audio_tower.",
    "model.embed_vision.",
    "model.embed_audio.",
)
TEXT_PREFIXES = ("model.language_model.", "model.")  # Gemma4ForConditionalGeneration, Gemma4ForCausalLM
KV_ONLY_MODULES = ("k_proj", "v_proj", "k_norm", "v_norm")
LAYER_ATTENTION_KEY = re.compile(r"layers\.(\d+)\.self_attn\.(\w+)\.")


def map_tensor(hf_key: str, tensor: mx.array, config: ModelConfig) -> list[tuple[str, mx.array]]:
    """Converted (key, tensor) pairs for one HF tensor; [] for tensors the runtime never reads."""
    if hf_key.startswith(TOWER_PREFIXES) or "rotary_emb" in hf_key:
        return []
    if hf_key == "lm_head.weight":
        return [] if config.tie_word_embeddings else [(hf_key, tensor)]
    key = next((hf_key[len(p) :] for p in TEXT_PREFIXES if hf_key.startswith(p)), hf_key)

    attention = LAYER_ATTENTION_KEY.match(key)
    if attention and attention.group(2) in KV_ONLY_MODULES:
        layer = int(attention.group(1))
        # Released E2B files still carry k/v weights on KV-shared layers; nothing reads them.
        if layer < config.num_hidden_layers and config.layers[layer].kv_source != layer:
            return []

    if key.endswith(".experts.gate_up_proj"):  # [E, 2I, H]: gate rows first, then up
        stem, width = key[: -len("gate_up_proj")], tensor.shape[1] // 2
        return [(stem + "gate_proj.weight", tensor[:, :width]), (stem + "up_proj.weight", tensor[:, width:])]
    if key.endswith(".experts.down_proj"):
        return [(key + ".weight", tensor)]
    return [(key, tensor)]
