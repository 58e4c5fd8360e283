"""Device time of one compiled decode step or one prompt, kernel by kernel, from ncu (CUDA only).

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python bench/kernel_profile.py --model 31b --quant 4bit [--phase prompt] > step.csv
    python bench/kernel_profile.py --table step.csv

The first command builds the model in memory (the path of compare_mlx_lm.py --in-memory), fills
a prompt, warms the compiled step up, and runs one more step between cuProfilerStart and
cuProfilerStop, so ncu times that step's kernels alone. With `--phase prompt` the profiled work
is instead a whole prompt of `--prompt-length` tokens into a fresh cache, up to the first
token's argmax (what compare_mlx_lm.py times as time to first token), after two warm-up runs.
ncu runs each kernel by itself, so the total is the sum of kernel times without the gaps
between them, and a kernel of a few us reads a little long. The second command sums the CSV by
kernel name, largest first.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

# ncu writes durations in the unit it picks per row.
MICROSECONDS_PER_UNIT = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def profiled(work):
    """Run `work` between cuProfilerStart and cuProfilerStop, the device idle on either side."""
    driver = ctypes.CDLL("libcuda.so.1")
    mx.synchronize()
    driver.cuProfilerStart()
    work()
    mx.synchronize()
    driver.cuProfilerStop()


def build(model_name: str, quant: str):
    from compare_mlx_lm import build_mlx_gemma4
    from configs import MODELS

    if not mx.cuda.is_available():
        raise SystemExit("kernel_profile.py needs MLX's CUDA back end (ncu profiles CUDA kernels)")
    model = build_mlx_gemma4(MODELS[model_name], 0, quant)
    mx.eval(model.parameters())
    return model


def profile_one_prompt(model_name: str, quant: str, prompt_length: int):
    from mlx_gemma4.generate import prefill

    model = build(model_name, quant)
    prompt = mx.random.randint(10, 1000, (1, prompt_length))

    def first_token():
        mx.eval(mx.argmax(prefill(model, prompt, model.make_cache(), 2048), axis=-1))

    for _ in range(2):  # the first run of each shape traces and allocates
        first_token()
    profiled(first_token)


def profile_one_step(model_name: str, quant: str, prompt_length: int):
    from mlx_gemma4.generate import CompiledDecode, prefill_only

    model = build(model_name, quant)
    cache = model.make_cache()
    prefill_only(model, mx.random.randint(10, 1000, (1, prompt_length)), cache, 2048)
    if not CompiledDecode.applies_to(model, cache):
        raise SystemExit(f"{model_name} {quant} does not decode through the compiled step")
    step = CompiledDecode.for_model(model)
    token = mx.array([[1]])
    for _ in range(4):  # the first steps trace and allocate
        token = mx.argmax(step(token, cache), axis=-1)[:, None]
        mx.eval(token)
    profiled(lambda: mx.eval(mx.argmax(step(token, cache), axis=-1)))


def kernel_table(csv_path: Path) -> str:
    lines = [line for line in csv_path.read_text().splitlines() if line.startswith('"')]
    rows = list(csv.reader(lines))
    if not rows:
        raise SystemExit(f"{csv_path}: no ncu CSV rows (run the step under ncu --csv first)")
    header, data = rows[0], rows[1:]
    name_at, metric_at, unit_at, value_at = (
        header.index(k) for k in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value"))
    total_us, launches = collections.Counter(), collections.Counter()
    for row in data:
        # Only the durations: a CSV with more --metrics (grid size, ...) has a row per metric.
        if row[value_at] and row[metric_at] == "gpu__time_duration.sum":
            name = re.sub(r"\(.*", "", row[name_at])  # the signature's arguments, not the name
            total_us[name] += float(row[value_at].replace(",", "")) * MICROSECONDS_PER_UNIT[row[unit_at]]
            launches[name] += 1
    out = [f"{sum(total_us.values()):,.1f} us over {sum(launches.values())} kernels", "",
           "| us | launches | us each | kernel |", "|---:|---:|---:|---|"]
    for name, us in total_us.most_common():
        out.append(f"| {us:,.1f} | {launches[name]} | {us / launches[name]:.1f} | `{name[:80]}` |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="e2b")
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--phase", choices=("decode", "prompt"), default="decode")
    parser.add_argument("--table", type=Path, help="sum this ncu CSV by kernel instead of running a step")
    args = parser.parse_args()
    if args.table:
        print(kernel_table(args.table))
    elif args.phase == "prompt":
        profile_one_prompt(args.model, args.quant, args.prompt_length)
    else:
        profile_one_step(args.model, args.quant, args.prompt_length)


if __name__ == "__main__":
    main()
