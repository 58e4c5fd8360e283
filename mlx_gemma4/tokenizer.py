"""The checkpoint's own tokenizer (tokenizer.json through the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as FastTokenizer

from .errors import CheckpointError


class Tokenizer:
    def __init__(self, backend: FastTokenizer):
        self.backend = backend

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{path} has no tokenizer.json")
        return cls(FastTokenizer.from_file(str(file)))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS added (Gemma 4's chat template writes <bos> itself)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
