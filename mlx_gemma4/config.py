"""Model configuration: the HF config forms in, one explicit per-layer table out.

A converted checkpoint's config.json carries `layer_configs`, one entry per decoder layer, so
the model never re-derives layer geometry from the HF rules at load time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError

FORMAT_NAME = "mlx_gemma4"
FORMAT_VERSION = 1
SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_MODEL_TYPES = ("gemma4", "gemma4_text")
SUPPORTED_ROPE_SCHEMES = ("default", "proportional")


@dataclass(frozen=True)
class RopeConfig:
    scheme: str  # "default" rotates every pair, "proportional" only the first `rotated_dims // 2`
    theta: float
    rotated_dims: int  # dims that rotate, counted as 2 per (j, j + head_dim/2) pair
    factor: float = 1.0  # divides every frequency (transformers' `factor`, 1.0 on all releases)


@dataclass(frozen=True)
class LayerConfig:
    layer_type: str
    head_dim: int
    num_kv_heads: int
    rope: RopeConfig
    sliding_window: int | None  # keys a query sees, itself included; None on full layers
    kv_source: int  # the layer whose K/V this layer attends to; itself when it owns a cache
    intermediate_size: int
    k_eq_v: bool  # V comes from the k_proj output (no v_proj), 31B / 26B full layers

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    layers: tuple[LayerConfig, ...]
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)
    quantization: dict | None = field(default=None, compare=False)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def enable_moe_block(self) -> bool:
        return self.num_experts > 0

    @property
    def cache_owners(self) -> list[int]:
        """Indices of the layers that own a KV cache, in order."""
        return [i for i, layer in enumerate(self.layers) if layer.kv_source == i]

    def to_dict(self) -> dict:
        out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_type": "gemma4_text"}
        for name, value in asdict(self).items():
            if name == "layers":
                out["layer_configs"] = value
            elif name == "eos_token_ids":
                out[name] = list(value)
            elif name != "quantization" or value is not None:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Read a converted config.json (the one `to_dict` writes)."""
        if data.get("format") != FORMAT_NAME:
            raise ConfigError("config.json is not an mlx_gemma4 converted config")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint format version {version} is not supported by this mlx_gemma4 "
                f"(expects {FORMAT_VERSION}); convert the Hugging Face checkpoint again"
            )
        layers = tuple(
            LayerConfig(**{**entry, "rope": RopeConfig(**entry["rope"])}) for entry in data["layer_configs"]
        )
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "layers"}
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", (1, 106)))
        return cls(layers=layers, **fields)


def read_config_file(path: Path) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{path} has no config.json")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path} does not hold a JSON object")
    return data


def is_converted(data: dict) -> bool:
    return data.get("format") == FORMAT_NAME


def _require(text: dict, key: str):
    if text.get(key) is None:
        raise ConfigError(f"config.json text config lacks '{key}'")
    return text[key]


