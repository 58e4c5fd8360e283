"""Convert a Hugging Face Gemma 4 checkpoint into an mlx_gemma4 directory, atomically."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from huggingface_hub.utils import tqdm
from mlx.utils import tree_flatten

from mlx_gemma4.config import ModelConfig
from mlx_gemma4.errors import CheckpointError, Gemma4Error
from mlx_gemma4.load import load_converted
from mlx_gemma4.model import Model

from .hf import read_hf_checkpoint
from .mapping import map_tensor
from .quantize import (
    PLE_TABLE_BITS,
    SENSITIVE_BITS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    bits_for,
    quantizable,
    quantize_weight,
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SHARD_BYTES = 2 << 30  # 2 GiB output shards: small enough to stream, few enough to open fast
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A hidden sibling directory that becomes `target` only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class _ShardWriter:
    """Collects tensors and writes a safetensors shard each time SHARD_BYTES is reached."""

    def __init__(self, directory: Path):
        self.directory, self.pending, self.pending_bytes = directory, {}, 0
        self.weight_map: dict[str, str] = {}

    def add(self, key: str, tensor: mx.array):
        self.pending[key] = tensor
        self.pending_bytes += tensor.nbytes
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        name = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        mx.save_safetensors(str(self.directory / name), self.pending, metadata={"format": "mlx"})
        self.weight_map.update({key: name for key in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        self.flush()
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return len(self.weight_map)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the unquantized model; arrays stay lazy, nothing is allocated."""
    return {key: tuple(value.shape) for key, value in tree_flatten(Model(config).parameters())}


def _check_options(dtype: str, quantize_bits: int | None, group_size: int, sensitive_bits: int, ple_table_bits: int):
    if dtype not in DTYPES:
        raise Gemma4Error(f"dtype '{dtype}' is not supported (choose from {', '.join(DTYPES)})")
    if quantize_bits is not None and quantize_bits not in SUPPORTED_BITS:
        raise Gemma4Error(f"{quantize_bits}-bit quantization is not supported (choose from {SUPPORTED_BITS})")
    if sensitive_bits not in SUPPORTED_BITS:
        raise Gemma4Error(f"sensitive_bits {sensitive_bits} is not supported (choose from {SUPPORTED_BITS})")
    if ple_table_bits not in SUPPORTED_BITS:
        raise Gemma4Error(f"ple_table_bits {ple_table_bits} is not supported (choose from {SUPPORTED_BITS})")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise Gemma4Error(f"group size {group_size} is not supported (choose from {SUPPORTED_GROUP_SIZES})")


def quantization_config(
    config: ModelConfig,
    quantize_bits: int | None,
    group_size: int = 64,
    sensitive_bits: int = SENSITIVE_BITS,
    ple_table_bits: int = PLE_TABLE_BITS,
) -> dict | None:
    """The `quantization` entry `convert` writes into config.json (None unquantized): default bits,
    group size, and the modules held at other bits. Names and shapes alone decide which matrices
    quantize at how many bits, so the config suffices."""
    if not quantize_bits:
        return None
    module_bits = {
        key[: -len(".weight")]: bits_for(key, quantize_bits, sensitive_bits, ple_table_bits)
        for key, shape in _expected_shapes(config).items()
        if quantizable(key, shape, group_size)
    }
    overrides = {m: {"bits": b} for m, b in sorted(module_bits.items()) if b != quantize_bits}
    return {"group_size": group_size, "bits": quantize_bits, "mode": "affine", "modules": overrides}


def convert_tensors(
    config: ModelConfig,
    tensors: Iterable[tuple[str, mx.array]],
    *,
    dtype: str = "bfloat16",
    quantize_bits: int | None = None,
    group_size: int = 64,
    sensitive_bits: int = SENSITIVE_BITS,
    ple_table_bits: int = PLE_TABLE_BITS,
) -> Iterator[tuple[str, mx.array]]:
    """Converted (key, array) pairs of Hugging Face (name, tensor) pairs, one tensor at a time and
    lazily: renamed, checked against `config`'s shapes, cast to `dtype`, quantized as `convert` does.

    Raises CheckpointError on an unexpected or misshapen tensor, and after the last one if a
    tensor the config needs never came.
    """
    _check_options(dtype, quantize_bits, group_size, sensitive_bits, ple_table_bits)
    expected, seen = _expected_shapes(config), set()
    for hf_key, tensor in tensors:
        for key, value in map_tensor(hf_key, tensor, config):
            if key not in expected:
                raise CheckpointError(f"unexpected tensor '{hf_key}' (the config has no '{key}')")
            if tuple(value.shape) != expected[key]:
                raise CheckpointError(
                    f"tensor '{hf_key}' has shape {tuple(value.shape)}, the config implies {expected[key]}"
                )
            seen.add(key)
            value = value.astype(DTYPES[dtype])
            if quantize_bits and quantizable(key, value.shape, group_size):
                bits = bits_for(key, quantize_bits, sensitive_bits, ple_table_bits)
                yield from quantize_weight(key, value, bits, group_size).items()
            else:
                yield key, value
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor '{missing[0]}' ({len(missing)} missing in all)")


def _shard_tensors(shards: list[Path], progress: tqdm) -> Iterator[tuple[str, mx.array]]:
    """Every tensor of every shard, one shard open at a time, counted as it is consumed."""
    for shard in shards:
        for item in mx.load(str(shard)).items():
            yield item
            progress.update()


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str = "bfloat16",
    quantize_bits: int | None = None,
    group_size: int = 64,
    sensitive_bits: int = SENSITIVE_BITS,
    ple_table_bits: int = PLE_TABLE_BITS,
) -> Path:
    """Convert `hf_path` into `mlx_path`; a failure leaves no `mlx_path` behind.

    `quantize_bits` quantizes every matrix whose rows split into `group_size` groups; the PLE
    projections and MoE router use at least `sensitive_bits` (8 unless asked), the PLE table at
    least `ple_table_bits` (5 unless asked).
    """
    bit_floors = dict(sensitive_bits=sensitive_bits, ple_table_bits=ple_table_bits)
    options = dict(dtype=dtype, quantize_bits=quantize_bits, group_size=group_size, **bit_floors)
    _check_options(**options)  # before reading anything
    target = Path(mlx_path).expanduser()
    if target.exists():
        raise Gemma4Error(f"{target} already exists; choose a new --mlx-path or remove it")
    checkpoint = read_hf_checkpoint(hf_path)
    config = checkpoint.config

    with staged_directory(target) as staging:
        writer = _ShardWriter(staging)
        with tqdm(total=checkpoint.num_tensors, desc="Converting", unit="tensor") as progress:
            for key, value in convert_tensors(config, _shard_tensors(checkpoint.shards, progress), **options):
                writer.add(key, value)
        writer.close()

        quantization = quantization_config(config, quantize_bits, group_size, **bit_floors)
        out_config = replace(config, quantization=quantization).to_dict()
        (staging / "config.json").write_text(json.dumps(out_config, indent=2))
        for name in COPIED_FILES:
            if (checkpoint.path / name).is_file():
                shutil.copy2(checkpoint.path / name, staging / name)
        load_converted(staging)  # strict reload: every tensor present, every shape right
    return target
