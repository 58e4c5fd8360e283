"""Converter: layout of the output, both config forms, quantization policy, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from hf_checkpoints import F, S, VARIANTS

import mlx_gemma4
from mlx.utils import tree_flatten
from mlx_gemma4.convert import convert_tensors, quantization_config
from mlx_gemma4.convert.hf import read_hf_checkpoint
from mlx_gemma4.load import model_from_weights
from mlx_gemma4.model import Model
from mlx_gemma4.errors import Gemma4Error


def converted_config(checkpoints, name, **options) -> dict:
    return json.loads((checkpoints.converted(name, **options) / "config.json").read_text())


def test_layer_table_spells_out_every_layer(checkpoints):
    config = converted_config(checkpoints, "ple_shared")
    assert config["format"] == "mlx_gemma4" and config["format_version"] == 1
    table = config["layer_configs"]
    # Layers [S,S,F,S,S | F,S,F]: the last three share the last non-shared layer of their type.
    assert [layer["kv_source"] for layer in table] == [0, 1, 2, 3, 4, 2, 4, 2]
    assert [layer["intermediate_size"] for layer in table] == [96] * 5 + [192] * 3  # double-wide
    full, sliding = table[2], table[0]
    assert (full["layer_type"], full["head_dim"], full["num_kv_heads"], full["sliding_window"]) == (F, 32, 1, None)
    assert full["rope"] == {"scheme": "proportional", "theta": 1e6, "rotated_dims": 8, "factor": 1.0}
    assert (sliding["layer_type"], sliding["head_dim"], sliding["sliding_window"]) == (S, 16, 6)
    assert sliding["rope"] == {"scheme": "default", "theta": 1e4, "rotated_dims": 16, "factor": 1.0}


def test_k_eq_v_layers_get_global_kv_heads(checkpoints):
    table = converted_config(checkpoints, "k_eq_v")["layer_configs"]
    assert [(layer["num_kv_heads"], layer["k_eq_v"]) for layer in table] == [(2, False)] * 2 + [(1, True)] + [
        (2, False)
    ] * 2 + [(1, True)]


def test_released_and_per_layer_config_forms_give_the_same_table(checkpoints, tmp_path):
    released = tmp_path / "released"
    shutil.copytree(checkpoints.hf_dir("k_eq_v"), released)
    config = json.loads((released / "config.json").read_text())
    assert "per_layer_config" in config  # the form transformers 5.23 writes
    config.pop("per_layer_config")
    config.update(global_head_dim=32, num_global_key_value_heads=1)
    (released / "config.json").write_text(json.dumps(config))
    mlx_gemma4.convert(released, tmp_path / "out", dtype="float32")
    table = json.loads((tmp_path / "out" / "config.json").read_text())["layer_configs"]
    assert table == converted_config(checkpoints, "k_eq_v")["layer_configs"]


def test_output_drops_towers_and_unused_shared_kv_and_copies_tokenizer(checkpoints):
    out = checkpoints.converted("ple_shared")
    keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert not any(k.startswith(("vision", "audio", "embed_vision", "embed_audio", "model.")) for k in keys)
    assert "layers.4.self_attn.k_proj.weight" in keys
    assert not any(k.startswith(("layers.5.self_attn.k", "layers.5.self_attn.v")) for k in keys)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_moe_experts_are_split_into_gate_and_up(checkpoints):
    out = checkpoints.converted("moe")
    weights = mx.load(str(next(out.glob("model-*.safetensors"))))
    experts, width = VARIANTS["moe"]["text"]["num_experts"], VARIANTS["moe"]["text"]["moe_intermediate_size"]
    assert weights["layers.0.experts.gate_proj.weight"].shape == (experts, width, 64)
    assert weights["layers.0.experts.up_proj.weight"].shape == (experts, width, 64)
    assert weights["layers.0.experts.down_proj.weight"].shape == (experts, 64, width)


def test_quantized_checkpoint_keeps_the_ple_table_at_5_bits_and_its_projections_at_8(checkpoints):
    config = converted_config(checkpoints, "ple_shared", dtype="bfloat16", quantize_bits=4)
    quantization = config["quantization"]
    assert (quantization["bits"], quantization["group_size"]) == (4, 32)
    eight_bit = {m for m, o in quantization["modules"].items() if o["bits"] == 8}
    assert {"per_layer_model_projection", "layers.0.per_layer_input_gate"} <= eight_bit
    assert quantization["modules"]["embed_tokens_per_layer"] == {"bits": 5}
    assert "layers.0.mlp.gate_proj" not in quantization["modules"]  # default bits apply


def test_more_bits_asked_than_the_floors_apply_everywhere(checkpoints):
    quantization = converted_config(checkpoints, "ple_shared", dtype="bfloat16", quantize_bits=8)["quantization"]
    assert quantization["bits"] == 8 and quantization["modules"] == {}


def test_unsupported_bit_floors_are_refused(checkpoints, tmp_path):
    for floor in ("sensitive_bits", "ple_table_bits"):
        with pytest.raises(Gemma4Error, match=f"{floor} 7 is not supported"):
            mlx_gemma4.convert(checkpoints.hf_dir("moe"), tmp_path / "out", quantize_bits=4, **{floor: 7})
    assert not (tmp_path / "out").exists()


def dequantized_twin(model):
    """A float model holding the quantized model's weights, dequantized."""
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if hasattr(module, "scales"):
            for suffix in ("scales", "biases"):
                weights.pop(f"{path}.{suffix}")
            weights[f"{path}.weight"] = mx.dequantize(
                module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits
            )
    twin = Model(model.config).fuse_projections()  # the loaded model's module layout
    twin.load_weights(list(weights.items()), strict=True)
    return twin


