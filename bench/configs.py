"""Gemma 4 text configs for the benchmarks, in the released Hugging Face `text_config` form.

The four real configs carry the released geometry. Each `-mini` variant keeps its model's
structure (layer pattern, PLE, KV sharing, k_eq_v, MoE, the 1:2 sliding:global head_dim
ratio) at a size that runs on two CPU cores in seconds.
"""

from __future__ import annotations

S, F = "sliding_attention", "full_attention"

# Shared by every Gemma 4 release (global_head_dim and RoPE as the hub config.json files write them).
COMMON = {
    "model_type": "gemma4_text",
    "vocab_size": 262144,
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "head_dim": 256,
    "global_head_dim": 512,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "dtype": "bfloat16",
}

# Every structural key is spelled out: mlx-lm's ModelArgs defaults are E2B's (PLE 256, 20 shared layers).
E2B = {
    **COMMON,
    "hidden_size": 1536,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "num_global_key_value_heads": None,
    "attention_k_eq_v": False,
    "intermediate_size": 6144,
    "use_double_wide_mlp": True,
    "layer_types": ([S] * 4 + [F]) * 7,
    "sliding_window": 512,
    "hidden_size_per_layer_input": 256,
    "vocab_size_per_layer_input": 262144,
    "num_kv_shared_layers": 20,
    "enable_moe_block": False,
    "max_position_embeddings": 131072,
}

E4B = {
    **E2B,
    "hidden_size": 2560,
    "num_hidden_layers": 42,
    "num_key_value_heads": 2,
    "intermediate_size": 10240,
    "use_double_wide_mlp": False,
    "layer_types": ([S] * 5 + [F]) * 7,
    "num_kv_shared_layers": 18,
}

E31B = {
    **COMMON,
    "hidden_size": 5376,
    "num_hidden_layers": 60,
    "num_attention_heads": 32,
    "num_key_value_heads": 16,
    "num_global_key_value_heads": 4,
    "attention_k_eq_v": True,
    "intermediate_size": 21504,
    "use_double_wide_mlp": False,
    "layer_types": ([S] * 5 + [F]) * 10,
    "sliding_window": 1024,
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 262144,
    "num_kv_shared_layers": 0,
    "enable_moe_block": False,
    "max_position_embeddings": 262144,
}

E26B_A4B = {
    **E31B,
    "hidden_size": 2816,
    "num_hidden_layers": 30,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_global_key_value_heads": 2,
    "intermediate_size": 2112,
    "layer_types": ([S] * 5 + [F]) * 5,
    "enable_moe_block": True,
    "num_experts": 128,
    "top_k_experts": 8,
    "moe_intermediate_size": 704,
}

# Mini sizes: widths are multiples of 64 so every matrix quantizes with group size 64, and
# the window (128) is shorter than the benchmark prompts so the sliding caches wrap.
MINI_COMMON = {
    "vocab_size": 16384,
    "head_dim": 64,
    "global_head_dim": 128,
    "sliding_window": 128,
}

MODELS: dict[str, dict] = {
    "e2b": E2B,
    "e4b": E4B,
    "26b-a4b": E26B_A4B,
    "31b": E31B,
    # 10 layers, the last 5 KV-shared (the 5 owners include a full layer to share from).
    "e2b-mini": {
        **E2B,
        **MINI_COMMON,
        "hidden_size": 256,
        "num_hidden_layers": 10,
        "intermediate_size": 1024,
        "layer_types": ([S] * 4 + [F]) * 2,
        "hidden_size_per_layer_input": 64,
        "vocab_size_per_layer_input": 16384,
        "num_kv_shared_layers": 5,
    },
    # Two 6-layer groups: the second is KV-shared, as E4B shares its last 18 of 42.
    "e4b-mini": {
        **E4B,
        **MINI_COMMON,
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "intermediate_size": 1536,
        "layer_types": ([S] * 5 + [F]) * 2,
        "hidden_size_per_layer_input": 64,
        "vocab_size_per_layer_input": 16384,
        "num_kv_shared_layers": 6,
    },
    # Dense MLP plus 32 routed experts, 2 active: the real model's 1/16 share (8 of 128). One
    # 6-layer group only: MLX's CPU expert matmul (gather_qmm) is slow in bf16 activations.
    "26b-a4b-mini": {
        **E26B_A4B,
        **MINI_COMMON,
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "num_global_key_value_heads": 1,
        "intermediate_size": 192,
        "layer_types": [S] * 5 + [F],
        "vocab_size_per_layer_input": 16384,
        "num_experts": 32,
        "top_k_experts": 2,
        "moe_intermediate_size": 128,
    },
    "31b-mini": {
        **E31B,
        **MINI_COMMON,
        "hidden_size": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "num_global_key_value_heads": 1,
        "intermediate_size": 2048,
        "layer_types": ([S] * 5 + [F]) * 2,
        "vocab_size_per_layer_input": 16384,
    },
}


def default_prompt_lengths(model: str) -> tuple[int, ...]:
    """Prompt lengths benchmarked when none are given: 2048-token prompts only on real sizes."""
    return (128, 512) if model.endswith("-mini") else (128, 512, 2048)
