"""stream_generate / generate on the trained tiny chat checkpoint, and prompt caches across turns."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from chat_model import SCRIPT

import mlx_gemma4
from mlx_gemma4 import Gemma4Error, PromptCache, Stats, generate_tokens, stream_generate
from mlx_gemma4.channels import parse_tool_call


def _expected(reply: str) -> dict:
    """The channels a scripted reply should come back as."""
    thought, _, answer = reply.rpartition("<channel|>")
    thought = thought.removeprefix("<|channel>thought\n")
    if "<|tool_call>" in answer:
        call = answer.split("<|tool_call>")[1].split("<tool_call|>")[0]
        return {"thought": thought, "answer": "", "tool_calls": [parse_tool_call(call)]}
    return {"thought": thought, "answer": answer.removesuffix("<turn|>"), "tool_calls": []}


@pytest.mark.parametrize("turn", range(len(SCRIPT)))
def test_generate_replays_each_scripted_reply_by_channel(chat, turn):
    model, tokenizer = chat
    messages, options, reply = SCRIPT[turn]
    result = mlx_gemma4.generate(model, tokenizer, messages, max_tokens=60, **options)
    got = {
        "thought": result.thought,
        "answer": result.answer,
        "tool_calls": [(call.name, call.arguments) for call in result.tool_calls],
    }
    assert got == _expected(reply)
    stats = result.stats
    assert stats.finish_reason == "stop" and stats.reused_tokens == 0
    assert stats.prompt_tokens == len(tokenizer.apply_chat_template(messages, **options))
    assert stats.generation_tokens == len(tokenizer.encode(reply))  # the stop token counted once
    assert stats.prompt_tps > 0 and stats.generation_tps > 0


def test_stream_yields_events_as_they_come_and_ends_with_stats(chat):
    model, tokenizer = chat
    messages, options, reply = SCRIPT[1]
    items = list(stream_generate(model, tokenizer, messages, max_tokens=60, **options))
    assert isinstance(items[-1], Stats) and not any(isinstance(i, Stats) for i in items[:-1])
    channels = [item.channel for item in items[:-1]]
    assert channels.count("thought") > 1 and channels.count("answer") > 1  # streamed, not batched
    assert channels.index("answer") > max(i for i, c in enumerate(channels) if c == "thought")
    assert all("<" not in item.text for item in items[:-1])  # no markers, no <turn|>


def test_a_string_is_one_user_message_and_ids_are_used_as_given(chat):
    model, tokenizer = chat
    messages, _, reply = SCRIPT[0]
    by_string = mlx_gemma4.generate(model, tokenizer, messages[0]["content"], max_tokens=30)
    by_ids = mlx_gemma4.generate(model, tokenizer, tokenizer.apply_chat_template(messages), max_tokens=30)
    assert by_string.answer == by_ids.answer == _expected(reply)["answer"]


def test_stop_strings_and_token_limit_end_the_reply(chat):
    model, tokenizer = chat
    messages, _, _ = SCRIPT[0]  # "Hello! How are you?"
    stopped = mlx_gemma4.generate(model, tokenizer, messages, max_tokens=30, stop_strings=["are"])
    assert stopped.answer == "Hello! How " and stopped.stats.finish_reason == "stop"
    limited = mlx_gemma4.generate(model, tokenizer, messages, max_tokens=3)
    assert limited.stats.finish_reason == "length" and limited.stats.generation_tokens == 3
    assert limited.answer == tokenizer.decode(tokenizer.encode("Hello! How are you?")[:3])


def test_prompt_longer_than_the_context_is_refused(chat):
    model, tokenizer = chat
    too_long = [5] * model.config.max_position_embeddings
    with pytest.raises(Gemma4Error, match="context"):
        list(stream_generate(model, tokenizer, too_long))


def _second_turn(model, tokenizer, prompt_cache):
    """Turns 2 and 3 of the script on one prompt cache; returns turn 3's reply."""
    (first, options, _), (second, _, _) = SCRIPT[1], SCRIPT[2]
    mlx_gemma4.generate(model, tokenizer, first, max_tokens=60, prompt_cache=prompt_cache, **options)
    return mlx_gemma4.generate(model, tokenizer, second, max_tokens=60, prompt_cache=prompt_cache, **options)


