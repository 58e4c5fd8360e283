"""Channel parser: thought / answer / tool-call events from Gemma 4 text in any chunking."""

from __future__ import annotations

import json
from typing import NamedTuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_gemma4.channels import MAX_HELD, ChannelParser, Event, parse_tool_call

Q = '<|"|>'  # Gemma 4's string delimiter
MARKERS = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>")
WEATHER = (
    f"call:get_weather{{city:{Q}Tokyo{Q},units:{Q}metric{Q},days:3,exact:true,"
    f"tags:[{Q}a{Q},{Q}b{Q}],nested:{{k:{Q}v{Q}}}}}"
)
WEATHER_ARGS = {
    "city": "Tokyo", "units": "metric", "days": 3, "exact": True, "tags": ["a", "b"], "nested": {"k": "v"},
}


def parse(chunks) -> list[Event]:
    """Feed `chunks` (a str is one chunk), then close; every event in order."""
    parser = ChannelParser()
    events = []
    for chunk in [chunks] if isinstance(chunks, str) else chunks:
        events += parser.feed(chunk)
    return events + parser.close()


def summary(events: list[Event]) -> dict:
    """What must not depend on chunking: per-channel text and the tool calls."""
    for e in events:
        assert e.text, "empty events are never emitted"
        assert e.channel in ("thought", "answer", "tool_call")
    calls = [e for e in events if e.channel == "tool_call"]
    return {
        "thought": "".join(e.text for e in events if e.channel == "thought"),
        "answer": "".join(e.text for e in events if e.channel == "answer"),
        "calls": [(e.name, canonical(e.arguments)) for e in calls],
        "call_texts": [e.text for e in calls],
    }


def canonical(arguments) -> str:
    # json keeps true apart from 1 and 1.0 apart from 1, which == would not.
    return json.dumps(arguments, sort_keys=True)


# ---- examples ---------------------------------------------------------------------------


def test_thought_then_answer():
    s = summary(parse("<|channel>thought\nLet me think.\n<channel|>The answer is 4."))
    assert s["thought"] == "Let me think.\n"
    assert s["answer"] == "The answer is 4."
    assert s["calls"] == []


def test_empty_thought_then_answer():
    events = parse("<|channel>thought\n<channel|>Hello!")
    assert events == [Event("answer", "Hello!")]


def test_thought_opening_keeps_only_one_newline_and_allows_none():
    assert summary(parse("<|channel>thought\n\nx<channel|>"))["thought"] == "\nx"
    assert parse("<|channel>thought<channel|>hi") == [Event("answer", "hi")]


def test_other_channel_name_is_thought_text():
    assert parse("<|channel>plan\nx<channel|>") == [Event("thought", "plan\nx")]


def test_markers_of_other_channels_inside_thought_are_thought_text():
    s = summary(parse("<|channel>thought\na <|tool_call>call:f{}<tool_call|> <|channel><channel|>b"))
    assert s["thought"] == "a <|tool_call>call:f{}<tool_call|> <|channel>"
    assert s["answer"] == "b"
    assert s["calls"] == []


def test_tool_call_with_nested_arguments():
    [event] = parse(f"<|tool_call>{WEATHER}<tool_call|>")
    assert event == Event("tool_call", WEATHER, "get_weather", WEATHER_ARGS)
    assert json.loads(json.dumps(event.to_dict())) == {"name": "get_weather", "arguments": WEATHER_ARGS}


def test_tool_call_strings_may_hold_marker_like_characters():
    body = "a{b}, c:d \"e\" 'f' <g> || <|x\nline"
    text = f"call:note{{body:{Q}{body}{Q},n:-1.5e-3,z:null,e:[],o:{{}}}}"
    s = summary(parse(["before <|tool_call>", text, "<tool_call|> after"]))
    assert s["calls"] == [("note", canonical({"body": body, "n": -1.5e-3, "z": None, "e": [], "o": {}}))]
    assert s["answer"] == "before  after"


