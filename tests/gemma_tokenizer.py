"""A small tokenizer shaped like Gemma 4's, built with `tokenizers` (no download, under 1000 ids).

Like the real one it has Gemma 4's special tokens at their real ids (reference 3.1), then a
SentencePiece-style BPE: spaces become "▁", pieces merge left to right, and any character
without a piece falls back to its UTF-8 bytes `<0x00>`..`<0xFF>`, so every string encodes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from mlx_gemma4 import prompt

SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
NEWLINE_ID = 107  # "\n" is an ordinary piece in Gemma's vocab, right after the control tokens
# Words the chat template and the tests write, so prompts are a few pieces and not hundreds of letters.
WORDS = (
    "thought model user system tool call response declaration description parameters properties "
    "required type STRING OBJECT value get_weather city City Tokyo Paris temp unit Get weather "
    "Weather in Hi Hello What is this cat Sure Be brief It the a of and to you are I am yes no "
    "sunny cold warm hot think answer question"
).split()


def _pieces() -> list[str]:
    """Ordinary pieces from id 108 on: bytes, single characters, then every left-to-right prefix of WORDS."""
    pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += ["▁", "\n\n"] + [chr(code) for code in range(0x21, 0x7F)]
    # "▁word" chains rank first, so a space joins the word after it, as in SentencePiece vocabularies.
    for word in [f"▁{word}" for word in WORDS] + list(WORDS):
        pieces += [word[:end] for end in range(2, len(word) + 1)]
    return list(dict.fromkeys(pieces))


def _merges(pieces: list[str]) -> list[tuple[str, str]]:
    """Each multi-character piece is its prefix merged with its last character (bytes are not merged)."""
    return [(piece[:-1], piece[-1]) for piece in pieces if len(piece) > 1 and not piece.startswith("<0x")]


def _vocab() -> dict[str, int]:
    vocab = {SPECIAL_TOKENS.get(i, f"<unused{i}>"): i for i in range(NEWLINE_ID)}
    vocab["\n"] = NEWLINE_ID
    for piece in _pieces():
        vocab[piece] = len(vocab)
    return vocab


def build_gemma_tokenizer() -> Tokenizer:
    vocab = _vocab()
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=_merges(_pieces()), unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control tokens match in the raw text, before "▁" replacement, and keep their vocab ids.
    tokenizer.add_special_tokens(
        [AddedToken(text, special=True, normalized=False) for text, i in vocab.items() if i < NEWLINE_ID]
    )
    return tokenizer


# A tiny test model's vocab: the tokenizer's size rounded up to 64, as real embedding tables are padded.
GEMMA_TEST_VOCAB_SIZE = -(-len(_vocab()) // 64) * 64


def write_gemma_tokenizer(directory: str | Path, large_template: bool = False) -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (E2B/E4B template, or the
    26B-A4B/31B one when `large_template`) into `directory`; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_gemma_tokenizer().save(str(directory / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "chat_template.jinja").write_text(prompt.bundled_template(large=large_template), encoding="utf-8")
    return directory
