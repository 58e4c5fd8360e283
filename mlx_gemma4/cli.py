"""`mlx-gemma4` command line: convert (chat and generate arrive with the chat issue)."""

from __future__ import annotations

import argparse
import sys

from .errors import Gemma4Error


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
    )
    print(f"Converted {args.hf_path} -> {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-gemma4", description="Gemma 4 on MLX")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a Hugging Face checkpoint")
    convert.add_argument("--hf-path", required=True, help="Hugging Face checkpoint directory")
    convert.add_argument("--mlx-path", required=True, help="output directory (must not exist)")
    convert.add_argument("--dtype", default="bfloat16", help="float32, float16 or bfloat16 (default)")
    convert.add_argument("-q", "--quantize", action="store_true", help="quantize weights (4-bit by default)")
    convert.add_argument("--q-bits", type=int, default=4, help="bits per weight with -q (4 or 8; 2-6 too)")
    convert.add_argument("--q-group-size", type=int, default=64, help="quantization group size (32, 64, 128)")
    convert.add_argument(
        "--q-sensitive-bits", type=int, default=8, help="minimum bits for PLE table/projections and router"
    )
    convert.set_defaults(run=_convert)
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
