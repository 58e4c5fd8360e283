"""`mlx-gemma4` command line: chat, generate and convert."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from .errors import Gemma4Error

DIM, RESET = "\033[2m", "\033[0m"


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert

    bits = args.q_bits if args.quantize else None
    out = convert(
        args.hf_path,
        args.mlx_path,
        dtype=args.dtype,
        quantize_bits=bits,
        group_size=args.q_group_size,
        sensitive_bits=args.q_sensitive_bits,
        ple_table_bits=args.q_ple_table_bits,
    )
    print(f"Converted {args.hf_path} -> {out}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _sampling_flags(parser: argparse.ArgumentParser):
    parser.add_argument("--model", required=True, help="converted model directory or Hugging Face id")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    parser.add_argument("--tokens-limit", type=_positive_int, default=4096, help="most tokens per reply")
    parser.add_argument("--think", action="store_true", help="let the model think before answering")
    parser.add_argument("--show-thinking", action="store_true", help="print the thoughts, dimmed")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--tools", type=Path, help="JSON file with a list of tool (function) schemas")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--temp", type=float, help="sampling temperature (default: the checkpoint's)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    parser.add_argument("--repetition-penalty", type=float, help="penalise recently generated tokens (> 1)")
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    parser.add_argument("--stats", action="store_true", help="print speed and token counts after each reply")


class _Session:
    """What chat and generate share: the model, options, and how a reply is printed."""

    def __init__(self, args: argparse.Namespace):
        from .load import load, resolve_model_path
        from .sampling import SamplingOptions, checkpoint_sampling

        self.args = args
        # Validate flags before the (slow) load: a bad value is a one-line error at once.
        chosen = dict(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                      repetition_penalty=args.repetition_penalty, seed=args.seed)
        try:
            SamplingOptions().updated(**chosen)
        except ValueError as exc:
            raise Gemma4Error(str(exc)) from None
        self.tools = _read_tools(args.tools) if args.tools else None
        path = resolve_model_path(args.model)
        self.model, self.tokenizer = load(path)
        base = SamplingOptions() if args.greedy else checkpoint_sampling(path)
        self.sampling = base.updated(**chosen)
        if args.greedy:
            self.sampling = self.sampling.updated(temperature=0.0)

    def reply(self, messages: list[dict], prompt_cache, out) -> str:
        """Stream one reply to `out`; returns the answer text (for the history)."""
        from .generate import Stats, stream_generate

        answer, shown = [], None  # shown: the channel of the unfinished line on screen
        stream = stream_generate(
            self.model, self.tokenizer, messages, max_tokens=self.args.tokens_limit,
            enable_thinking=self.args.think, tools=self.tools, stop_strings=self.args.stop,
            prompt_cache=prompt_cache, **vars(self.sampling),
        )
        dim, reset = (DIM, RESET) if out.isatty() else ("", "")
        try:
            for item in stream:
                if isinstance(item, Stats):
                    if self.args.stats:
                        _print_stats(item)
                    continue
                if item.channel == "thought" and not self.args.show_thinking:
                    continue
                if shown is not None and (shown != item.channel or shown == "tool_call"):
                    out.write("\n")  # each channel, and each tool call, on lines of its own
                if item.channel == "thought":
                    out.write(("" if shown == "thought" else "thinking: ") + f"{dim}{item.text}{reset}")
                elif item.channel == "tool_call":
                    out.write(json.dumps(item.to_dict()))
                else:
                    answer.append(item.text)
                    out.write(item.text)
                shown = item.channel
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C ends this reply; the session and its history go on
            print("\n(reply stopped)", file=sys.stderr)
        finally:
            stream.close()
            if shown is not None:
                out.write("\n")
                out.flush()
        return "".join(answer)


def _read_tools(path: Path) -> list[dict]:
    try:
        tools = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Gemma4Error(f"cannot read tools from {path}: {exc}") from None
    if not isinstance(tools, list):
        raise Gemma4Error(f"{path} must hold a JSON list of tool schemas")
    return tools


def _print_stats(stats) -> None:
    print(
        f"[prompt {stats.prompt_tokens} tokens ({stats.reused_tokens} reused), {stats.prompt_tps:.1f} tok/s; "
        f"reply {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s; "
        f"peak {stats.peak_memory_gb:.2f} GB]",
        file=sys.stderr,
    )


def _input_lines(stream) -> Iterable[str]:
    """Turns typed at a terminal (with a prompt) or read from a pipe, one per line."""
    interactive = stream.isatty()
    while True:
        try:
            line = input(">>> ") if interactive else stream.readline()
        except EOFError:
            return
        except KeyboardInterrupt:  # at the prompt: a hint, not an exit
            print("\n(use /exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        if not interactive and line == "":
            return
        yield line.rstrip("\n")


def _chat(args: argparse.Namespace) -> None:
    from .cache import PromptCache

    session = _Session(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history, prompt_cache = list(system), PromptCache(session.model)
    for line in _input_lines(sys.stdin):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            history, prompt_cache = list(system), PromptCache(session.model)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            answer = session.reply(history, prompt_cache, sys.stdout)
        except (Gemma4Error, ValueError) as exc:  # a bad turn never ends the session
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def _generate(args: argparse.Namespace) -> None:
    session = _Session(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    try:
        session.reply(messages, None, sys.stdout)
    except ValueError as exc:
        raise Gemma4Error(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")  # one line, no usage dump


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlx-gemma4", description="Gemma 4 on MLX")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    convert = commands.add_parser("convert", help="convert a Hugging Face checkpoint")
    convert.add_argument("--hf-path", required=True, help="Hugging Face checkpoint directory")
    convert.add_argument("--mlx-path", required=True, help="output directory (must not exist)")
    convert.add_argument("--dtype", default="bfloat16", help="float32, float16 or bfloat16 (default)")
    convert.add_argument("-q", "--quantize", action="store_true", help="quantize weights (4-bit by default)")
    convert.add_argument("--q-bits", type=int, default=4, help="bits per weight with -q (4 or 8; 2-6 too)")
    convert.add_argument("--q-group-size", type=int, default=64, help="quantization group size (32, 64, 128)")
    convert.add_argument(
        "--q-sensitive-bits", type=int, default=8, help="minimum bits for the PLE projections and MoE router"
    )
    convert.add_argument("--q-ple-table-bits", type=int, default=5, help="minimum bits for the PLE table")
    convert.set_defaults(run=_convert)

    chat = commands.add_parser("chat", help="chat in the terminal (or with turns piped in, one per line)")
    _sampling_flags(chat)
    chat.set_defaults(run=_chat)
    generate = commands.add_parser("generate", help="answer one prompt and exit")
    _sampling_flags(generate)
    generate.add_argument("--prompt", required=True, help="the user message")
    generate.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except Gemma4Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