@pytest.mark.parametrize("name", ["ple_shared", "moe"])
def test_quantized_model_computes_with_its_dequantized_weights(checkpoints, name):
    """Quantized modules, per-module bits and the quantized tied head are wired as converted."""
    model = checkpoints.model(name, "float32", 4)
    bits = {path: module.bits for path, module in model.named_modules() if hasattr(module, "bits")}
    assert bits["embed_tokens"] == 4
    assert (bits["layers.0.router.proj"] == 8) if name == "moe" else (bits["embed_tokens_per_layer"] == 5)
    ids = mx.array(checkpoints.prompt(name, 20, seed=11))
    assert np.abs(np.array(model(ids)) - np.array(dequantized_twin(model)(ids))).max() <= 1e-4


@pytest.mark.parametrize("name", ["ple_shared", "moe"])
def test_more_bits_track_the_float_model_closer(checkpoints, name):
    ids = mx.array(checkpoints.prompt(name, 20, seed=11))
    reference = np.array(checkpoints.model(name)(ids))

    def relative_error(bits):
        quantized = np.array(checkpoints.model(name, "float32", bits)(ids))
        return np.abs(quantized - reference).mean() / np.abs(reference).mean()

    eight, four = relative_error(8), relative_error(4)
    print(f"{name}: mean relative logit error 8-bit {eight:.4f}, 4-bit {four:.4f}")
    assert eight < 0.1 and eight < four / 3


def test_in_memory_conversion_builds_the_model_of_the_converted_directory(checkpoints):
    """convert_tensors + quantization_config + model_from_weights: convert and load, no files."""
    checkpoint = read_hf_checkpoint(checkpoints.hf_dir("moe"))
    tensors = (item for shard in checkpoint.shards for item in mx.load(str(shard)).items())
    weights = dict(convert_tensors(checkpoint.config, tensors, dtype="float32", quantize_bits=4, group_size=32))
    quantization = quantization_config(checkpoint.config, 4, group_size=32)
    assert quantization == converted_config(checkpoints, "moe", quantize_bits=4)["quantization"]
    model = model_from_weights(replace(checkpoint.config, quantization=quantization), weights)
    ids = mx.array(checkpoints.prompt("moe", 12))
    assert np.array_equal(np.array(model(ids)), np.array(checkpoints.model("moe", "float32", 4)(ids)))


def corrupt_first_shard(directory):
    shard = sorted(directory.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])


def edit_tensors(change):
    """Damage that rewrites the single shard after `change(tensors)` edits its dict."""

    def damage(directory):
        from safetensors.numpy import load_file, save_file

        shard = directory / "model.safetensors"
        tensors = load_file(str(shard))
        change(tensors)
        save_file(tensors, str(shard), metadata={"format": "pt"})

    return damage


def set_config(text):
    return lambda directory: (directory / "config.json").write_text(text)


BAD_INPUTS = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "invalid JSON": (set_config("{not json"), "not valid JSON"),
    "unsupported model_type": (set_config('{"model_type": "llama"}'), "model_type 'llama' is not supported"),
    "truncated safetensors": (corrupt_first_shard, "truncated or corrupt"),
    "corrupt header": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00" + b"x" * 40), "truncated or corrupt"),
    "missing tensor": (
        edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "lacks tensor 'layers.1.mlp.up_proj.weight'",
    ),
    "wrong shape": (
        edit_tensors(lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)})),
        "has shape (65,)",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_fails_with_a_message_and_leaves_nothing(checkpoints, tmp_path, problem):
    damage, message = BAD_INPUTS[problem]
    source = tmp_path / "hf"
    shutil.copytree(checkpoints.hf_dir("moe"), source)
    damage(source)
    out = tmp_path / "converted"
    with pytest.raises(Gemma4Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        mlx_gemma4.convert(source, out, dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no staging dir


def test_missing_path_and_existing_output_are_refused(checkpoints, tmp_path):
    with pytest.raises(Gemma4Error, match="does not exist"):
        mlx_gemma4.convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(Gemma4Error, match="already exists"):
        mlx_gemma4.convert(checkpoints.hf_dir("moe"), tmp_path / "out")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_gemma4.cli", *args], capture_output=True, text=True)


def test_cli_converts_and_quantizes(checkpoints, tmp_path):
    result = run_cli(
        "convert", "--hf-path", str(checkpoints.hf_dir("moe")), "--mlx-path", str(tmp_path / "q8"),
        "-q", "--q-bits", "8", "--q-group-size", "32",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8


def test_cli_sets_the_ple_table_bits(checkpoints, tmp_path):
    result = run_cli(
        "convert", "--hf-path", str(checkpoints.hf_dir("ple_shared")), "--mlx-path", str(tmp_path / "q4"),
        "-q", "--q-group-size", "32", "--q-ple-table-bits", "8", "--q-sensitive-bits", "6",
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["modules"]
    assert modules["embed_tokens_per_layer"] == {"bits": 8} and modules["per_layer_model_projection"] == {"bits": 6}


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("convert", "--hf-path", str(tmp_path / "missing"), "--mlx-path", str(tmp_path / "out"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()
