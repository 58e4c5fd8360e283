"""The checkpoint's own tokenizer (tokenizer.json through the `tokenizers` library) and chat template."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
from tokenizers import Tokenizer as FastTokenizer

from . import prompt
from .errors import CheckpointError

# transformers hands a template the tokenizer's special tokens by these names; Gemma's defaults.
SPECIAL_TOKEN_DEFAULTS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


class _TokenTable:
    """The two things mlx-lm's detokenizers read from a Hugging Face tokenizer: len() and id -> piece."""

    def __init__(self, backend: FastTokenizer):
        self.backend = backend

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        # An id with no piece (a gap in the vocab) has no text, as in decode().
        return [self.backend.id_to_token(i) or "" for i in ids]


class StreamingDetokenizer(SPMStreamingDetokenizer):
    """mlx-lm's SentencePiece streaming detokenizer: holds bytes back until they make whole UTF-8
    characters, and keeps special tokens' text (`<|channel>`, `<turn|>`) for the channel parser."""

    def __init__(self, backend: FastTokenizer):
        # Gemma's normalizer adds no leading "▁", so a leading space in the output is the model's own.
        super().__init__(_TokenTable(backend), trim_space=False)

    def add_token(self, token: int):
        if token < len(self.tokenmap):
            super().add_token(token)
        else:
            # The model's vocab may be padded past the tokenizer's; those ids carry no text, as in decode().
            self.tokens.append(token)


class Tokenizer:
    def __init__(
        self,
        backend: FastTokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ):
        """`chat_template` defaults to the bundled E2B/E4B one; `special_tokens` to Gemma's <bos> etc."""
        self.backend = backend
        self.chat_template = chat_template if chat_template is not None else prompt.bundled_template(large=False)
        self.special_tokens = {**SPECIAL_TOKEN_DEFAULTS, **(special_tokens or {})}
        self._template = prompt.compile_template(self.chat_template)
        self._detokenizer_prototype: StreamingDetokenizer | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """tokenizer.json and the chat template of a checkpoint; the bundled template of its family
        (read from config.json beside it) when it ships none."""
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{directory} has no tokenizer.json; copy the checkpoint's tokenizer files there")
        try:
            backend = FastTokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception for any parse failure
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{file} is not a valid tokenizer.json ({reason})") from None
        config = _read_tokenizer_config(directory / "tokenizer_config.json")
        template = prompt.checkpoint_template(directory, config)
        if template is None:
            template = prompt.bundled_template(large=prompt.is_large_family(directory / "config.json"))
        special_tokens = {name: text for name in SPECIAL_TOKEN_DEFAULTS if (text := _token_text(config.get(name)))}
        return cls(backend, template, special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        """The single id of a token's text (`"<turn|>"` -> 106), or None if it is not one token."""
        return self.backend.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS added (Gemma 4's chat template writes <bos> itself).

        Special token texts in `text` (`<|turn>`, `<bos>`, ...) become their single ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat template's prompt text for `messages` (see `prompt.prepare_messages` for the format)."""
        return prompt.render(
            self._template,
            messages,
            tools=tools,
            enable_thinking=enable_thinking,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt ids for `messages`: `render_chat` then `encode` (the text starts with <bos>)."""
        return self.encode(
            self.render_chat(
                messages, tools=tools, enable_thinking=enable_thinking, add_generation_prompt=add_generation_prompt
            )
        )

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (`reset`, `add_token`, `finalize`, `last_segment`, `text`)."""
        if self._detokenizer_prototype is None:
            # The id -> bytes table costs a pass over the vocab (262k ids); build it once, share it.
            self._detokenizer_prototype = StreamingDetokenizer(self.backend)
        fresh = copy.copy(self._detokenizer_prototype)
        fresh.reset()
        return fresh


def _read_tokenizer_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointError(f"{file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return config


def _token_text(entry: Any) -> str | None:
    # tokenizer_config.json writes a token as its text or as an AddedToken dict {"content": text, ...}.
    return entry.get("content") if isinstance(entry, Mapping) else entry
