"""Loading: converted directories, refusal of unconverted ones, hub ids through a local cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma4
from mlx_gemma4.errors import Gemma4Error


def test_load_returns_model_and_tokenizer(checkpoints):
    model, tokenizer = mlx_gemma4.load(checkpoints.converted("moe"))
    assert tokenizer.encode("w5 w17") == [5, 17] and tokenizer.decode([5, 17]) == "w5 w17"
    assert model(mx.array([[5, 17]])).shape == (1, 2, checkpoints.vocab_size("moe"))


def test_unconverted_directory_is_refused_with_the_convert_command(checkpoints):
    with pytest.raises(Gemma4Error, match="mlx-gemma4 convert --hf-path"):
        mlx_gemma4.load_model(checkpoints.hf_dir("moe"))


def test_missing_local_path_is_refused(tmp_path):
    with pytest.raises(Gemma4Error, match="does not exist"):
        mlx_gemma4.load_model(tmp_path / "nothing" / "here")


def test_hub_id_downloads_converts_once_and_reuses_the_cache(checkpoints, tmp_path, monkeypatch):
    downloads = []

    def fake_download(repo_id):
        downloads.append(repo_id)
        return checkpoints.hf_dir("k_eq_v")

    monkeypatch.setenv("MLX_GEMMA4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mlx_gemma4.load, "_download", fake_download)
    ids = mx.array(checkpoints.prompt("k_eq_v", 7))

    def logits(model):
        return np.array(model(ids).astype(mx.float32))

    first = logits(mlx_gemma4.load_model("google/gemma-4-tiny"))  # converted at the bf16 default
    second = logits(mlx_gemma4.load_model("google/gemma-4-tiny"))
    assert downloads == ["google/gemma-4-tiny"]
    assert (tmp_path / "cache" / "google--gemma-4-tiny" / "config.json").is_file()
    np.testing.assert_allclose(first, second)
    np.testing.assert_allclose(first, logits(checkpoints.model("k_eq_v", "bfloat16")), atol=1e-6)


@pytest.mark.skipif(mx.metal.is_available() or mx.cuda.is_available(), reason="the limit is the CPU back end's")
def test_cpu_back_end_refuses_bfloat16_experts_with_a_way_out(checkpoints):
    converted = checkpoints.converted("moe", "bfloat16")  # converting on a CPU box still works
    with pytest.raises(Gemma4Error, match="--dtype float32, or quantize with -q"):
        mlx_gemma4.load_model(converted)
