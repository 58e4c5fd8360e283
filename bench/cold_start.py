"""Time from a new process to its first tokens, mlx_gemma4 beside mlx-lm, on one random-weight
checkpoint (compare_mlx_lm.py's files path). Each runtime runs in `--processes` new processes,
alternating: import, load, then greedy tokens after a random prompt. A process pays for every
kernel it builds on first use (MLX's, and on a GPU ours); the first one on a machine shows what
a new user waits, later ones what MLX's caches on disk spare.

    python bench/cold_start.py --model e2b --quant bf16
    python bench/cold_start.py --model e2b-mini --quant 4bit --processes 2   # CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUNTIMES = ("mlx_gemma4", "mlx-lm")


def child(runtime: str, path: Path, prompt: list[int], gen_tokens: int):
    """One process's timings, as one JSON line on stdout."""
    start = time.perf_counter()
    import mlx.core as mx

    if runtime == "mlx_gemma4":
        import mlx_gemma4

        imported = time.perf_counter()
        model = mlx_gemma4.load_model(path)
        mx.eval(model.parameters())
        loaded = time.perf_counter()
        tokens = mlx_gemma4.generate_tokens(model, prompt, max_tokens=gen_tokens, stop_ids=[])
    else:
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load_model

        imported = time.perf_counter()
        model = load_model(path)[0]
        mx.eval(model.parameters())
        loaded = time.perf_counter()
        # generate_step never stops on EOS; its default sampler is the argmax.
        steps = generate_step(mx.array(prompt), model, max_tokens=gen_tokens)
        tokens = (int(token) for token, _ in steps)
    first = None
    for _ in tokens:
        first = first or time.perf_counter()
    done = time.perf_counter()
    print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "first_token_s": first - loaded,
                      "rest_s": done - first}))


def run_child(runtime: str, path: Path, prompt: list[int], gen_tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", runtime, "--path", str(path), "--prompt-ids",
               ",".join(map(str, prompt)), "--gen-tokens", str(gen_tokens)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.stderr.write(finished.stderr)
        raise SystemExit(f"{runtime}: the timed process failed (exit {finished.returncode})")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[tuple[int, str, dict]], gen_tokens: int) -> str:
    lines = ["| process | runtime | import s | load s | first token s | next tokens s | total s |",
             "|---|---|---|---|---|---|---|"]
    for number, runtime, t in rows:
        total = t["import_s"] + t["load_s"] + t["first_token_s"] + t["rest_s"]
        lines.append(f"| {number} | {runtime} | {t['import_s']:.2f} | {t['load_s']:.2f} | {t['first_token_s']:.2f} "
                     f"| {t['rest_s']:.2f} ({gen_tokens - 1}) | {total:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e2b-mini")
    parser.add_argument("--quant", default="bf16", choices=["bf16", "8bit", "4bit"])
    parser.add_argument("--processes", type=int, default=2, help="new processes per runtime, alternating")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlx_gemma4_bench"))
    parser.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.gen_tokens < 1 or args.processes < 1:
        raise SystemExit("--gen-tokens and --processes must be at least 1")
    if args.child:
        child(args.child, args.path, [int(i) for i in args.prompt_ids.split(",")], args.gen_tokens)
        return
    from compare_mlx_lm import (  # bench/ is on sys.path when run as a script
        MIN_TOKEN_ID, MODELS, model_workdir, prepare_hf_checkpoint, prepare_mlx_gemma4_checkpoint,
        prepare_mlx_lm_checkpoint,
    )

    prompt = np.random.default_rng(args.seed).integers(MIN_TOKEN_ID, MODELS[args.model]["vocab_size"],
                                                        args.prompt_length).tolist()
    root = model_workdir(args.workdir, args.model, args.seed)
    hf_dir = prepare_hf_checkpoint(root, args.model, args.seed)
    paths = {"mlx_gemma4": prepare_mlx_gemma4_checkpoint(hf_dir, root, args.quant, reconvert=False),
             "mlx-lm": prepare_mlx_lm_checkpoint(hf_dir, root, args.quant, reconvert=False)}
    rows = [(number, runtime, run_child(runtime, paths[runtime], prompt, args.gen_tokens))
            for number in range(1, args.processes + 1) for runtime in RUNTIMES]
    print(f"{args.model} {args.quant}, prompt {args.prompt_length}, {args.gen_tokens} greedy tokens; "
          "each row a new process, in the order run")
    print(markdown_table(rows, args.gen_tokens))


if __name__ == "__main__":
    main()
