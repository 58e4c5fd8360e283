"""Device time of one decode step, ours and mlx-lm's, or of our prompt, apart from the host's (CUDA only).

    python bench/device_time.py --model e2b --quant bf16 [--steps 12] [--ours-only]
    python bench/device_time.py --model 31b --quant 4bit --phase prompt --prompt-length 128

A step's tokens per second show whichever of host and device is slower. Here a one-thread
kernel first holds the GPU for SPIN_MS, long enough for the host to queue the whole step behind
it, then stamps the GPU's global timer; a second kernel stamps it after the logits. Their
difference is the device's time for the step with no wait on the host. Also printed: the host's
ms to build and queue the step, and ms a token pipelined as decode runs. ncu's per-kernel times
(bench/kernel_profile.py) say where the device time goes; they add up to more than this.

`--phase prompt` times our whole prompt into a fresh cache up to the first token's argmax (what
compare_mlx_lm.py times as time to first token) the same way: device ms behind the spin, host
ms to queue it, and ms unheld. Ours only: mlx-lm's prompt loop waits on the device between its
chunk and its last token, so the spin cannot hold its whole prompt.
"""

from __future__ import annotations

import argparse
import functools
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

from mlx_gemma4.generate import decode_step, prefill, prefill_only  # noqa: E402

SPIN_MS = {"decode": 40, "prompt": 250}  # the 31B's host needs about 16 ms a step, more for a prompt
WARMUP_STEPS = 6  # the first steps trace and allocate

_TIMER = 'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));'
_SPIN_SOURCE = f"""
  unsigned long long now; {_TIMER}
  unsigned long long until = now + SPIN_MS * 1000000ull;
  while (now < until) {{ {_TIMER} }}
  for (int i = 0; i < TOKENS; i++) passed[i] = token[i];
  stamp[0] = now;
"""
_STAMP_SOURCE = f"""
  unsigned long long now; {_TIMER}
  stamp[0] = now + (unsigned long long)(after[0] != after[0]);  // reads `after`: runs once it exists
"""


@functools.cache
def _kernels():
    """(spin, stamp): one-thread kernels, built on first use (MLX builds CUDA kernels only where CUDA is)."""
    spin = mx.fast.cuda_kernel(name="device_time_spin", input_names=["token"], output_names=["passed", "stamp"],
                               source=_SPIN_SOURCE)
    stamp = mx.fast.cuda_kernel(name="device_time_stamp", input_names=["after"], output_names=["stamp"],
                                source=_STAMP_SOURCE)
    return spin, stamp


def _one_thread(kernel, inputs, output_shapes, output_dtypes, template=None):
    return kernel(inputs=inputs, grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=output_shapes,
                  output_dtypes=output_dtypes, template=template)


def _held(tokens: mx.array, phase: str) -> tuple[mx.array, mx.array]:
    """(`tokens` once the spin has held the GPU, the global timer then)."""
    spin, _ = _kernels()
    return _one_thread(spin, [tokens], [tokens.shape, (1,)], [tokens.dtype, mx.uint64],
                       template=[("SPIN_MS", SPIN_MS[phase]), ("TOKENS", tokens.size)])


def _stamped(after: mx.array) -> mx.array:
    _, stamp = _kernels()
    (end,) = _one_thread(stamp, [after.reshape(-1)[:1].astype(mx.float32)], [(1,)], [mx.uint64])
    return end


def measure(step, token: mx.array, cache, steps: int) -> dict:
    """Median device ms a step, host ms a step (unpipelined) and ms a token pipelined."""
    device, host = [], []
    for _ in range(steps + WARMUP_STEPS):
        held, start = _held(token, "decode")
        queued = time.perf_counter()
        logits = step(held, cache)
        token = mx.argmax(logits, axis=-1)[:, None]
        end = _stamped(logits)
        mx.async_eval(token, start, end)
        host.append(time.perf_counter() - queued)
        device.append((end.item() - start.item()) / 1e6)
    started = time.perf_counter()
    for _ in range(steps):
        token = mx.argmax(step(token, cache), axis=-1)[:, None]
        mx.async_eval(token)
    mx.eval(token)
    return {
        "device ms a step": statistics.median(device[WARMUP_STEPS:]),
        "host ms a step": 1e3 * statistics.median(host[WARMUP_STEPS:]),
        "ms a token, pipelined": 1e3 * (time.perf_counter() - started) / steps,
    }


def measure_prompt(model, prompt: mx.array, runs: int) -> dict:
    """Median device ms of our prompt to the first token, host ms to queue it, and ms unheld."""

    def first_token(tokens: mx.array) -> tuple[mx.array, mx.array]:
        logits = prefill(model, tokens[None], model.make_cache(), 2048)
        return mx.argmax(logits, axis=-1), logits

    device, host, unheld = [], [], []
    for _ in range(runs + 2):  # the first two trace and allocate
        held, start = _held(prompt, "prompt")
        queued = time.perf_counter()
        token, logits = first_token(held)
        end = _stamped(logits)
        mx.async_eval(token, start, end)
        host.append(time.perf_counter() - queued)
        mx.eval(token)
        device.append((end.item() - start.item()) / 1e6)
        started = time.perf_counter()
        mx.eval(first_token(prompt)[0])
        unheld.append(time.perf_counter() - started)
    return {
        "device ms to the first token": statistics.median(device[2:]),
        "host ms to queue it": 1e3 * statistics.median(host[2:]),
        "ms to the first token, unheld": 1e3 * statistics.median(unheld[2:]),
    }


def ours(model, prompt: mx.array):
    cache = model.make_cache()
    prefill_only(model, prompt[None], cache, 2048)
    return decode_step(model, cache), cache


def mlx_lm(model, prompt: mx.array):
    cache = make_prompt_cache(model)
    model(prompt[None], cache=cache)
    mx.eval([c.state for c in cache])
    return (lambda token, c: model(token, cache=c)[:, -1]), cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="e2b", choices=sorted(MODELS))
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--phase", choices=("decode", "prompt"), default="decode")
    args = parser.parse_args()
    if not mx.cuda.is_available():
        raise SystemExit("device_time.py needs MLX's CUDA back end (it reads the GPU's global timer)")
    text = MODELS[args.model]
    prompt = mx.array(np.random.default_rng(0).integers(10, text["vocab_size"], args.prompt_length), dtype=mx.int32)
    if args.phase == "prompt":
        results = {"mlx_gemma4": measure_prompt(build_mlx_gemma4(text, 0, args.quant), prompt, args.steps)}
        print_table(args, results)
        return
    runtimes = [("mlx_gemma4", build_mlx_gemma4, ours)] + [("mlx-lm", build_mlx_lm, mlx_lm)] * (not args.ours_only)
    results = {}
    for name, build, runtime in runtimes:
        step, cache = runtime(build(text, 0, args.quant), prompt)
        token = mx.array([[5]])
        for _ in range(WARMUP_STEPS):
            token = mx.argmax(step(token, cache), axis=-1)[:, None]
            mx.eval(token)
        results[name] = measure(step, token, cache, args.steps)
        del step, cache
        gc.collect()
        mx.clear_cache()
    print_table(args, results)


def print_table(args, results: dict):
    print(f"{args.model} {args.quant} {args.phase}, {mx.default_device()}, mlx {mx.__version__}, "
          f"prompt {args.prompt_length}")
    print("| measure | " + " | ".join(results) + " |\n|---|" + "---:|" * len(results))
    for key in results["mlx_gemma4"]:
        print(f"| {key} | " + " | ".join(f"{r[key]:.2f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
