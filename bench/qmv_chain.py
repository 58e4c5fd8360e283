"""qmv against MLX's quantized_matmul as a decode step runs them: each call's input is the
previous call's output, so no two kernels overlap (bench/kernels.py times batches of
independent calls, which MLX's CUDA graphs may overlap). Shapes: 4-bit MLP and attention
projections of the real configs; weights rotated over three copies so they come from HBM.

    python bench/qmv_chain.py [--sweep]     # --sweep also tries other RPS x SIMDS layouts
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

qmv_module = importlib.import_module("mlx_gemma4.kernels.qmv")  # the package exports a function of that name

SHAPES = (("31b mlp", 5376, 21504), ("31b attention q/o", 5376, 8192), ("e4b mlp", 2560, 20480))
PAIRS = 12  # up-then-down pairs per timed chain


def with_layout(rps: int, simds: int):
    def call(x, w, scales, biases):
        qmv_module.RPS, qmv_module.SIMDS = rps, simds
        return qmv_module.qmv(x, w, scales, biases, 64, 4)

    return call


def quantized(N: int, K: int, copies: int = 3):
    return [mx.quantize(mx.random.normal((N, K)).astype(mx.bfloat16) * 0.02, group_size=64, bits=4)
            for _ in range(copies)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    if not mx.cuda.is_available() and not mx.metal.is_available():
        sys.exit("bench/qmv_chain.py times a GPU kernel; MLX has no GPU back end here")
    layouts = [(qmv_module.RPS, qmv_module.SIMDS)]
    if args.sweep:
        layouts += [(r, s) for r in (1, 2, 4, 8) for s in (2, 4, 8) if (r, s) != layouts[0]]
    variants = {"mlx": lambda x, w, s, b: qmv_module.qmv_ref(x, w, s, b, 64, 4)}
    variants.update({f"qmv rows {r} simds {s}": with_layout(r, s) for r, s in layouts})
    print(f"{mx.default_device()}, mlx {mx.__version__}; us per up+down pair, GB/s of weights read")
    print("| shape | variant | us | GB/s | vs mlx |\n|---|---|---:|---:|---:|")
    for label, D, inner in SHAPES:
        up, down = quantized(inner, D), quantized(D, inner)
        nbytes = sum(a.nbytes for a in up[0]) + sum(a.nbytes for a in down[0])
        x0 = mx.random.normal((1, 1, D)).astype(mx.bfloat16)
        mx.eval(up, down, x0)
        baseline = None
        for name, fn in variants.items():
            def chain(fn=fn):
                x = x0
                for i in range(PAIRS):
                    x = fn(fn(x, *up[i % 3]), *down[i % 3]) * 0.01  # keeps values in range
                return x

            mx.eval(chain())
            samples = []
            for _ in range(7):
                mx.synchronize()
                start = time.perf_counter()
                mx.eval(chain())
                mx.synchronize()
                samples.append((time.perf_counter() - start) / PAIRS)
            us = 1e6 * statistics.median(samples)
            baseline = baseline or us
            print(f"| {label} | {name} | {us:.1f} | {nbytes / us / 1e3:,.0f} | {baseline / us:.2f}x |", flush=True)
    qmv_module.RPS, qmv_module.SIMDS = layouts[0]


if __name__ == "__main__":
    main()
