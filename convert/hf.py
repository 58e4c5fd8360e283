"""Read a Hugging Face Gemma 4 checkpoint: validate config, shards and headers before any work."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from mlx_gemma4.config import ModelConfig, from_hf_config, is_converted, read_config_file
from mlx_gemma4.errors import CheckpointError, ConfigError

INDEX_FILE = "model.safetensors.index.json"


@dataclass
class HFCheckpoint:
    path: Path
    raw_config: dict
    config: ModelConfig
    shards: list[Path]
    num_tensors: int


def _shard_files(path: Path) -> list[Path]:
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path} is not a valid safetensors index") from None
        shards = sorted({path / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} named in {INDEX_FILE} is missing")
        return shards
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path} has no .safetensors weights")
    return shards


def _count_tensors(shard: Path) -> int:
    """Open the shard's header; safetensors refuses truncated or corrupt files here."""
    try:
        with safe_open(str(shard), framework="numpy") as handle:
            return len(list(handle.keys()))
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError variants
        raise CheckpointError(f"{shard.name} is truncated or corrupt ({str(exc).splitlines()[0]})") from None


def read_hf_checkpoint(hf_path: str | Path) -> HFCheckpoint:
    path = Path(hf_path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    raw = read_config_file(path)
    if is_converted(raw):
        raise ConfigError(f"{path} is already an mlx_gemma4 checkpoint; load it directly")
    config = from_hf_config(raw)
    shards = _shard_files(path)
    return HFCheckpoint(path, raw, config, shards, sum(_count_tensors(s) for s in shards))