def test_two_tool_calls_in_a_row_are_two_events():
    events = parse(f"<|tool_call>{WEATHER}<tool_call|><|tool_call>call:now{{}}<tool_call|>")
    assert [(e.name, e.arguments) for e in events] == [("get_weather", WEATHER_ARGS), ("now", {})]


def test_unparseable_tool_call_is_reported_raw():
    [event] = parse("<|tool_call>call:f{a:<tool_call|>")
    assert event == Event("tool_call", "call:f{a:", "f", None)
    assert parse("<|tool_call>hello<tool_call|>") == [Event("tool_call", "hello", "", None)]
    assert parse("<|tool_call><tool_call|>x") == [Event("answer", "x")]  # an empty call: nothing


def test_unterminated_tool_call_is_parsed_at_close():
    assert parse("<|tool_call>call:f{a:1}") == [Event("tool_call", "call:f{a:1}", "f", {"a": 1})]
    assert parse("<|tool_call>call:f{a:<|") == [Event("tool_call", "call:f{a:<|", "f", None)]


def test_unterminated_thought_is_thought():
    assert summary(parse("<|channel>thought\nhmm <chan"))["thought"] == "hmm <chan"
    assert parse("<|channel>thou") == []  # only part of the opening


def test_plain_text_with_angle_brackets_and_bars_is_answer_and_not_held():
    parser = ChannelParser()
    assert parser.feed("a <b> c || d <|x |>") == [Event("answer", "a <b> c || d <|x |>")]
    assert parser.feed(" <|tool_cal") == [Event("answer", " ")]  # holds only the possible marker
    assert parser.close() == [Event("answer", "<|tool_cal")]


def test_thought_and_answer_stream_as_they_arrive():
    parser = ChannelParser()
    assert parser.feed("<|chan") == []
    assert parser.feed("nel>thought\nfirst") == [Event("thought", "first")]
    assert parser.feed(" second<") == [Event("thought", " second")]
    assert parser.feed("channel|>Hi") == [Event("answer", "Hi")]


def test_every_split_of_a_document_gives_the_same_result():
    doc = (
        f"ab<|channel>thought\nxy<channel|>cd<|tool_call>{WEATHER}<tool_call|>"
        "e<|tool_call>call:g{}<tool_call|>"
    )
    whole = summary(parse(doc))
    assert whole["answer"] == "abcde" and whole["thought"] == "xy"
    for i in range(len(doc) + 1):
        for j in range(i, min(i + 15, len(doc) + 1)):  # every marker fits in 15 chars
            assert summary(parse([doc[:i], doc[i:j], doc[j:]])) == whole, (i, j)
    assert summary(parse(list(doc))) == whole


def test_parser_is_fresh_after_close():
    parser = ChannelParser()
    parser.feed("<|channel>thought\nhalf")
    parser.close()
    assert parser.feed("answer") == [Event("answer", "answer")]


def test_tool_call_parser_edge_cases():
    spaced = ' call:f { a : "json \\" str" , b : [ 1 , 2.0 ] } '
    assert parse_tool_call(spaced) == ("f", {"a": 'json " str', "b": [1, 2.0]})
    assert parse_tool_call(f"call:f{{{Q}quoted key{Q}:false}}") == ("f", {"quoted key": False})
    assert parse_tool_call("call:f{a:1}trailing") == ("f", None)
    assert parse_tool_call("call:f{a:1,}") == ("f", None)
    assert parse_tool_call("call:f") == ("f", None)
    assert parse_tool_call("call:f{a:" + "[" * 5000) == ("f", None)  # deep nesting: no RecursionError
    nested = []
    for _ in range(49):
        nested = [nested]
    assert parse_tool_call("call:f{a:" + "[" * 50 + "]" * 50 + "}") == ("f", {"a": nested})


def test_to_dict_is_for_tool_calls():
    try:
        Event("answer", "x").to_dict()
    except ValueError as e:
        assert "tool_call" in str(e)
    else:
        raise AssertionError("to_dict() of an answer must fail")


# ---- properties -------------------------------------------------------------------------

