"""Split Gemma 4 output text, as it streams, into thought / answer / tool-call events.

Markup (reference section 3.4):
    <|channel>thought\\n ...thought... <channel|>   the thought channel
    <|tool_call>call:NAME{k:v,...}<tool_call|>        one tool call
    anything else                                    the answer

Decisions for cases the model should not produce:
- `<|channel>` always opens the thought channel (the only one Gemma 4 names); a following
  channel name `thought`, then one `\\n`, are stripped when present; anything else is thought.
- Inside a thought only `<channel|>` counts; inside a tool call only `<tool_call|>` counts.
- A tool call whose text does not parse as `call:NAME{...}` is still a tool_call event with
  its raw text, `arguments=None`, and `name` as found after `call:` ("" if none).
- At `close()`, an unterminated thought is thought; an unterminated tool call is parsed
  like a closed one (a stop string may have eaten `<tool_call|>`), so a cut-off call comes
  out with `arguments=None`. An empty tool call, like any empty text, is not reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_OPEN_THOUGHT, _CLOSE_THOUGHT = "<|channel>", "<channel|>"
_OPEN_CALL, _CLOSE_CALL = "<|tool_call>", "<tool_call|>"
_THOUGHT_NAME = "thought"
_QUOTE = '<|"|>'  # Gemma 4's string delimiter in tool calls (token 52, "escape_token")

# The markers that end the text of each channel, and the channel each one switches to.
_MARKERS = {
    "answer": {_OPEN_THOUGHT: "thought", _OPEN_CALL: "tool_call"},
    "thought": {_CLOSE_THOUGHT: "answer"},
    "tool_call": {_CLOSE_CALL: "answer"},
}
# A held-back suffix is a proper prefix of a marker, so never longer than this.
MAX_HELD = max(len(m) for markers in _MARKERS.values() for m in markers) - 1


@dataclass(frozen=True)
class Event:
    """A piece of one channel: "thought", "answer" or "tool_call" (then name and arguments)."""

    channel: str
    text: str
    name: str | None = None
    arguments: dict | None = None  # None also for a tool call that did not parse

    def to_dict(self) -> dict:
        """The tool call as the CLI prints it: {"name": ..., "arguments": {...}}."""
        if self.channel != "tool_call":
            raise ValueError(f"to_dict() is for tool_call events, not {self.channel!r} ones")
        return {"name": self.name, "arguments": self.arguments}


class ChannelParser:
    """Streaming parser: `feed` text in any chunking, then `close` once at the end."""

    def __init__(self):
        self._channel = "answer"
        self._buf = ""  # text not yet emitted: at most a partial marker after each feed
        self._call = ""  # the tool call read so far; emitted whole at `<tool_call|>`
        self._in_header = False  # right after `<|channel>`: `thought\n` may still follow

    def feed(self, text: str) -> list[Event]:
        """Events for everything in `text` that can no longer be the start of a marker."""
        self._buf += text
        events: list[Event] = []
        while True:
            if self._in_header:
                # "thought\n" could still be completed: wait, holding at most len("thought").
                if len(self._buf) <= len(_THOUGHT_NAME) and (_THOUGHT_NAME + "\n").startswith(self._buf):
                    return events
                # The channel name and one newline belong to the opening marker, not the thought.
                if self._buf.startswith(_THOUGHT_NAME):
                    self._buf = self._buf.removeprefix(_THOUGHT_NAME).removeprefix("\n")
                self._in_header = False
            markers = _MARKERS[self._channel]
            found = min(((self._buf.find(m), m) for m in markers if m in self._buf), default=None)
            if found is None:
                held = _partial_marker(self._buf, markers)
                self._emit(self._buf[: len(self._buf) - held], events)
                self._buf = self._buf[len(self._buf) - held :]
                return events
            i, marker = found
            self._emit(self._buf[:i], events)
            self._buf = self._buf[i + len(marker) :]
            if self._channel == "tool_call":
                self._emit_call(events)
            self._channel = markers[marker]
            self._in_header = self._channel == "thought"

    def close(self) -> list[Event]:
        """Flush what was held back (see the module notes); the parser is then fresh again."""
        events: list[Event] = []
        if self._in_header:
            self._buf = ""  # what is held is part of the opening `thought\n`, not thought
        self._emit(self._buf, events)
        if self._channel == "tool_call":
            self._emit_call(events)
        self.__init__()
        return events

    def _emit(self, text: str, events: list[Event]) -> None:
        if self._channel == "tool_call":
            self._call += text  # a call is reported only once it is whole
        elif text:
            events.append(Event(self._channel, text))

    def _emit_call(self, events: list[Event]) -> None:
        if self._call:
            name, arguments = parse_tool_call(self._call)
            events.append(Event("tool_call", self._call, name, arguments))
        self._call = ""


def _partial_marker(text: str, markers) -> int:
    """Length of the longest suffix of `text` that is the start of one of `markers`."""
    for n in range(min(len(text), MAX_HELD), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


# ---- tool-call text: call:NAME{key:value,...}, parsed by recursive descent --------------

_CALL = re.compile(r"\s*call:([^\s{]+)\s*")  # the name runs up to `{`, as transformers reads it
_SPACE = re.compile(r"\s*")
_BARE_KEY = re.compile(r"[^\s:{}\[\],]+")  # keys are written unquoted
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_WORDS = {"true": True, "false": False, "null": None}
_JSON = json.JSONDecoder()


def parse_tool_call(text: str) -> tuple[str, dict | None]:
    """(name, arguments) of a tool call's text; arguments is None if it does not parse."""
    head = _CALL.match(text)
    if head is None:
        return "", None
    try:
        if not text.startswith("{", head.end()):
            raise ValueError("arguments must be an object")
        arguments, end = _value(text, head.end())
        if _SPACE.match(text, end).end() != len(text):
            raise ValueError("text after the arguments")
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return head.group(1), None
    return head.group(1), arguments


