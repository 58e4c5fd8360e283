"""Load a converted checkpoint (or a hub id: download, convert into a local cache, load)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig, is_converted, read_config_file
from .errors import CheckpointError, ConfigError, Gemma4Error
from .model import Model

WEIGHTS_INDEX = "model.safetensors.index.json"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def converted_cache_dir() -> Path:
    """Where hub checkpoints are converted to; MLX_GEMMA4_CACHE overrides."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx_gemma4"
    return Path(os.environ.get("MLX_GEMMA4_CACHE", default))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # hub errors vary by version: network, auth, missing repo
        raise Gemma4Error(f"could not download '{repo_id}' from the Hugging Face hub: {exc}") from None


def resolve_model_path(path_or_id: str | Path) -> Path:
    """A converted directory for `path_or_id`, converting a downloaded HF checkpoint once."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} is not a directory")
        if not is_converted(read_config_file(path)):
            raise ConfigError(
                f"{path} is a Hugging Face checkpoint, not a converted one: run "
                f"`mlx-gemma4 convert --hf-path {path} --mlx-path {path.name}-mlx` and load that"
            )
        return path
    if not HUB_ID.match(str(path_or_id)):
        raise ConfigError(f"{path} does not exist (give a converted directory or a hub id such as org/name)")
    target = converted_cache_dir() / str(path_or_id).replace("/", "--")
    if target.is_dir():
        return target
    snapshot = _download(str(path_or_id))
    if is_converted(read_config_file(snapshot)):
        return snapshot
    from .convert import convert

    convert(snapshot, target)
    return target


def _weight_files(path: Path) -> list[Path]:
    index = path / WEIGHTS_INDEX
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    return sorted(path.glob("*.safetensors"))


def _quantize_like_checkpoint(model: Model, quantization: dict, weights: dict):
    """Swap in quantized modules wherever the checkpoint holds `<module>.scales`."""
    overrides = quantization.get("modules", {})

    def predicate(module_path: str, module: nn.Module):
        if f"{module_path}.scales" not in weights:
            return False
        params = {"group_size": quantization["group_size"], "bits": quantization["bits"], "mode": "affine"}
        return {**params, **overrides.get(module_path, {})}

    nn.quantize(model, class_predicate=predicate)


def _check_back_end_can_run(model: Model):
    """MLX's CPU gather_mm multiplies float32 only: unquantized bf16/fp16 experts fail there."""
    if not model.config.enable_moe_block or mx.metal.is_available() or mx.cuda.is_available():
        return
    experts = model.layers[0].experts.down_proj
    if "scales" not in experts and experts.weight.dtype != mx.float32:
        raise Gemma4Error(
            f"MLX's CPU back end runs unquantized MoE experts only in float32, these are "
            f"{experts.weight.dtype}: convert with --dtype float32, or quantize with -q"
        )


def _build_model(config: ModelConfig, weights: dict[str, mx.array], source: str) -> Model:
    """`config`'s model holding converted `weights` (lazy ones stay lazy): quantized where the
    weights hold `<module>.scales`, loaded strictly, projections fused."""
    model = Model(config)
    if config.quantization:
        _quantize_like_checkpoint(model, config.quantization, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise CheckpointError(f"{source}: weights do not match the config ({exc})") from None
    model.use_kernels(model.ops)  # quantized projections take the kernel set's matmul
    return model.fuse_projections()


def load_converted(path: Path) -> Model:
    """Build the model of a converted directory and load every weight strictly (lazily)."""
    config = ModelConfig.from_dict(read_config_file(path))
    files = _weight_files(path)
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights")
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except Exception as exc:  # MLX raises RuntimeError/ValueError for unreadable files
            raise CheckpointError(f"{file} could not be read ({exc})") from None
    return _build_model(config, weights, str(path))


def _ready_to_run(model: Model) -> Model:
    """Refuse what this back end cannot run, then read every weight in. One layer at a time:
    weights computed lazily (say, quantized from a bf16 source) then hold one layer's sources at most."""
    _check_back_end_can_run(model)
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())  # what no layer holds: embeddings, final norm, PLE projection
    model.keep_transposed_weights()
    model.keep_scalars_off_the_small_pool()
    return model


def model_from_weights(config: ModelConfig, weights: dict[str, mx.array]) -> Model:
    """A ready model from converted weights held in memory, with no files: built as
    `load_converted` builds a directory's. `config.quantization` is what `convert` would write
    (`mlx_gemma4.convert.quantization_config`), `weights` what it would (`convert_tensors`)."""
    return _ready_to_run(_build_model(config, weights, "in-memory weights"))


def load_model(path_or_id: str | Path) -> Model:
    """The model of a converted checkpoint (or hub id), weights loaded and checked."""
    return _ready_to_run(load_converted(resolve_model_path(path_or_id)))


def load(path_or_id: str | Path):
    """(model, tokenizer) from a converted checkpoint or a hub id."""
    from .tokenizer import Tokenizer

    path = resolve_model_path(path_or_id)
    return load_model(path), Tokenizer.from_dir(path)


from ._callable import make_module_callable  # noqa: E402  (needs `load` defined above)

make_module_callable(__name__, "load")