# Distractors: marker prefixes and near misses, which are answer (or thought) text.
DISTRACTORS = sorted(
    {m[:k] for m in MARKERS for k in range(1, len(m))}
    | {"<|x", "||", "<b>", "a|>", Q, "<|turn>", "<turn|>", "<|channel|>", "<tool_call>", "thought\n", "call:f{"}
)
TEXT = st.lists(
    st.one_of(st.text("ab <|>{}:,'\"\n_tc", max_size=8), st.sampled_from(DISTRACTORS)), max_size=6
).map("".join)
KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
STRINGS = st.text("ab <|>{}[]:,'\"\n", max_size=10).filter(lambda s: Q not in s)
SCALARS = st.one_of(
    STRINGS, st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=8,
)
CALLS = st.tuples(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,10}", fullmatch=True), st.dictionaries(KEYS, VALUES, max_size=4)
)
PIECES = st.lists(
    st.one_of(
        st.tuples(st.just("answer"), TEXT), st.tuples(st.just("thought"), TEXT), st.tuples(st.just("tool_call"), CALLS)
    ),
    max_size=6,
)


def render(value) -> str:
    """A value as Gemma 4's chat template writes it (reference section 3.3, item 5)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return Q + value + Q
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"


class Doc(NamedTuple):
    text: str
    expected: dict  # as `summary` gives it
    content: list  # (position, channel, char) of each thought and answer character
    markers: int  # how many markers were placed


def build(pieces, open_thought_at_end: bool) -> Doc:
    """The document `pieces` make; the last thought stays open if `open_thought_at_end`."""
    doc = Doc("", {"thought": "", "answer": "", "calls": [], "call_texts": []}, [], 0)

    def add(text, channel=None, markers=0):
        nonlocal doc
        doc.content.extend((len(doc.text) + i, channel, c) for i, c in enumerate(text) if channel)
        doc = doc._replace(text=doc.text + text, markers=doc.markers + markers)

    for n, (channel, body) in enumerate(pieces):
        if channel == "answer":
            add(body, "answer")
        elif channel == "thought":
            add("<|channel>thought\n", markers=1)
            add(body, "thought")
            if not (open_thought_at_end and n == len(pieces) - 1):
                add("<channel|>", markers=1)
        else:
            name, arguments = body
            call = f"call:{name}{render(arguments)}"
            add(f"<|tool_call>{call}<tool_call|>", markers=2)
            doc.expected["calls"].append((name, canonical(arguments)))
            doc.expected["call_texts"].append(call)
        if channel in ("answer", "thought"):
            doc.expected[channel] += body
    return doc


# Documents whose every marker is one we placed: generated text may form one by accident.
DOCS = st.builds(build, PIECES, st.booleans()).filter(
    lambda doc: sum(doc.text.count(m) for m in MARKERS) == doc.markers
)


def chunked(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def cuts(doc: Doc):
    return st.lists(st.integers(0, len(doc.text)), max_size=20)


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@PROPERTY
@given(doc=DOCS, data=st.data())
def test_any_chunking_gives_the_generated_channels(doc, data):
    assert summary(parse(doc.text)) == doc.expected
    assert summary(parse(chunked(doc.text, data.draw(cuts(doc))))) == doc.expected


@PROPERTY
@given(doc=DOCS, data=st.data())
def test_holds_back_at_most_a_partial_marker(doc, data):
    parser, streamed, fed = ChannelParser(), [], 0
    for chunk in chunked(doc.text, data.draw(cuts(doc))):
        fed += len(chunk)
        streamed += [(e.channel, c) for e in parser.feed(chunk) if e.channel != "tool_call" for c in e.text]
        # Thought and answer come out in document order, at once but for a partial marker.
        assert streamed == [(channel, c) for _, channel, c in doc.content[: len(streamed)]]
        due = sum(p < fed - MAX_HELD for p, _, _ in doc.content)
        arrived = sum(p < fed for p, _, _ in doc.content)
        assert due <= len(streamed) <= arrived