def _value(s: str, i: int):
    """The value starting at s[i] (after spaces) and the index just past it."""
    i = _SPACE.match(s, i).end()
    if s.startswith(_QUOTE, i):
        end = s.find(_QUOTE, i + len(_QUOTE))  # no escapes: the first delimiter closes
        if end < 0:
            raise ValueError("unterminated string")
        return s[i + len(_QUOTE) : end], end + len(_QUOTE)
    if s.startswith('"', i):
        return _JSON.raw_decode(s, i)  # tolerate a JSON string where <|"|> was expected
    if s.startswith("{", i):
        pairs, i = _sequence(s, i + 1, "}", _pair)
        return dict(pairs), i
    if s.startswith("[", i):
        return _sequence(s, i + 1, "]", _value)
    for word, value in _WORDS.items():
        if s.startswith(word, i):
            return value, i + len(word)
    number = _NUMBER.match(s, i)
    if number is None:
        raise ValueError(f"no value at offset {i}")
    text = number.group()
    return (float(text) if any(c in text for c in ".eE") else int(text)), number.end()


def _pair(s: str, i: int):
    """`key:value` inside an object; a key may also be a quoted string."""
    i = _SPACE.match(s, i).end()
    if s.startswith((_QUOTE, '"'), i):
        key, i = _value(s, i)
    else:
        bare = _BARE_KEY.match(s, i)
        if bare is None:
            raise ValueError(f"no key at offset {i}")
        key, i = bare.group(), bare.end()
    i = _SPACE.match(s, i).end()
    if not s.startswith(":", i):
        raise ValueError(f"expected ':' at offset {i}")
    value, i = _value(s, i + 1)
    return (key, value), i


def _sequence(s: str, i: int, close: str, item):
    """Comma-separated `item`s up to `close` (object and list bodies share this)."""
    items = []
    i = _SPACE.match(s, i).end()
    if s.startswith(close, i):
        return items, i + 1
    while True:
        value, i = item(s, i)
        items.append(value)
        i = _SPACE.match(s, i).end()
        if s.startswith(close, i):
            return items, i + 1
        if not s.startswith(",", i):
            raise ValueError(f"expected ',' or {close!r} at offset {i}")
        i += 1
