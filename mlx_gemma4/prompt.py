"""Chat prompts for Gemma 4: which template, the jinja environment transformers renders with,
and the checks and reshaping that turn OpenAI-style messages into what Gemma's template reads.

Nothing here knows token ids; `tokenizer.Tokenizer` renders with these helpers, then encodes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CheckpointError

SMALL_FAMILY_TEMPLATE = "gemma4-small.jinja"  # E2B, E4B (sources: templates/README.md)
LARGE_FAMILY_TEMPLATE = "gemma4-large.jinja"  # 26B-A4B, 31B
ROLES = ("system", "user", "assistant", "tool")


def bundled_template(large: bool) -> str:
    """The chat template this package ships for the large (26B-A4B, 31B) or small (E2B, E4B) family."""
    name = LARGE_FAMILY_TEMPLATE if large else SMALL_FAMILY_TEMPLATE
    return (resources.files("mlx_gemma4") / "templates" / name).read_text(encoding="utf-8")


def is_large_family(config_file: Path) -> bool:
    """True for 26B-A4B / 31B: only E2B / E4B have per-layer embeddings (hidden_size_per_layer_input > 0).

    Without a readable config.json the answer is False: the small template's prompt holds only
    what the model itself would write, no pre-filled empty thought.
    """
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # A converted config is flat; an unconverted Hugging Face one nests the decoder in text_config.
    text_config = config.get("text_config") or config
    return not text_config.get("hidden_size_per_layer_input")


def checkpoint_template(directory: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The checkpoint's own chat template, in the order transformers looks for it, or None."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = directory / "chat_template.json"
    if json_file.is_file():
        try:
            template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as error:
            raise CheckpointError(f"{json_file} is not a JSON object with a chat_template: {error}") from None
        return _default_template(template, json_file)
    return _default_template(tokenizer_config.get("chat_template"), directory / "tokenizer_config.json")


def _default_template(template: Any, source: Path) -> str | None:
    # transformers also accepts a list of named templates; "default" is the chat one.
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{source} has a chat_template that is not a string")
    return template


class _GenerationTag(Extension):
    """Reads `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) as its body,
    so checkpoints whose templates carry it still render."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    # A template raises when the conversation breaks its rules: that is the caller's input, not the checkpoint.
    raise ValueError(f"the chat template rejected the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers' apply_chat_template uses."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise CheckpointError(f"the chat template does not compile (line {error.lineno}: {error.message})") from None


def render(
    template: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    enable_thinking: bool,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
) -> str:
    """The prompt text for `messages` (checked and reshaped by `prepare_messages`)."""
    messages, tools = prepare_messages(messages), prepare_tools(tools)
    try:
        return template.render(
            messages=messages,
            tools=tools,
            enable_thinking=enable_thinking,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except (jinja2.TemplateError, TypeError) as error:
        # Messages and tools are checked above, so a failure here is the template's.
        raise CheckpointError(f"the chat template failed to render: {error}") from None


def prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checked copies of `messages`, with tool results in Gemma's native place.

    Gemma's template reads tool results from `tool_responses` on the assistant message that made
    the calls, and continues that same model turn. So each `role: "tool"` message becomes a
    `{"name", "response"}` entry there (a JSON-object result as a mapping, anything else as text),
    and an assistant reply that directly follows the results becomes that turn's content,
    exactly as the model wrote it: calls, results, answer, one `<turn|>`.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    prepared: list[dict[str, Any]] = []
    open_turn = None  # the assistant turn whose tool results came in and whose reply may follow
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
        if message.get("tool_calls") and role != "assistant":
            raise ValueError(f"message {index} ({role}) has tool_calls; only assistant messages make tool calls")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise ValueError(f"message {index} ({role}) has no 'content'")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"message {index} ({role}) content is a {type(content).__name__}; expected a string")
        if role == "tool":
            caller = prepared[-1] if prepared and prepared[-1].get("tool_calls") else None
            open_turn = open_turn or (caller if caller and "tool_responses" not in caller else None)
            if open_turn is None:
                raise ValueError(
                    f"message {index} (tool) must follow the assistant message whose tool_calls it answers"
                )
            _add_tool_response(open_turn, message, index)
        elif role == "assistant" and open_turn and not open_turn["content"] and not message.get("tool_calls"):
            open_turn["content"], open_turn = content, None
        else:
            prepared.append(_checked_message(message, index))
            open_turn = None
    return prepared


def _checked_message(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    checked = {"role": message["role"], "content": message.get("content")}
    if message.get("tool_calls"):
        checked["tool_calls"] = [_checked_tool_call(call, index) for call in message["tool_calls"]]
    # transformers reads reasoning under either name; the large template re-injects it before tool calls.
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        checked["reasoning_content"] = reasoning
    return checked


def _checked_tool_call(call: Any, index: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"message {index} has a tool call without function.name: {call!r}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        # OpenAI clients send arguments as a JSON string; the template writes them as Gemma's key:value mapping.
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ValueError(f"message {index}: arguments of {function['name']} are not valid JSON") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"message {index}: arguments of {function['name']} must be an object")
    checked = {"function": {"name": function["name"], "arguments": dict(arguments)}}
    if "id" in call:
        checked["id"] = call["id"]
    return checked


def _add_tool_response(turn: dict[str, Any], message: Mapping[str, Any], index: int):
    responses = turn.setdefault("tool_responses", [])
    calls = turn["tool_calls"]
    name, call_id = message.get("name"), message.get("tool_call_id")
    if name is None and call_id is not None:
        name = next((call["function"]["name"] for call in calls if call.get("id") == call_id), None)
        if name is None:
            raise ValueError(
                f"message {index} (tool) has tool_call_id {call_id!r}, which matches none of the calls before it"
            )
    if name is None and len(responses) < len(calls):
        # Results without a name or id answer the calls in order.
        name = calls[len(responses)]["function"]["name"]
    if name is None:
        raise ValueError(f"message {index} (tool) answers no tool call; give it 'name' or 'tool_call_id'")
    content = message["content"]
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    responses.append({"name": name, "response": parsed if isinstance(parsed, Mapping) else content})


def prepare_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Checked copies of OpenAI-style tool schemas `{"type": "function", "function": {name, ...}}`."""
    if not tools:
        return None
    checked = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tool {index} is not {{'type': 'function', 'function': {{'name': ..., ...}}}}: {tool!r}")
        try:
            # A plain-JSON deep copy: the template never sees (or changes) the caller's objects.
            checked.append(json.loads(json.dumps(tool)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"tool {index} ({function['name']}) is not plain JSON: {error}") from None
    return checked