def _parting(tokenizer) -> int:
    """Tokens turn 3's prompt shares with turn 2's (the reply's thought is dropped from history)."""
    (first, options, _), (second, _, _) = SCRIPT[1], SCRIPT[2]
    a, b = (tokenizer.apply_chat_template(m, **options) for m in (first, second))
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def _assert_cache_matches_a_fresh_prefill(model, prompt_cache):
    """The next logits from the reused cache equal those of a forward over its tokens."""
    held = prompt_cache.held_tokens()
    probe = mx.array([[7]])
    reused = np.array(model(probe, prompt_cache.caches))[0, -1]
    fresh = np.array(model(mx.array([held + [7]])))[0, -1]
    assert np.abs(reused - fresh).max() <= 1e-4


@pytest.mark.parametrize("headroom", [256, 1])
def test_second_turn_prefills_only_new_tokens(chat, headroom):
    """With headroom 1 the wrapped sliding rings cannot rewind over the reply: the snapshot taken
    where the history parts from the prompt is what lets the prefix be reused."""
    model, tokenizer = chat
    prompt_cache = PromptCache(model, model.make_cache(sliding_headroom=headroom))
    reply = _second_turn(model, tokenizer, prompt_cache)
    assert reply.answer == _expected(SCRIPT[2][2])["answer"]
    # A snapshot sits one token short of the prompt's end: that token yields the first logits.
    assert _parting(tokenizer) - 1 <= reply.stats.reused_tokens <= _parting(tokenizer)
    _assert_cache_matches_a_fresh_prefill(model, prompt_cache)


@pytest.mark.parametrize("headroom, reused", [(256, 2), (1, 0)])
def test_unrelated_prompt_keeps_only_what_the_caches_can_rewind_to(chat, headroom, reused):
    """Only <bos><|turn> is shared; wrapped rings with no headroom cannot go back that far."""
    model, tokenizer = chat
    prompt_cache = PromptCache(model, model.make_cache(sliding_headroom=headroom))
    _second_turn(model, tokenizer, prompt_cache)
    messages, options, reply = SCRIPT[4]
    result = mlx_gemma4.generate(model, tokenizer, messages, prompt_cache=prompt_cache, **options)
    assert result.answer == _expected(reply)["answer"] and result.stats.reused_tokens == reused
    _assert_cache_matches_a_fresh_prefill(model, prompt_cache)


def test_saved_prompt_cache_resumes_the_conversation(chat, tmp_path):
    model, tokenizer = chat
    (first, options, _), (second, _, reply) = SCRIPT[1], SCRIPT[2]
    prompt_cache = PromptCache(model)
    mlx_gemma4.generate(model, tokenizer, first, max_tokens=60, prompt_cache=prompt_cache, **options)
    prompt_cache.save(tmp_path / "turn1.safetensors", {"note": "turn 1"})
    loaded, metadata = PromptCache.load(tmp_path / "turn1.safetensors", model)
    assert metadata["note"] == "turn 1" and loaded.held_tokens() == prompt_cache.held_tokens()
    result = mlx_gemma4.generate(model, tokenizer, second, max_tokens=60, prompt_cache=loaded, **options)
    assert result.answer == _expected(reply)["answer"]
    assert _parting(tokenizer) - 1 <= result.stats.reused_tokens <= _parting(tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == ["turn1.safetensors"]  # no staging file left


def test_loading_a_prompt_cache_checks_file_and_model(chat, checkpoints, tmp_path):
    model, tokenizer = chat
    prompt_cache = PromptCache(model)
    mlx_gemma4.generate(model, tokenizer, "Hi", max_tokens=5, prompt_cache=prompt_cache)
    prompt_cache.save(tmp_path / "cache.safetensors")
    with pytest.raises(Gemma4Error, match="different model"):
        PromptCache.load(tmp_path / "cache.safetensors", checkpoints.model("k_eq_v"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(Gemma4Error, match="cannot read"):
        PromptCache.load(tmp_path / "junk.safetensors", model)


def test_mlx_lm_stream_generate_runs_our_model(chat, chat_dir):
    """Our model follows mlx-lm's model protocol: its own generation loop gives our tokens."""
    from mlx_lm import stream_generate as mlx_lm_stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    model, tokenizer = chat
    prompt = tokenizer.apply_chat_template(SCRIPT[0][0])
    ours = list(generate_tokens(model, prompt, max_tokens=12, stop_ids=[]))
    wrapper = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_file=str(chat_dir / "tokenizer.json")))
    theirs = [r.token for r in mlx_lm_stream_generate(model, wrapper, prompt, max_tokens=12)]
    assert theirs[: len(ours)] == ours[: len(theirs)] and len(theirs) >= 5
