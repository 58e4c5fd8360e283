"""Where a decode step and a prompt spend their time and memory, ours and mlx-lm's, on one
random-weight model built in memory (the path of compare_mlx_lm.py --in-memory).

    python bench/step_profile.py --model e2b --quant bf16 [--prompt-length 512] [--steps 64]

Per runtime, one step at a time with no pipelining, median over `--steps` tokens:
- host ms: building the step's graph and handing it to the device (the call, argmax and
  `mx.async_eval` until it returns); step ms: until the token is back on the host. When host
  ms is close to the pipelined decode's ms per token, decode is bound by the host.
- the prompt: ms for the cache-filling chunks and for the last token, which yields the logits;
- memory: the weights (active after the build), the peak over the prompt, the peak over decode.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from compare_mlx_lm import build_mlx_gemma4, build_mlx_lm  # noqa: E402
from configs import MODELS  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_gemma4.generate import decode_step, prefill_only  # noqa: E402


def ours(model):
    """(fill(prompt) -> cache, last(token, cache) -> logits, step(token, cache) -> logits),
    as generate.prefill and the decode loop run them."""
    def fill(prompt):
        cache = model.make_cache()
        prefill_only(model, prompt[None], cache, 2048)
        return cache

    def step(token, cache):
        return decode_step(model, cache)(token, cache)

    return fill, step, step


def mlx_lm(model):
    def fill(prompt):
        cache = make_prompt_cache(model)
        model(prompt[None], cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    def step(token, cache):
        return model(token, cache=cache)[:, -1]

    return fill, step, step


def profile(model, runtime, prompt: mx.array, steps: int) -> dict:
    fill, last, step = runtime(model)
    gc.collect()
    mx.clear_cache()
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    fills, lasts = [], []
    for _ in range(3):
        start = time.perf_counter()
        cache = fill(prompt[:-1])
        filled = time.perf_counter()
        mx.eval(mx.argmax(last(prompt[None, -1:], cache), axis=-1))
        fills.append(filled - start)
        lasts.append(time.perf_counter() - filled)
    prompt_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    token = mx.argmax(last(prompt[None, -1:], cache), axis=-1)
    hosts, totals = [], []
    for _ in range(steps + 8):  # the first steps trace and allocate
        mx.eval(token)
        start = time.perf_counter()
        token = mx.argmax(step(token[:, None], cache), axis=-1)
        mx.async_eval(token)
        dispatched = time.perf_counter()
        token.item()
        hosts.append(dispatched - start)
        totals.append(time.perf_counter() - start)
    ms = lambda values: 1e3 * statistics.median(values[-steps:])  # noqa: E731
    return {
        "fill ms": 1e3 * statistics.median(fills), "last token ms": 1e3 * statistics.median(lasts),
        "step host ms": ms(hosts), "step ms": ms(totals),
        "weights GB": weights / 1e9, "prompt peak GB": prompt_peak / 1e9, "decode peak GB": mx.get_peak_memory() / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="e2b")
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    text = MODELS[args.model]
    prompt = mx.array(np.random.default_rng(0).integers(10, text["vocab_size"], args.prompt_length), dtype=mx.int32)
    results = {}
    for name, build, runtime in (("mlx_gemma4", build_mlx_gemma4, ours), ("mlx-lm", build_mlx_lm, mlx_lm)):
        results[name] = profile(build(text, 0, args.quant), runtime, prompt, args.steps)
        print(name, {k: round(v, 2) for k, v in results[name].items()}, file=sys.stderr, flush=True)
        gc.collect()
        mx.clear_cache()
    print(f"{args.model} {args.quant}, {mx.default_device()}, mlx {mx.__version__}, prompt {args.prompt_length}")
    print("| measure | mlx_gemma4 | mlx-lm |\n|---|---:|---:|")
    for key in results["mlx_gemma4"]:
        print(f"| {key} | {results['mlx_gemma4'][key]:.2f} | {results['mlx-lm'][key]:.2f} |")


if __name__ == "__main__":
    main()
