"""Chat prompts: exact text and ids for both template families, message checks, template errors.

The large-family strings are reference section 3.3's renders A-D of the 31B template; the small
family's differ only where its template does (no empty thought, `<|think|>` without a newline).
"""

from __future__ import annotations

import copy

import pytest
from gemma_tokenizer import write_gemma_tokenizer

from mlx_gemma4 import prompt
from mlx_gemma4.errors import CheckpointError
from mlx_gemma4.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City"}},
            "required": ["city"],
        },
    },
}
ASK = {"role": "user", "content": "Weather in Tokyo?"}
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 15, "unit": "C"}'}

CASES = {
    "user_only": ([{"role": "user", "content": "Hi"}], {}),
    "system_thinking": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        {"enable_thinking": True},
    ),
    "one_tool": ([ASK], {"tools": [WEATHER_TOOL]}),
    "tool_result_pending": ([ASK, CALL, RESULT], {"tools": [WEATHER_TOOL], "enable_thinking": True}),
    "tool_round_trip": (
        [
            ASK,
            CALL,
            RESULT,
            {"role": "assistant", "content": "It is 15 C in Tokyo."},
            {"role": "user", "content": "And Paris?"},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    "history_thought": (
        [
            {"role": "user", "content": "What is this?"},
            {"role": "assistant", "content": "<|channel>thought\nA small animal.<channel|>A cat."},
            {"role": "user", "content": "Sure?"},
        ],
        {},
    ),
}

DECLARATION = (
    '<|tool>declaration:get_weather{description:<|"|>Get weather<|"|>,parameters:{properties:{city:{description:'
    '<|"|>City<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>'
)
CALL_AND_RESULT = (
    '<|tool_call>call:get_weather{city:<|"|>Tokyo<|"|>}<tool_call|>'
    '<|tool_response>response:get_weather{temp:15,unit:<|"|>C<|"|>}<tool_response|>'
)
ASK_TEXT = "<|turn>user\nWeather in Tokyo?<turn|>\n<|turn>model\n"
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"

# Ids in the test tokenizer: the control tokens are Gemma's (2 <bos>, 105 <|turn>, 106 <turn|>, 107 "\n",
# 98 <|think|>, 100 <|channel>, 101 <channel|>, 46-52 tool tokens); the rest are its own pieces.
SYSTEM_IDS = [2, 105, 700, 107]  # <bos><|turn>system\n
DECLARATION_IDS = [
    46, 723, 391, 779, 840, 447, 456, 732, 391, 52, 805, 605, 52, 377, 741, 391, 456, 750, 391, 456, 784, 757,
    391, 456, 732, 391, 52, 787, 757, 52, 377, 759, 391, 52, 764, 52, 458, 458, 377, 753, 707, 433, 391, 424,
    52, 784, 757, 52, 426, 377, 759, 391, 52, 769, 52, 458, 458, 47,
]  # fmt: skip
ASK_IDS = [105, 695, 107, 813, 840, 447, 614, 584, 396, 106, 107, 105, 692, 107]
CALL_AND_RESULT_IDS = [
    48, 706, 391, 779, 840, 447, 456, 784, 757, 391, 52, 793, 52, 458, 49,
    50, 713, 391, 779, 840, 447, 456, 800, 391, 382, 386, 377, 803, 391, 52, 400, 52, 458, 51,
]  # fmt: skip
REPLY_AND_NEXT_ASK_IDS = [
    839, 624, 364, 382, 386, 576, 614, 584, 379, 106, 107,
    105, 695, 107, 398, 443, 433, 589, 396, 106, 107, 105, 692, 107,
]  # fmt: skip
HISTORY_IDS = [
    2, 105, 695, 107, 826, 624, 626, 396, 106, 107, 105, 692, 107, 398, 627, 379, 106, 107,
    105, 695, 107, 831, 707, 396, 106, 107, 105, 692, 107,
]  # fmt: skip
EMPTY_THOUGHT_IDS = [100, 688, 107, 101]

EXPECTED = {
    ("user_only", "small"): (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\n",
        [2, 105, 695, 107, 819, 106, 107, 105, 692, 107],
    ),
    ("user_only", "large"): (  # reference 3.3 A
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
        [2, 105, 695, 107, 819, 106, 107, 105, 692, 107, 100, 688, 107, 101],
    ),
    ("system_thinking", "small"): (
        "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n",
        [2, 105, 700, 107, 98, 834, 637, 379, 106, 107, 105, 695, 107, 819, 106, 107, 105, 692, 107],
    ),
    ("system_thinking", "large"): (  # reference 3.3 B
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n",
        [2, 105, 700, 107, 98, 107, 834, 637, 379, 106, 107, 105, 695, 107, 819, 106, 107, 105, 692, 107],
    ),
    ("one_tool", "small"): (
        "<bos><|turn>system\n" + DECLARATION + "<turn|>\n" + ASK_TEXT,
        SYSTEM_IDS + DECLARATION_IDS + [106, 107] + ASK_IDS,
    ),
    ("one_tool", "large"): (  # reference 3.3 C
        "<bos><|turn>system\n" + DECLARATION + "<turn|>\n" + ASK_TEXT + EMPTY_THOUGHT,
        SYSTEM_IDS + DECLARATION_IDS + [106, 107] + ASK_IDS + EMPTY_THOUGHT_IDS,
    ),
    # The model continues its turn after a tool result: no <turn|>, no new <|turn>model (reference 3.3 D).
    ("tool_result_pending", "small"): (
        "<bos><|turn>system\n<|think|>" + DECLARATION + "<turn|>\n" + ASK_TEXT + CALL_AND_RESULT,
        SYSTEM_IDS + [98] + DECLARATION_IDS + [106, 107] + ASK_IDS + CALL_AND_RESULT_IDS,
    ),
    ("tool_result_pending", "large"): (
        "<bos><|turn>system\n<|think|>\n" + DECLARATION + "<turn|>\n" + ASK_TEXT + CALL_AND_RESULT,
        SYSTEM_IDS + [98, 107] + DECLARATION_IDS + [106, 107] + ASK_IDS + CALL_AND_RESULT_IDS,
    ),
    # The answer after the result closes the same model turn the call opened.
    ("tool_round_trip", "small"): (
        "<bos><|turn>system\n" + DECLARATION + "<turn|>\n" + ASK_TEXT + CALL_AND_RESULT
        + "It is 15 C in Tokyo.<turn|>\n<|turn>user\nAnd Paris?<turn|>\n<|turn>model\n",
        SYSTEM_IDS + DECLARATION_IDS + [106, 107] + ASK_IDS + CALL_AND_RESULT_IDS + REPLY_AND_NEXT_ASK_IDS,
    ),
    ("tool_round_trip", "large"): (
        "<bos><|turn>system\n" + DECLARATION + "<turn|>\n" + ASK_TEXT + CALL_AND_RESULT
        + "It is 15 C in Tokyo.<turn|>\n<|turn>user\nAnd Paris?<turn|>\n<|turn>model\n" + EMPTY_THOUGHT,
        SYSTEM_IDS + DECLARATION_IDS + [106, 107] + ASK_IDS + CALL_AND_RESULT_IDS + REPLY_AND_NEXT_ASK_IDS
        + EMPTY_THOUGHT_IDS,
    ),
    # The earlier thought is dropped from history (reference 3.3 E, text part).
    ("history_thought", "small"): (
        "<bos><|turn>user\nWhat is this?<turn|>\n<|turn>model\nA cat.<turn|>\n"
        "<|turn>user\nSure?<turn|>\n<|turn>model\n",
        HISTORY_IDS,
    ),
    ("history_thought", "large"): (
        "<bos><|turn>user\nWhat is this?<turn|>\n<|turn>model\nA cat.<turn|>\n<|turn>user\nSure?<turn|>\n<|turn>model\n"
        "<|channel>thought\n<channel|>",
        HISTORY_IDS + EMPTY_THOUGHT_IDS,
    ),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    return {
        family: Tokenizer.from_dir(
            write_gemma_tokenizer(tmp_path_factory.mktemp(family), large_template=family == "large")
        )
        for family in ("small", "large")
    }


@pytest.mark.parametrize("case, family", list(EXPECTED))
def test_render_and_ids_are_pinned(tokenizers, case, family):
    messages, options = CASES[case]
    text, ids = EXPECTED[case, family]
    assert tokenizers[family].render_chat(messages, **options) == text
    assert tokenizers[family].apply_chat_template(messages, **options) == ids


@pytest.mark.parametrize("case", list(CASES))
def test_renders_like_transformers(tokenizers, case, tmp_path):
    """Same text and ids as transformers' apply_chat_template on the same (prepared) messages."""
    transformers = pytest.importorskip("transformers")
    messages, options = CASES[case]
    for family, tokenizer in tokenizers.items():
        reference = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend, chat_template=tokenizer.chat_template, bos_token="<bos>"
        )
        native = prompt.prepare_messages(messages)
        text = reference.apply_chat_template(native, tokenize=False, add_generation_prompt=True, **options)
        assert tokenizer.render_chat(messages, **options) == text
        assert tokenizer.apply_chat_template(messages, **options) == reference.encode(text, add_special_tokens=False)


def test_caller_messages_are_not_changed(tokenizers):
    messages, options = CASES["tool_round_trip"]
    before = copy.deepcopy(messages)
    tokenizers["large"].render_chat(messages, **options)
    assert messages == before


def test_no_generation_prompt_ends_after_the_last_turn(tokenizers):
    text = tokenizers["large"].render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == "<bos><|turn>user\nHi<turn|>\n"


def test_plain_text_tool_result_becomes_a_value(tokenizers):
    text = tokenizers["small"].render_chat([ASK, CALL, {"role": "tool", "content": "sunny"}])
    assert text.endswith('<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>')


def test_tool_results_match_calls_by_id_name_or_order(tokenizers):
    calls = {
        "role": "assistant",
        "tool_calls": [
            {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
            {"id": "b", "function": {"name": "get_time", "arguments": {"city": "Tokyo", "utc": True}}},
        ],
    }
    expected = (
        '<|tool_call>call:get_weather{city:<|"|>Tokyo<|"|>}<tool_call|>'
        '<|tool_call>call:get_time{city:<|"|>Tokyo<|"|>,utc:true}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
        '<|tool_response>response:get_time{value:<|"|>9:00<|"|>}<tool_response|>'
    )
    for results in (
        [{"role": "tool", "tool_call_id": "a", "content": "sunny"},
         {"role": "tool", "tool_call_id": "b", "content": "9:00"}],
        [{"role": "tool", "name": "get_weather", "content": "sunny"},
         {"role": "tool", "name": "get_time", "content": "9:00"}],
        [{"role": "tool", "content": "sunny"}, {"role": "tool", "content": "9:00"}],
    ):
        assert tokenizers["small"].render_chat([ASK, calls, *results]).endswith(expected)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ("Hi", "non-empty list"),
        (["Hi"], "message 0 is a str"),
        ([{"role": "robot", "content": "Hi"}], "message 0 has role 'robot'; expected one of system, user, assistant"),
        ([{"content": "Hi"}], "message 0 has role None"),
        ([{"role": "user"}], r"message 0 \(user\) has no 'content'"),
        ([{"role": "user", "content": ["Hi"]}], r"message 0 \(user\) content is a list; expected a string"),
        ([{"role": "tool", "content": "sunny"}], r"message 0 \(tool\) must follow the assistant message"),
        ([ASK, CALL, RESULT, {"role": "assistant", "content": "Sunny."}, RESULT], r"message 4 \(tool\) must follow"),
        ([ASK, CALL, RESULT, {"role": "tool", "content": "sunny"}], r"message 3 \(tool\) answers no tool call"),
        ([ASK, CALL, {**RESULT, "tool_call_id": "call_9"}], r"message 2 \(tool\) has tool_call_id 'call_9', which"),
        ([{"role": "user", "content": "Hi", "tool_calls": CALL["tool_calls"]}], "only assistant messages make"),
        ([ASK, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}], "without function.name"),
        ([ASK, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city"}}]}], "valid JSON"),
        ([ASK, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "an object"),
    ],
)
def test_bad_messages_are_a_one_line_value_error(tokenizers, messages, message):
    with pytest.raises(ValueError, match=message) as error:
        tokenizers["small"].render_chat(messages)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("tools", [[{"name": "get_weather"}], ["get_weather"], [{"type": "function", "function": {}}]])
def test_bad_tools_are_a_value_error(tokenizers, tools):
    with pytest.raises(ValueError, match="tool 0 is not"):
        tokenizers["small"].render_chat([ASK], tools=tools)


def _tokenizer_with_template(directory, template: str) -> Tokenizer:
    write_gemma_tokenizer(directory)
    (directory / "chat_template.jinja").write_text(template)
    return Tokenizer.from_dir(directory)


def test_template_raise_exception_is_a_value_error(tmp_path):
    tokenizer = _tokenizer_with_template(tmp_path, "{{ raise_exception('Roles must alternate') }}")
    with pytest.raises(ValueError, match="the chat template rejected the messages: Roles must alternate"):
        tokenizer.render_chat([{"role": "user", "content": "Hi"}])


def test_template_that_fails_while_rendering_is_a_checkpoint_error(tmp_path):
    tokenizer = _tokenizer_with_template(tmp_path, "{{ messages[0]['content'] + 1 }}")
    with pytest.raises(CheckpointError, match="the chat template failed to render"):
        tokenizer.render_chat([{"role": "user", "content": "Hi"}])


def test_template_with_generation_markers_renders_their_body(tmp_path):
    tokenizer = _tokenizer_with_template(
        tmp_path, "{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
    )
    assert tokenizer.render_chat([{"role": "user", "content": "<é>"}]) == '"<é>"'


def test_bundled_templates_are_the_two_families():
    small, large = prompt.bundled_template(large=False), prompt.bundled_template(large=True)
    assert "<|channel>thought\\n<channel|>" in large and "<|channel>thought\\n<channel|>" not in small
