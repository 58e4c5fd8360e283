"""Shared fixtures: tiny Hugging Face checkpoints (built once per session) and their conversions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# MLX's CUDA back end runs float32 matmuls as TF32 unless told not to (ml-explore/mlx#3860);
# parity at 1e-4 needs real float32. Read before the first MLX operation.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import hf_checkpoints  # noqa: E402

class Checkpoints:
    """Builds each variant once: the HF directory, its torch model and its conversions."""

    def __init__(self, root: Path):
        self.root = root
        self._torch, self._converted = {}, {}

    def hf_dir(self, name: str) -> Path:
        if name not in self._torch:
            self._torch[name] = hf_checkpoints.write_checkpoint(name, self.root / name)
        return self.root / name

    def torch_model(self, name: str):
        self.hf_dir(name)
        return self._torch[name]

    def converted(self, name: str, dtype: str = "float32", quantize_bits: int | None = None) -> Path:
        import mlx_gemma4

        key = (name, dtype, quantize_bits)
        if key not in self._converted:
            out = self.root / f"{name}-{dtype}-q{quantize_bits}"
            mlx_gemma4.convert(self.hf_dir(name), out, dtype=dtype, quantize_bits=quantize_bits, group_size=32)
            self._converted[key] = out
        return self._converted[key]

    def model(self, name: str, dtype: str = "float32", quantize_bits: int | None = None):
        import mlx_gemma4

        return mlx_gemma4.load_model(self.converted(name, dtype, quantize_bits))

    def vocab_size(self, name: str) -> int:
        return hf_checkpoints.variant_spec(name)["text"]["vocab_size"]

    def prompt(self, name: str, length: int, seed: int = 0) -> np.ndarray:
        return np.random.RandomState(seed).randint(3, self.vocab_size(name), size=(1, length))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory) -> Path:
    """The converted (float32) tiny chat checkpoint, trained on chat_model.SCRIPT."""
    import chat_model

    import mlx_gemma4

    root = tmp_path_factory.mktemp("chat")
    return mlx_gemma4.convert(chat_model.write_chat_checkpoint(root / "hf"), root / "mlx", dtype="float32")


@pytest.fixture(scope="session")
def chat(chat_dir):
    """(model, tokenizer) of the chat checkpoint."""
    import mlx_gemma4

    return mlx_gemma4.load(chat_dir)
