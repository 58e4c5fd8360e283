"""Each custom kernel against its MLX twin at the shapes the real models run (E2B, E4B,
26B-A4B, 31B; decode with a 4096-token context and 512-token prefill chunks), bfloat16.

    python bench/kernels.py [--models e2b,31b] [--kernels gelu_gate] [--context 4096] [--out table.md]

Prints a markdown table: median microseconds per call (kernel and twin, both timed the way the
model runs them, compiled at decode and eager at prefill, in batches of calls built and evaluated
together, inputs rotated over enough copies to leave the L2 cache), the speedup, and the kernel's
achieved GB/s over the bytes it must move.
Needs MLX's Metal or CUDA back end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from mlx_gemma4.cache import DEFAULT_SLIDING_HEADROOM, KVCache, SlidingKVCache  # noqa: E402
from mlx_gemma4.config import from_hf_config  # noqa: E402
from mlx_gemma4.kernels import (  # noqa: E402
    decode_attention, decode_attention_ref, gated_qmv, gated_qmv_ref, gelu_gate, gelu_gate_ref, moe_norm_residual,
    moe_norm_residual_ref, moe_router, moe_router_ref, norm_residual, norm_residual_ref, ple_inputs, ple_inputs_ref,
    prompt_attention, prompt_attention_ref, qmm, qmm_ref, qmv, qmv_ref, rope_norm, rope_norm_ref,
)
from mlx_gemma4.rope import LayerRoPE  # noqa: E402

DTYPE = mx.bfloat16
EPS = 1e-6
CONTEXT = 4096  # decode: tokens already in a full layer's cache
PREFILL = 512  # prefill chunk
MODEL_NAMES = ("e2b", "e4b", "26b-a4b", "31b")
L2_BYTES = 64 << 20  # rotate input copies until a pass touches more than this (H100 L2: 50 MB)


def _rand(shape, scale=1.0):
    return (mx.random.normal(shape) * scale).astype(DTYPE)


def _layer(config, kind):
    return next(layer for layer in config.layers if layer.layer_type == kind)


def bench_rope_norm(config, phase):
    L, offset = (1, CONTEXT) if phase == "decode" else (PREFILL, 0)
    Hq = config.num_attention_heads
    cases = {f"{kind.split('_')[0]} q|k|v": (_layer(config, kind), False) for kind in ("sliding_attention", "full_attention")}
    if any(layer.kv_source != i for i, layer in enumerate(config.layers)):
        cases["kv-shared q"] = (_layer(config, "sliding_attention"), True)
    for label, (layer, shared) in cases.items():
        D, rope = layer.head_dim, LayerRoPE(layer.rope, layer.head_dim)
        Hkv = 0 if shared else layer.num_kv_heads
        heads = Hq + Hkv * (1 if layer.k_eq_v else 2)
        make = lambda: (_rand((1, L, heads * D)), _rand((D,)) + 1, None if shared else _rand((D,)) + 1, offset,  # noqa: E731,B023
                        rope, EPS, Hkv, layer.k_eq_v)  # noqa: B023
        yield f"{label}{' (k=v)' if layer.k_eq_v and not shared else ''} [1,{L},{heads},{D}]", make


def bench_norm_residual(config, phase):
    L = 1 if phase == "decode" else PREFILL
    N = config.hidden_size
    yield f"[1,{L},{N}] x layer_scalar", lambda: (_rand((1, L, N)), _rand((N,)) + 1, _rand((1, L, N)), _rand((1,)), EPS)
    # As the model calls it: the next sub-block's norm from the same pass.
    yield f"[1,{L},{N}] then norm", lambda: (_rand((1, L, N)), _rand((N,)) + 1, _rand((1, L, N)), None, EPS, _rand((N,)) + 1)
    if config.enable_moe_block:  # the post-attention block: the dense MLP's, the router's and the experts' norms
        yield f"[1,{L},{N}] then 3 norms", lambda: (_rand((1, L, N)), _rand((N,)) + 1, _rand((1, L, N)), None, EPS,
                                                    tuple(_rand((N,)) + 1 for _ in range(3)))


def bench_ple_inputs(config, phase):
    P = config.hidden_size_per_layer_input
    if not P:
        return
    L, n = (1 if phase == "decode" else PREFILL), config.num_hidden_layers
    yield f"[1,{L},{n}*{P}]", lambda: (_rand((1, L, n * P), 0.05), _rand((1, L, n * P), 30.0), _rand((P,)) + 1,
                                       config.hidden_size, EPS)


def bench_gelu_gate(config, phase):
    L = 1 if phase == "decode" else PREFILL
    I = _layer(config, "sliding_attention").intermediate_size
    # As the model calls it: the fused gate|up output (its halves); PLE: one layer's columns.
    yield f"mlp halves [1,{L},{I}]", lambda: (_rand((1, L, 2 * I)),)
    P, n = config.hidden_size_per_layer_input, config.num_hidden_layers
    if P:
        yield f"ple gate [1,{L},{P}]", lambda: (_rand((1, L, P)), _rand((1, L, n * P)), n // 2 * P)


def bench_decode_attention(config, phase):
    if phase != "decode":
        return  # prefill blocks (L > 8) take prompt_attention
    for kind in ("sliding_attention", "full_attention"):
        layer = _layer(config, kind)
        D, Hkv, Hq = layer.head_dim, layer.num_kv_heads, config.num_attention_heads
        if kind == "sliding_attention":
            # A wrapped ring: every slot held, the boolean mask hides the stale headroom slots.
            S = layer.sliding_window + DEFAULT_SLIDING_HEADROOM
            mask = mx.arange(S)[None, None, None, :] >= DEFAULT_SLIDING_HEADROOM
        else:
            S, mask = CONTEXT, None
        scale = D**-0.25
        make = lambda: (_rand((1, Hq, 1, D), scale), _rand((1, Hkv, S, D), scale), _rand((1, Hkv, S, D)), mask)  # noqa: E731,B023
        yield f"{kind.split('_')[0]} q[1,{Hq},1,{D}] kv[1,{Hkv},{S},{D}]", make


def bench_prompt_attention(config, phase):
    if phase != "prefill":
        return  # decode takes decode_attention
    for L in (128, PREFILL):  # time to the first token at p=128, then a whole chunk
        for kind in ("sliding_attention", "full_attention"):
            layer = _layer(config, kind)
            D, Hkv, Hq = layer.head_dim, layer.num_kv_heads, config.num_attention_heads
            # A first chunk's mask as the model's caches make it (a sliding layer's is boolean).
            sliding = kind == "sliding_attention"
            cache = SlidingKVCache(layer.sliding_window, DEFAULT_SLIDING_HEADROOM) if sliding else KVCache()
            mask = cache.make_mask(L)
            scale = D**-0.25
            make = lambda: (_rand((1, Hq, L, D), scale), _rand((1, Hkv, L, D), scale), _rand((1, Hkv, L, D)), mask)  # noqa: E731,B023
            yield f"{kind.split('_')[0]} q[1,{Hq},{L},{D}] kv[1,{Hkv},{L},{D}]", make


def bench_qmv(config, phase):
    if phase != "decode":
        return  # qmv serves decode only; prompt chunks take MLX's quantized_matmul or a dequantized GEMM
    layer, hidden = _layer(config, "sliding_attention"), config.hidden_size
    qkv = (config.num_attention_heads + 2 * layer.num_kv_heads) * layer.head_dim
    I = layer.intermediate_size
    for label, K, N, bits in (("q|k|v", hidden, qkv, 4), ("gate|up", hidden, 2 * I, 4), ("down", I, hidden, 4),
                              ("gate|up", hidden, 2 * I, 8), ("lm head", hidden, config.vocab_size, 4)):
        make = lambda: (_rand((1, 1, K)), *mx.quantize(_rand((N, K), 0.02), group_size=64, bits=bits), 64, bits)  # noqa: E731,B023
        yield f"{label} {bits}-bit [{K}]x[{N},{K}]", make


def bench_qmm(config, phase):
    if phase != "prefill":
        return  # prompt chunks only; decode takes qmv
    layer, hidden = _layer(config, "sliding_attention"), config.hidden_size
    heads = config.num_attention_heads * layer.head_dim
    qkv = heads + 2 * layer.num_kv_heads * layer.head_dim
    I = layer.intermediate_size
    for L in (128, PREFILL):  # time to the first token at p=128, then a whole chunk
        for label, K, N, bits in (("q|k|v", hidden, qkv, 4), ("o", heads, hidden, 4), ("gate|up", hidden, 2 * I, 4),
                                  ("down", I, hidden, 4), ("gate|up", hidden, 2 * I, 8)):
            make = lambda: (_rand((1, L, K)), *mx.quantize(_rand((N, K), 0.02), group_size=64, bits=bits), 64, bits)  # noqa: E731,B023
            yield f"{label} {bits}-bit [{L},{K}]x[{N},{K}]", make


def bench_gated_qmv(config, phase):
    if phase != "decode":
        return  # decode only; prompt chunks take gelu_gate and the projection's own product
    I, hidden = _layer(config, "sliding_attention").intermediate_size, config.hidden_size
    cases = [("down", I, hidden, 16), ("down", I, hidden, 4)]
    if config.hidden_size_per_layer_input:
        cases.append(("PLE projection", config.hidden_size_per_layer_input, hidden, 16))
    for label, K, N, bits in cases:
        weight = lambda: _rand((N, K), 0.02)  # noqa: E731,B023
        operands = (lambda: (weight(), None, None, 64, 16)) if bits == 16 else (  # noqa: E731
            lambda: (*mx.quantize(weight(), group_size=64, bits=bits), 64, bits))  # noqa: B023
        make = lambda: (_rand((1, 1, 2 * K)), None, 0, *operands())  # noqa: E731,B023
        yield f"{label} {bits}-bit gate|up [{2 * K}]x[{N},{K}]", make


def bench_moe_norm_residual(config, phase):
    if not config.enable_moe_block:
        return
    L, N, k = (1 if phase == "decode" else PREFILL), config.hidden_size, config.top_k_experts
    weights = lambda: mx.softmax(_rand((1, L, k)).astype(mx.float32), axis=-1)  # noqa: E731
    yield f"dense [1,{L},{N}] experts [1,{L},{k},1,{N}] then norm", lambda: (
        _rand((1, L, N)), _rand((1, L, k, 1, N)), weights(), _rand((N,)) + 1, _rand((N,)) + 1, _rand((N,)) + 1,
        _rand((1, L, N)), _rand((1,)), EPS, _rand((N,)) + 1)


def bench_moe_router(config, phase):
    if not config.enable_moe_block:
        return
    L, E = (1 if phase == "decode" else PREFILL), config.num_experts
    yield f"logits [1,{L},{E}] top {config.top_k_experts}", lambda: (_rand((1, L, E), 3.0), _rand((E,)) + 1,
                                                                      config.top_k_experts, config.hidden_size**-0.5)


BENCHES = {
    "rope_norm": (bench_rope_norm, rope_norm, rope_norm_ref),
    "ple_inputs": (bench_ple_inputs, ple_inputs, ple_inputs_ref),
    "norm_residual": (bench_norm_residual, norm_residual, norm_residual_ref),
    "gelu_gate": (bench_gelu_gate, gelu_gate, gelu_gate_ref),
    "decode_attention": (bench_decode_attention, decode_attention, decode_attention_ref),
    "prompt_attention": (bench_prompt_attention, prompt_attention, prompt_attention_ref),
    "qmv": (bench_qmv, qmv, qmv_ref),
    "gated_qmv": (bench_gated_qmv, gated_qmv, gated_qmv_ref),
    "qmm": (bench_qmm, qmm, qmm_ref),
    "moe_router": (bench_moe_router, moe_router, moe_router_ref),
    "moe_norm_residual": (bench_moe_norm_residual, moe_norm_residual, moe_norm_residual_ref),
}


def _nbytes(args, out) -> int:
    arrays = [a for a in args if isinstance(a, mx.array)]
    outs = out if isinstance(out, tuple) else (out,)
    return sum(a.nbytes for a in arrays) + sum(o.nbytes for o in outs if o is not None)


def _compiled(fn, like):
    """`fn` through mx.compile, its non-array arguments (as in `like`) fixed as constants."""
    slots = [i for i, a in enumerate(like) if isinstance(a, mx.array)]

    def arrays_only(*arrays):
        args = list(like)
        for i, a in zip(slots, arrays):
            args[i] = a
        out = fn(*args)
        return tuple(o for o in out if o is not None) if isinstance(out, tuple) else out

    step = mx.compile(arrays_only)
    return lambda *args: step(*[args[i] for i in slots])


def time_us(fn, sets, batch=32, repeats=15) -> float:
    """Median microseconds per call over `repeats` batches of `batch` calls each."""
    for args in sets[:3]:
        mx.eval(fn(*args))
    samples = []
    for _ in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval([fn(*sets[i % len(sets)]) for i in range(batch)])
        mx.synchronize()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


def run(models, kernels, out_path=None):
    rows = []
    header = "| kernel | model | phase | shape | twin us | kernel us | speedup | kernel GB/s |"
    print(header + "\n|---|---|---|---|---:|---:|---:|---:|", flush=True)
    for name in models:
        from configs import MODELS

        config = from_hf_config(MODELS[name])
        for kernel_name in kernels:
            cases, kernel, twin = BENCHES[kernel_name]
            for phase in ("decode", "prefill"):
                for shape, make in cases(config, phase):
                    first = make()
                    mx.eval([a for a in first if isinstance(a, mx.array)])
                    per_set = _nbytes(first, kernel(*first))
                    sets = [first] + [make() for _ in range(min(15, L2_BYTES // max(per_set, 1)))]
                    mx.eval([[a for a in s if isinstance(a, mx.array)] for s in sets])
                    # Decode runs inside the compiled step, so time both compiled there.
                    fns = (_compiled(twin, first), _compiled(kernel, first)) if phase == "decode" else (twin, kernel)
                    t_twin, t_kernel = time_us(fns[0], sets), time_us(fns[1], sets)
                    row = (f"| `{kernel_name}` | {name} | {phase} | {shape} | {t_twin:.1f} | {t_kernel:.1f} | "
                           f"{t_twin / t_kernel:.2f}x | {per_set / t_kernel / 1e3:.0f} |")
                    print(row, flush=True)
                    rows.append(row)
    if out_path:
        Path(out_path).write_text(header + "\n|---|---|---|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")


def main():
    global CONTEXT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--kernels", default=",".join(BENCHES))
    parser.add_argument("--context", type=int, default=CONTEXT, help="decode: tokens in a full layer's cache")
    parser.add_argument("--out")
    args = parser.parse_args()
    CONTEXT = args.context
    if not (mx.metal.is_available() or mx.cuda.is_available()):
        sys.exit("bench/kernels.py needs MLX's Metal or CUDA back end (kernels do not run on CPU)")
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    run(args.models.split(","), args.kernels.split(","), args.out)


if __name__ == "__main__":
    main()
