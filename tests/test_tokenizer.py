"""Tokenizer: ids, byte fallback, streaming detokenization, checkpoint files and template choice."""

from __future__ import annotations

import json
import random

import pytest
from gemma_tokenizer import GEMMA_TEST_VOCAB_SIZE, NEWLINE_ID, SPECIAL_TOKENS, write_gemma_tokenizer

from mlx_gemma4 import prompt
from mlx_gemma4.errors import CheckpointError
from mlx_gemma4.tokenizer import Tokenizer

FIRST_BYTE_ID = 108  # <0x00>; the byte pieces follow the 108 control and newline ids
TEXTS = [
    "Hello world",
    "  two leading spaces, one trailing ",
    "tabs\tand\nnew\n\nlines",
    "naïve café, Straße",
    "你好，世界。日本語のテキスト",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "<|channel>thought\nprivate<channel|>public<turn|>",
    "\u0000 control \u007f and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_gemma_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_characters_without_a_piece_fall_back_to_their_utf8_bytes(tokenizer):
    for text in ("😀", "你", "é"):
        assert tokenizer.encode(text) == [FIRST_BYTE_ID + byte for byte in text.encode("utf-8")]


def test_encode_adds_no_bos(tokenizer):
    assert tokenizer.encode("Hi") == [tokenizer.token_id("Hi")]


@pytest.mark.parametrize("token_id, text", sorted({**SPECIAL_TOKENS, NEWLINE_ID: "\n"}.items()))
def test_special_tokens_have_gemma_ids(tokenizer, token_id, text):
    assert tokenizer.token_id(text) == token_id
    assert tokenizer.encode(f"a{text}b") == [tokenizer.token_id("a"), token_id, tokenizer.token_id("b")]
    assert tokenizer.decode([token_id]) == text


def test_decode_can_drop_special_tokens(tokenizer):
    ids = tokenizer.encode("<|turn>model\nHi<turn|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "model\nHi"


def test_vocab_fits_the_test_model_vocab(tokenizer):
    assert tokenizer.vocab_size == 877 <= GEMMA_TEST_VOCAB_SIZE == 896
    assert tokenizer.token_id("not one token") is None


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detokenizer = tokenizer.detokenizer()
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    return segments


def _random_text(rng: random.Random) -> str:
    special = ["<|channel>", "<channel|>", "<turn|>", "thought"]
    alphabet = list("abc XYZ 019.,?!\n\t") + list("éßñ你好世界😀👍🏽🇯🇵") + special
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))


@pytest.mark.parametrize("seed", range(25))
def test_streaming_detokenizer_never_splits_a_character(tokenizer, seed):
    text = _random_text(random.Random(seed))
    ids = tokenizer.encode(text)
    segments = _stream(tokenizer, ids)
    assert all("\ufffd" not in segment for segment in segments)
    assert "".join(segments) == tokenizer.decode(ids) == text


def test_streaming_detokenizer_holds_bytes_until_the_character_is_whole(tokenizer):
    ids = tokenizer.encode("😀")
    assert _stream(tokenizer, ids) == ["", "", "", "😀", ""]


def test_streaming_keeps_special_token_text(tokenizer):
    ids = tokenizer.encode("<|channel>thought\nhm<channel|>Yes<turn|>")
    assert "".join(_stream(tokenizer, ids)) == "<|channel>thought\nhm<channel|>Yes<turn|>"


def test_streaming_skips_ids_past_the_tokenizer_like_decode(tokenizer):
    ids = [tokenizer.token_id("Hi"), GEMMA_TEST_VOCAB_SIZE - 1]
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids) == "Hi"


def test_each_detokenizer_is_fresh(tokenizer):
    first = tokenizer.detokenizer()
    first.add_token(tokenizer.token_id("Hi"))
    second = tokenizer.detokenizer()
    assert (second.text, second.tokens) == ("", [])
    assert first.text == "Hi"


def test_missing_tokenizer_json_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no tokenizer.json") as error:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(error.value)


def test_invalid_tokenizer_json_is_a_checkpoint_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json") as error:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(error.value)


def test_broken_chat_template_is_a_checkpoint_error(tmp_path):
    write_gemma_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for message in messages %}")
    with pytest.raises(CheckpointError, match="chat template does not compile"):
        Tokenizer.from_dir(tmp_path)


def _without_template(directory, config: dict | None):
    write_gemma_tokenizer(directory)
    (directory / "chat_template.jinja").unlink()
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(directory)


@pytest.mark.parametrize(
    "config, large",
    [
        ({"hidden_size_per_layer_input": 256}, False),  # converted E2B / E4B
        ({"hidden_size_per_layer_input": 0}, True),  # converted 26B-A4B / 31B
        ({"model_type": "gemma4", "text_config": {"hidden_size_per_layer_input": 256}}, False),  # Hugging Face E4B
        ({"model_type": "gemma4", "text_config": {"hidden_size_per_layer_input": None}}, True),  # Hugging Face 31B
        (None, False),  # no config: the template that adds nothing the model would not write
    ],
)
def test_checkpoint_without_template_gets_its_familys_bundled_one(tmp_path, config, large):
    assert _without_template(tmp_path, config).chat_template == prompt.bundled_template(large=large)


def test_template_in_tokenizer_config_is_used(tmp_path):
    write_gemma_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}{{ messages[0]['content'] }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "Hi"}]) == "<bos>Hi"


def test_template_in_chat_template_json_is_used(tmp_path):
    write_gemma_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ eos_token }}"}))
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "Hi"}]) == "<eos>"
