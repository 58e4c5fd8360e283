"""Model-level worth of each custom kernel: decode and prompt tok/s of ONE loaded checkpoint
under several kernel sets, trials interleaved in a new random order each round, so that drift in
the machine hits every set alike.

    python bench/kernel_sets.py --model e2b --quant bf16 [--trials 5]

Sets: `twins` (no kernel), `chosen` (what the model uses: mlx_gemma4.kernels.KERNELS), `all`
(every kernel), and `chosen` with one kernel flipped: `chosen -name` (off) or `chosen +name` (on).
A kernel earns its place in KERNELS where flipping it off costs speed. Needs a GPU back end.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlx_gemma4  # noqa: E402
from mlx_gemma4.generate import prefill  # noqa: E402
from mlx_gemma4.kernels import ALL_KERNELS, KERNELS, TWINS, KernelSet  # noqa: E402

KERNEL_FIELDS = [f.name for f in dataclasses.fields(KernelSet) if f.name != "uses_kernels"]


def kernel_sets() -> dict[str, KernelSet]:
    sets = {"twins": TWINS, "chosen": KERNELS, "all": ALL_KERNELS}
    for name in KERNEL_FIELDS:
        on = getattr(KERNELS, name) is not getattr(TWINS, name)
        flipped = getattr(TWINS if on else ALL_KERNELS, name)
        sets[f"chosen {'-' if on else '+'}{name}"] = dataclasses.replace(KERNELS, **{name: flipped})
    return sets


def decode_tok_s(model, prompt: list[int], tokens: int) -> float:
    stamps = [time.perf_counter() for _ in mlx_gemma4.generate_tokens(model, prompt, max_tokens=tokens, stop_ids=[])]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def prompt_tok_s(model, prompt: list[int]) -> float:
    start = time.perf_counter()
    mx.eval(prefill(model, mx.array([prompt]), model.make_cache(), 2048))
    return len(prompt) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="e2b")
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--checkpoint", type=Path, help="a converted directory (else random weights built in memory)")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--sets", help="comma-separated set names to run (default: all of them)")
    args = parser.parse_args()
    if not (mx.metal.is_available() or mx.cuda.is_available()):
        sys.exit("bench/kernel_sets.py compares kernels, which need MLX's Metal or CUDA back end")
    if args.checkpoint:
        model = mlx_gemma4.load_model(args.checkpoint)
    else:  # the in-memory path of compare_mlx_lm.py: through the converter, nothing on disk
        from compare_mlx_lm import build_mlx_gemma4
        from configs import MODELS

        model = build_mlx_gemma4(MODELS[args.model], 0, args.quant)
    prompt = np.random.default_rng(0).integers(10, model.config.vocab_size, args.prompt_length).tolist()
    sets = kernel_sets()
    if args.sets:
        sets = {name: sets[name] for name in args.sets.split(",")}
    order = np.random.default_rng(1)
    decode, prompt_rate = {name: [] for name in sets}, {name: [] for name in sets}
    traced = {}  # each set's compiled decode step, traced once and reused every round
    for trial in range(args.trials + 1):  # the first round warms every set up
        for name in order.permutation(list(sets)).tolist():  # a new order each round: no set always goes first
            model.use_kernels(sets[name])
            model._compiled_decode = traced.get(name)
            d, p = decode_tok_s(model, prompt, args.gen_tokens), prompt_tok_s(model, prompt)
            traced[name] = model._compiled_decode
            print(f"round {trial} {name}: decode {d:.1f} tok/s, prompt {p:,.0f} tok/s", file=sys.stderr, flush=True)
            if trial:
                decode[name].append(d)
                prompt_rate[name].append(p)
    base_decode, base_prompt = statistics.median(decode["chosen"]), statistics.median(prompt_rate["chosen"])
    print(f"{args.model} {args.quant}, {mx.default_device()}, mlx {mx.__version__}, median of {args.trials}; "
          f"decode {args.gen_tokens} tokens after {args.prompt_length}, prompt {args.prompt_length}")
    print("| kernel set | decode tok/s | vs chosen | prompt tok/s | vs chosen |\n|---|---:|---:|---:|---:|")
    for name in sets:
        d, p = statistics.median(decode[name]), statistics.median(prompt_rate[name])
        print(f"| {name} | {d:.1f} | {d / base_decode:.3f} | {p:,.0f} | {p / base_prompt:.3f} |")


if __name__ == "__main__":
    main()
