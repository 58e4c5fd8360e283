"""`mlx-gemma4 chat` and `generate`, driven through stdin/argv on the trained chat checkpoint."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from mlx_gemma4 import cli
from mlx_gemma4.channels import Event


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_gemma4.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_generate_prints_the_answer(chat_dir):
    result = run_cli("generate", "--model", str(chat_dir), "--prompt", "Hi", "--greedy")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello! How are you?\n"


def test_chat_keeps_history_hides_thinking_and_reuses_the_cache(chat_dir):
    turns = "What is 2+2?\nAnd 3+3?\n"
    flags = ["--think", "--greedy", "--stats", "--system", "Be brief."]
    result = run_cli("chat", "--model", str(chat_dir), *flags, stdin=turns)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["It is 4.", "It is 6."]
    stats = [line for line in result.stderr.splitlines() if line.startswith("[prompt")]
    assert "(0 reused)" in stats[0] and "(0 reused)" not in stats[1]


def test_show_thinking_labels_the_thoughts(chat_dir):
    flags = ["--think", "--greedy", "--show-thinking", "--system", "Be brief."]
    result = run_cli("chat", "--model", str(chat_dir), *flags, stdin="What is 2+2?\n")
    assert result.stdout.splitlines() == ["thinking: add two and two", "It is 4."]


def test_reset_clears_history_and_exit_ends_the_session(chat_dir):
    turns = "Hi\n/reset\nHi\n/exit\nSmile\n"
    result = run_cli("chat", "--model", str(chat_dir), "--greedy", "--stats", stdin=turns)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Hello! How are you?", "Hello! How are you?"]  # nothing after /exit
    stats = [line for line in result.stderr.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 2 and all("(0 reused)" in line for line in stats)
    assert "(history cleared)" in result.stderr


def test_tool_calls_print_as_json(chat_dir, tmp_path):
    from chat_model import WEATHER_TOOL

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER_TOOL]))
    result = run_cli("chat", "--model", str(chat_dir), "--greedy", "--tools", str(tools), stdin="Weather in Tokyo?\n")
    assert json.loads(result.stdout) == {"name": "get_weather", "arguments": {"city": "Tokyo"}}


def test_tokens_limit_cuts_the_reply(chat_dir):
    result = run_cli("generate", "--model", str(chat_dir), "--prompt", "Hi", "--greedy", "--tokens-limit", "2", "--stats")
    assert "reply 2 tokens" in result.stderr and len(result.stdout) < len("Hello! How are you?")


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/no/such/model", "--prompt", "Hi"], "does not exist"),
        (["generate", "--model", "{chat}", "--prompt", "Hi", "--temp", "-1"], "temperature"),
        (["generate", "--model", "{chat}", "--prompt", "Hi", "--tokens-limit", "0"], "tokens-limit"),
        (["generate", "--model", "{chat}", "--prompt", "Hi " * 5000], "context"),
        (["chat", "--model", "{chat}", "--tools", "/no/tools.json"], "tools"),
    ],
)
def test_errors_are_one_line_with_a_failing_exit(chat_dir, args, message):
    result = run_cli(*[a.replace("{chat}", str(chat_dir)) for a in args])
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_a_bad_turn_does_not_end_the_chat(chat_dir):
    result = run_cli("chat", "--model", str(chat_dir), "--greedy", stdin="Hi " * 5000 + "\nHi\n")
    assert result.returncode == 0
    assert "context" in result.stderr and result.stdout.splitlines() == ["Hello! How are you?"]


def test_ctrl_c_stops_the_reply_not_the_session(chat_dir, monkeypatch, capsys):
    import mlx_gemma4.generate as generate_module

    real = generate_module.stream_generate
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            yield Event("answer", "Hel")
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "stream_generate", interrupted_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nHi\n"))
    assert cli.main(["chat", "--model", str(chat_dir), "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["Hel", "Hello! How are you?"] and "(reply stopped)" in err
