"""Config ingestion: both HF forms into one per-layer table; clear errors for what we cannot run."""

from __future__ import annotations

import pytest

from mlx_gemma4.config import FULL, SLIDING, ModelConfig, from_hf_config
from mlx_gemma4.errors import ConfigError

BASE = dict(
    model_type="gemma4_text", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=100,
    layer_types=[SLIDING, FULL, SLIDING, FULL],
)


def test_zero_padded_per_layer_config_keys_are_read():
    config = from_hf_config({**BASE, "per_layer_config": {"01": {"head_dim": 32, "num_key_value_heads": 1}}})
    assert [(l.head_dim, l.num_kv_heads) for l in config.layers] == [(16, 2), (32, 1), (16, 2), (16, 2)]


def test_released_form_applies_global_head_dim_and_ignores_global_kv_without_k_eq_v():
    config = from_hf_config({**BASE, "global_head_dim": 32, "num_global_key_value_heads": 1})
    assert [(l.head_dim, l.num_kv_heads, l.k_eq_v) for l in config.layers][1] == (32, 2, False)


def test_converted_config_round_trips():
    config = from_hf_config({**BASE, "num_kv_shared_layers": 2, "use_double_wide_mlp": True})
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert [l.kv_source for l in config.layers] == [0, 1, 0, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_kv_shared_layers": 4}, "no earlier layer of its type"),
        ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0}}}, "RoPE type 'yarn'"),
        ({"layer_types": [SLIDING] * 3}, "3 entries for 4 layers"),
        ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
        ({"model_type": "gemma4_unified"}, "model_type 'gemma4_unified' is not supported"),
        ({"num_key_value_heads": 3}, "do not divide"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        from_hf_config({**BASE, **change})


def test_converted_format_version_is_checked():
    data = from_hf_config(BASE).to_dict()
    data["format_version"] = 99
    with pytest.raises(ConfigError, match="convert the Hugging Face checkpoint again"):
        ModelConfig.from_dict(data)
