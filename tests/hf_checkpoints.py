"""Tiny random-weight Gemma 4 checkpoints written by transformers (torch CPU, float32, seeded).

Each variant exercises a different part of the family; every one has a sliding window far
shorter than the test prompts. Norm weights, `layer_scalar` and router scales are random (not
all ones) so a missing multiply shows up in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

S, F = "sliding_attention", "full_attention"
WINDOW = 6
EMBED_STD = 0.25


COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    head_dim=16,
    sliding_window=WINDOW,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)

VARIANTS = {
    # E2B-like: PLE, trailing KV-shared layers (sliding and full), double-wide MLP on shared
    # layers; written as the released multimodal wrapper with towers, the released config form
    # (global_head_dim, no per_layer_config), sharded, carrying unused k/v of shared layers.
    "ple_shared": dict(
        layout="conditional",
        config_form="released",
        text=dict(
            COMMON,
            vocab_size=256,
            num_hidden_layers=8,
            num_key_value_heads=1,
            global_head_dim=32,
            layer_types=[S, S, F, S, S, F, S, F],
            num_kv_shared_layers=3,
            use_double_wide_mlp=True,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=256,
        ),
    ),
    # 31B-like: attention_k_eq_v with fewer global KV heads, no PLE, a vocabulary that is not a
    # power of two; the per_layer_config form transformers >= 5.23 writes.
    "k_eq_v": dict(
        layout="causal",
        config_form="per_layer",
        text=dict(
            COMMON,
            vocab_size=300,
            num_hidden_layers=6,
            num_key_value_heads=2,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            layer_types=[S, S, F, S, S, F],
            hidden_size_per_layer_input=0,
        ),
    ),
    # 26B-A4B-like: dense MLP plus routed experts, k_eq_v full layers.
    "moe": dict(
        layout="causal",
        config_form="per_layer",
        text=dict(
            COMMON,
            vocab_size=256,
            num_hidden_layers=4,
            num_key_value_heads=2,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            layer_types=[S, F, S, F],
            hidden_size_per_layer_input=0,
            enable_moe_block=True,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=32,
        ),
    ),
}


# Variants fitted for a few steps to a synthetic Markov chain, so that next-token distributions
# are peaked the way a real model's are (random weights leave near-ties everywhere).
TRAINED = {"ple_trained": "ple_shared"}
TRAIN_STEPS = 150


def variant_spec(name: str) -> dict:
    return VARIANTS[TRAINED.get(name, name)]


def _randomize(model, seed: int):
    """Weights large enough that logits spread (std 0.02 leaves near-ties everywhere)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary_emb" in name or "position" in name:
                continue
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention has scale 1.0: unit-RMS q/k with weights ~1 give scores of +-20 in
                # these tiny heads, and that softmax amplifies float32 round-off past 1e-4.
                tensor.copy_(torch.empty_like(tensor).uniform_(0.25, 0.75, generator=generator))
            elif name.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")):
                tensor.copy_(torch.empty_like(tensor).uniform_(0.5, 1.5, generator=generator))
            elif tensor.ndim >= 2 and tensor.is_floating_point():
                fan_in = tensor.shape[-1]
                std = EMBED_STD if "embed_tokens" in name else fan_in**-0.5
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def train_on_markov_chain(model, vocab_size: int, steps: int, seed: int):
    """Fit `model` to text where each token has three successors with odds 0.7 / 0.2 / 0.1.

    The likeliest successors form one cycle through the vocabulary, so a greedy run visits
    every token instead of settling into a short loop.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(3, vocab_size, (vocab_size, 3), generator=generator)
    cycle = 3 + torch.randperm(vocab_size - 3, generator=generator)
    successors[cycle, 0] = cycle.roll(-1)
    odds = torch.tensor([0.7, 0.2, 0.1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch, length = 4, 288  # as long as the test's greedy runs: positions beyond training drift
        choices = torch.multinomial(odds, batch * length, replacement=True, generator=generator).view(batch, length)
        tokens = torch.empty(batch, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(3, vocab_size, (batch,), generator=generator)
        for t in range(1, length):
            tokens[:, t] = successors[tokens[:, t - 1], choices[:, t]]
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def build_model(name: str, seed: int = 0):
    """The transformers model for a variant, float32, eval mode."""
    import torch
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForCausalLM,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    spec = variant_spec(name)
    torch.manual_seed(seed)
    text = Gemma4TextConfig(**spec["text"], attn_implementation="eager")
    if spec["layout"] == "conditional":
        vision = Gemma4VisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, global_head_dim=8,
        )
        audio = Gemma4AudioConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[4, 4],
            output_proj_dims=16,
        )
        config = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio)
        config.text_config._attn_implementation = "eager"
        model = Gemma4ForConditionalGeneration(config)
    else:
        model = Gemma4ForCausalLM(text)
    _randomize(model, seed)
    model.config._attn_implementation = "eager"
    if name in TRAINED:
        train_on_markov_chain(model, spec["text"]["vocab_size"], TRAIN_STEPS, seed)
    return model.eval()


def _to_released_form(config_path: Path, text_spec: dict):
    """Rewrite a transformers-5.23 config.json in the form the hub releases carry."""
    data = json.loads(config_path.read_text())
    text = data["text_config"] if "text_config" in data else data
    text.pop("per_layer_config", None)
    text["global_head_dim"] = text_spec["global_head_dim"]
    text["num_global_key_value_heads"] = text_spec.get("num_global_key_value_heads")
    config_path.write_text(json.dumps(data, indent=2))


def _add_unused_shared_kv(directory: Path, model, spec: dict):
    """Released E2B files still hold k/v weights for KV-shared layers; mimic that."""
    import torch
    from safetensors.torch import save_file

    text = spec["text"]
    first_shared = text["num_hidden_layers"] - text["num_kv_shared_layers"]
    extra = {}
    for layer in range(first_shared, text["num_hidden_layers"]):
        is_full = text["layer_types"][layer] == F
        head_dim = text["global_head_dim"] if is_full else text["head_dim"]
        width = text["num_key_value_heads"] * head_dim
        prefix = f"model.language_model.layers.{layer}.self_attn."
        extra[prefix + "k_proj.weight"] = torch.randn(width, text["hidden_size"])
        extra[prefix + "v_proj.weight"] = torch.randn(width, text["hidden_size"])
        extra[prefix + "k_norm.weight"] = torch.ones(head_dim)
    save_file(extra, str(directory / "model-unused-kv.safetensors"), metadata={"format": "pt"})
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({key: "model-unused-kv.safetensors" for key in extra})
    index_path.write_text(json.dumps(index))


def write_tokenizer(directory: Path, vocab_size: int):
    """A word-level tokenizer over `vocab_size` ids: enough for load() to return a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))


def write_checkpoint(name: str, directory: Path, seed: int = 0):
    """Save variant `name` as a Hugging Face checkpoint directory; returns the torch model."""
    spec = variant_spec(name)
    model = build_model(name, seed)
    directory.mkdir(parents=True, exist_ok=True)
    sharded = spec["layout"] == "conditional"
    model.save_pretrained(str(directory), max_shard_size="200KB" if sharded else "1GB")
    if sharded:
        _add_unused_shared_kv(directory, model, spec)
    if spec["config_form"] == "released":
        _to_released_form(directory / "config.json", spec["text"])
    write_tokenizer(directory, spec["text"]["vocab_size"])
    return model
