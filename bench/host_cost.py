"""What one graph node of a decode step costs the host, by kind of node, on MLX's GPU back end.

    python bench/host_cost.py [--nodes 64] [--calls 200]

Each kind runs as a chain of `--nodes` dependent nodes inside one `mx.compile`d function, on
E2B decode shapes (one row, width 1536), and is called `--calls` times, each call queued
(`mx.async_eval`) before the last one is read back, as the decode loop does. Per node:
- host us: the call and `mx.async_eval` until they return (building and handing over the graph);
- wall us: the whole loop's time. When host is close to wall, the chain is bound by the host.
Set MLX_MAX_OPS_PER_BUFFER / MLX_USE_CUDA_GRAPHS around it to see what MLX's CUDA graphs cost.
On a GPU the "trivial kernel" kinds ask how a custom kernel's host cost grows with the arrays it
takes and writes (ARITIES).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from mlx_gemma4 import kernels  # noqa: E402
from mlx_gemma4.kernels import _source  # noqa: E402

WIDTH = 1536


def chains(nodes: int) -> dict:
    """Kind -> (compiled chain over x [1, 1, WIDTH], its input)."""
    x = mx.random.normal((1, 1, WIDTH)).astype(mx.bfloat16) * 0.1
    weight = (mx.random.normal((WIDTH, WIDTH)) * WIDTH**-0.5).astype(mx.bfloat16)
    weight_t = mx.expand_dims(weight.T, 0)
    q, scales, biases = mx.quantize(weight, group_size=64, bits=4)
    norm = mx.ones((WIDTH,), mx.bfloat16)
    buffer = mx.zeros((1, 1, 256, WIDTH), mx.bfloat16)
    mx.eval(x, weight_t, q, scales, biases, norm, buffer)

    def matmul(v):
        for _ in range(nodes):
            v = v @ weight_t
        return v

    def quantized_matmul(v):
        for _ in range(nodes):
            v = kernels.qmv_ref(v, q, scales, biases, 64, 4)
        return v

    def qmv_kernel(v):
        for _ in range(nodes):
            v = kernels.qmv(v, q, scales, biases, 64, 4)
        return v

    def rms_norm(v):
        for _ in range(nodes):
            v = mx.fast.rms_norm(v, norm, 1e-6)
        return v

    def custom_kernel(v):
        for _ in range(nodes):
            v = kernels.gelu_gate(v, v)
        return v

    def cache_write(v):
        # A cache write at an array position as decode does it (cache.StepView), then a read of
        # the written row (two nodes a link).
        position = mx.array([3], mx.int32)
        buf = buffer
        for _ in range(nodes // 2):
            buf = mx.put_along_axis(buf, position.reshape(1, 1, 1, 1), v[:, None], axis=2)
            v = mx.take(buf, position, axis=2)[:, 0] * 0.5
        return v

    kinds = {"matmul": matmul, "quantized_matmul": quantized_matmul, "qmv kernel": qmv_kernel,
             "rms_norm": rms_norm, "custom kernel": custom_kernel, "cache write + take": cache_write}
    if kernels.gpu_backend() is None:  # custom kernels need MLX's Metal or CUDA back end
        kinds = {name: fn for name, fn in kinds.items() if fn not in (qmv_kernel, custom_kernel)}
    else:
        kinds.update({f"trivial kernel, {ins} in {outs} out": arity_chain(nodes, ins, outs) for ins, outs in ARITIES})
    return {name: (mx.compile(fn), x) for name, fn in kinds.items()}


# (inputs, outputs) of a trivial kernel: does a node's host cost grow with the arrays it takes?
# Session 17, H100, mlx 0.32.4: about 0.2 us an input and 2.4 us an output (4.5 us for 1 in 1 out,
# 6.9 for 12 in, 11.7 for 4 out), so a launch should declare no output it can do without.
ARITIES = [(1, 1), (4, 1), (8, 1), (12, 1), (1, 4), (12, 4)]


def arity_chain(nodes: int, inputs: int, outputs: int):
    """A chain of a kernel that adds `inputs` - 1 constant [WIDTH] arrays to v and writes the sum
    to each of its `outputs`; the first output feeds the next link."""
    constants = [mx.full((WIDTH,), 1e-3 * (i + 1), mx.bfloat16) for i in range(inputs - 1)]
    mx.eval(constants)
    names = ("v", *(f"c{i}" for i in range(inputs - 1)))
    outs = ("out", *(f"out{i}" for i in range(outputs - 1)))
    body = "uint i = thread_position_in_grid.x;\nfloat s = static_cast<float>(v[i]);\n"
    body += "".join(f"s += static_cast<float>({name}[i]);\n" for name in names[1:])
    body += "".join(f"{name}[i] = static_cast<T>(s);\n" for name in outs)
    kernel = _source.compile_source(f"host_cost_{inputs}_{outputs}", body, names, outs)

    def chain(v):
        for _ in range(nodes):
            v = kernel(inputs=[v.reshape(WIDTH), *constants], template=[("T", mx.bfloat16)], grid=(WIDTH, 1, 1),
                       threadgroup=(256, 1, 1), output_shapes=[(WIDTH,)] * outputs,
                       output_dtypes=[mx.bfloat16] * outputs)[0]
        return v.reshape(1, 1, WIDTH)
    return chain


def measure(fn, x: mx.array, calls: int) -> tuple[float, float]:
    """Median host seconds per call and wall seconds per call."""
    for _ in range(5):
        mx.eval(fn(x))
    hosts = []
    v = x
    start = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        v = fn(v)  # the chain's output feeds the next call
        mx.async_eval(v)
        hosts.append(time.perf_counter() - t)
    mx.eval(v)
    return statistics.median(hosts), (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    knobs = {k: os.environ[k] for k in ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER", "MLX_USE_CUDA_GRAPHS")
             if k in os.environ}
    print(f"{mx.default_device()}, mlx {mx.__version__}, {args.nodes} nodes a chain, {knobs or 'MLX defaults'}")
    print("| kind | host us/node | wall us/node |\n|---|---:|---:|")
    for name, (fn, x) in chains(args.nodes).items():
        host, wall = measure(fn, x, args.calls)
        print(f"| {name} | {1e6 * host / args.nodes:.2f} | {1e6 * wall / args.nodes:.2f} |", flush=True)


if __name__ == "__main__":
    main()
