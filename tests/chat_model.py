"""A tiny chat checkpoint that has learnt a few scripted conversations by heart.

The PLE variant (sliding window 6, KV sharing) with the Gemma-shaped test tokenizer, trained
with transformers until greedy decoding replays each scripted reply: a plain answer, thoughts
then an answer, a second turn after a stripped thought, a tool call, and non-ASCII text. Chat,
CLI and prompt-cache tests then see real turn ends, channels and tool calls.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemma_tokenizer import GEMMA_TEST_VOCAB_SIZE, write_gemma_tokenizer
from hf_checkpoints import VARIANTS

from mlx_gemma4.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}}},
    },
}
BRIEF = {"role": "system", "content": "Be brief."}

# (messages, render options, reply as the model writes it). Later turns carry earlier replies
# in the history form the template gives them (thoughts dropped).
SCRIPT = [
    ([{"role": "user", "content": "Hi"}], {}, "Hello! How are you?<turn|>"),
    (
        [BRIEF, {"role": "user", "content": "What is 2+2?"}],
        {"enable_thinking": True},
        "<|channel>thought\nadd two and two<channel|>It is 4.<turn|>",
    ),
    (
        [
            BRIEF,
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"},
        ],
        {"enable_thinking": True},
        "<|channel>thought\nadd three and three<channel|>It is 6.<turn|>",
    ),
    (
        [{"role": "user", "content": "Weather in Tokyo?"}],
        {"tools": [WEATHER_TOOL]},
        '<|tool_call>call:get_weather{city:<|"|>Tokyo<|"|>}<tool_call|><|tool_response>',
    ),
    ([{"role": "user", "content": "Smile"}], {}, "Sure 😀 ça va ✓<turn|>"),
]
TRAIN_STEPS = 300


def _examples(tokenizer: Tokenizer):
    """(token ids, index where the reply starts) per scripted turn."""
    for messages, options, reply in SCRIPT:
        prompt = tokenizer.apply_chat_template(messages, **options)
        yield prompt + tokenizer.encode(reply), len(prompt)


def write_chat_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Train and save the chat checkpoint (HF layout, tokenizer, generation config)."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    directory.mkdir(parents=True, exist_ok=True)
    write_gemma_tokenizer(directory)
    tokenizer = Tokenizer.from_dir(directory)
    text = dict(VARIANTS["ple_shared"]["text"], vocab_size=GEMMA_TEST_VOCAB_SIZE)
    text["vocab_size_per_layer_input"] = GEMMA_TEST_VOCAB_SIZE
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**text, attn_implementation="eager"))

    examples = list(_examples(tokenizer))
    length = max(len(ids) for ids, _ in examples)
    inputs = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), -100)  # only reply tokens are learnt
    for row, (ids, reply_start) in enumerate(examples):
        inputs[row, : len(ids)] = torch.tensor(ids)
        labels[row, reply_start : len(ids)] = torch.tensor(ids[reply_start:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(str(directory))
    generation = {"bos_token_id": 2, "eos_token_id": [1, 106, 50], "do_sample": True, "temperature": 1.0}
    (directory / "generation_config.json").write_text(json.dumps({**generation, "top_k": 64, "top_p": 0.95}))
    return directory