def _rope_for(text: dict, layer_type: str, head_dim: int) -> RopeConfig:
    params = (text.get("rope_parameters") or {}).get(layer_type)
    if params is None:  # transformers' defaults when the dict is absent
        params = (
            {"rope_type": "default", "rope_theta": 10_000.0}
            if layer_type == SLIDING
            else {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}
        )
    scheme = params.get("rope_type", "default")
    if scheme not in SUPPORTED_ROPE_SCHEMES:
        raise ConfigError(f"RoPE type '{scheme}' on {layer_type} layers is not supported")
    partial = float(params.get("partial_rotary_factor", 1.0))
    if scheme == "default" and partial != 1.0:
        raise ConfigError("partial_rotary_factor is only supported with proportional RoPE")
    # modeling_rope_utils._compute_proportional_rope_parameters: rope_angles = int(p * hd // 2)
    rotated_pairs = int(partial * head_dim // 2)
    return RopeConfig(
        scheme=scheme,
        theta=float(params["rope_theta"]),
        rotated_dims=2 * rotated_pairs,
        factor=float(params.get("factor", 1.0)),
    )


def _per_layer_overrides(text: dict, layer_types: list[str]) -> dict[int, dict]:
    """Overrides per layer index, from either config form (reference section 4.13)."""
    if "per_layer_config" in text and text["per_layer_config"] is not None:
        try:
            return {int(k): dict(v) for k, v in text["per_layer_config"].items()}
        except (TypeError, ValueError, AttributeError):
            raise ConfigError("per_layer_config must map layer indices to override objects") from None
    # Released form: Gemma4TextConfig.__post_init__ synthesises these two overrides for full layers.
    override = {"head_dim": text.get("global_head_dim") or 512}
    global_kv = text.get("num_global_key_value_heads")
    if text.get("attention_k_eq_v") and global_kv is not None:
        override["num_key_value_heads"] = global_kv
    return {i: override for i, kind in enumerate(layer_types) if kind == FULL}


def from_hf_config(data: dict) -> ModelConfig:
    """Build the per-layer table from a Hugging Face Gemma 4 config.json (either form)."""
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type '{model_type}' is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    text = data.get("text_config") if model_type == "gemma4" else data
    if not isinstance(text, dict):
        raise ConfigError("config.json of a gemma4 model lacks a text_config object")

    num_layers = _require(text, "num_hidden_layers")
    layer_types = list(text.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)])
    if len(layer_types) != num_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = set(layer_types) - {SLIDING, FULL}
    if unknown:
        raise ConfigError(f"unsupported layer types {sorted(unknown)}")
    layer_types[-1] = FULL  # transformers forces the last layer to full attention too
    if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"hidden_activation '{text['hidden_activation']}' is not supported")
    if text.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported (no Gemma 4 release uses it)")
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError("use_bidirectional_attention='all' is not supported for text generation")

    overrides = _per_layer_overrides(text, layer_types)
    num_shared = int(text.get("num_kv_shared_layers") or 0)
    first_shared = num_layers - num_shared
    layers = []
    for i, layer_type in enumerate(layer_types):
        settings = {**text, **overrides.get(i, {})}
        head_dim = int(_require(settings, "head_dim"))
        if i < first_shared:
            kv_source = i
        else:  # a shared layer reads the last non-shared layer of its own type
            owners = [j for j in range(first_shared) if layer_types[j] == layer_type]
            if not owners:
                raise ConfigError(f"KV-shared layer {i} ({layer_type}) has no earlier layer of its type to share")
            kv_source = owners[-1]
        width = int(_require(settings, "intermediate_size"))
        if text.get("use_double_wide_mlp") and i >= first_shared:
            width *= 2  # Gemma4TextMLP: double width only on KV-shared layers
        layers.append(
            LayerConfig(
                layer_type=layer_type,
                head_dim=head_dim,
                num_kv_heads=int(_require(settings, "num_key_value_heads")),
                rope=_rope_for(text, layer_type, head_dim),
                sliding_window=int(settings.get("sliding_window") or 512) if layer_type == SLIDING else None,
                kv_source=kv_source,
                intermediate_size=width,
                k_eq_v=bool(text.get("attention_k_eq_v")) and layer_type == FULL,
            )
        )

    num_heads = int(_require(text, "num_attention_heads"))
    for i, layer in enumerate(layers):
        if num_heads % layer.num_kv_heads:
            raise ConfigError(f"layer {i}: {num_heads} query heads do not divide into {layer.num_kv_heads} KV heads")

    moe = bool(text.get("enable_moe_block"))
    eos = data.get("eos_token_id", text.get("eos_token_id", [1, 106]))
    ple = int(text.get("hidden_size_per_layer_input") or 0)
    return ModelConfig(
        hidden_size=int(_require(text, "hidden_size")),
        num_attention_heads=num_heads,
        vocab_size=int(_require(text, "vocab_size")),
        layers=tuple(layers),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=text.get("final_logit_softcapping"),
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or 0) if ple else 0,
        num_experts=int(_require(text, "num_experts")) if moe else 0,
        top_k_experts=int(_require(text, "top_k_experts")) if moe else 0,
        moe_intermediate_size=int(_require(text, "moe_intermediate_size")) if moe else 0,
        tie_word_embeddings=bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        pad_token_id=int(text.get("pad_token_id", 0) or 0),
        bos_token_id=int(text.get("bos_token_id", 2) or 2),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
    )
