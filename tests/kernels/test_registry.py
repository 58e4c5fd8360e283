"""Every kernel is complete (CPU; never skipped): each `metal/<name>.metal` has a wrapper module
`mlx_gemma4.kernels.<name>` with `<name>` and its twin `<name>_ref` (same signature, twin
defined above the kernel), a parity test file and a row in bench/kernels.py; the catalogue names it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_gemma4 import kernels
from mlx_gemma4.kernels._source import bodies, metal_files

ROOT = Path(__file__).resolve().parents[2]
NAMES = metal_files()


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_exist():
    assert {"rope_norm", "ple_inputs", "norm_residual", "decode_attention"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_is_complete(name):
    module = importlib.import_module(f"mlx_gemma4.kernels.{name}")
    kernel, twin = getattr(module, name), getattr(module, f"{name}_ref")
    assert inspect.signature(kernel) == inspect.signature(twin)
    assert inspect.getsourcelines(twin)[1] < inspect.getsourcelines(kernel)[1], "the twin sits above the kernel"
    assert bodies(name), f"metal/{name}.metal has no `// @kernel` body"
    assert (ROOT / "tests" / "kernels" / f"test_{name}.py").is_file()
    assert name in load_bench().BENCHES
    assert f"`{name}`" in (ROOT / "metal" / "README.md").read_text()


def test_selection_is_kernels_or_twins_and_env_switches_it_off(monkeypatch):
    monkeypatch.delenv("MLX_GEMMA4_KERNELS", raising=False)
    assert kernels.select_kernels(False) is kernels.TWINS and kernels.select_kernels(True) is kernels.KERNELS
    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "all")
    assert kernels.select_kernels(True) is kernels.ALL_KERNELS
    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "0")
    assert kernels.select_kernels() is kernels.TWINS
    if kernels.gpu_backend() is None:  # CPU: twins whatever the variable says
        monkeypatch.setenv("MLX_GEMMA4_KERNELS", "1")
        assert kernels.select_kernels() is kernels.TWINS


def test_shim_is_cuda_only_and_bodies_stay_metal():
    for name in NAMES:
        text = (ROOT / "metal" / f"{name}.metal").read_text()
        for cuda_only in ("__shared__", "__syncthreads", "threadIdx", "blockIdx", "__device__", "__shfl"):
            assert cuda_only not in text, f"{name}.metal uses CUDA's {cuda_only}: write Metal, the shim maps it"


@pytest.mark.parametrize("next_norms", [0, 1, 3])
def test_norm_residual_declares_only_the_next_norms_asked_for(monkeypatch, next_norms):
    """Each declared output costs the host time on every call, so a launch declares only the
    next norms it writes; the body's `#if NEXT_NORMS` parts follow a #define before it, and
    the define names the kernel (MLX caches compiled kernels by name)."""
    import mlx.core as mx

    from mlx_gemma4.kernels import _source, norm_residual

    built = []

    def record(**spec):
        built.append(spec)
        return lambda inputs, output_shapes, output_dtypes, **launch: [mx.zeros(s, d) for s, d in
                                                                        zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(_source, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(mx.fast, "cuda_kernel", record)
    _source.build.cache_clear()
    try:
        x = mx.ones((1, 2, 64))
        weights = tuple(mx.ones((64,)) for _ in range(next_norms))
        out = norm_residual(x, x[0, 0], x, None, 1e-6, weights[0] if next_norms == 1 else (weights or None))
    finally:
        _source.build.cache_clear()
    (spec,) = built
    assert spec["output_names"] == ["out", "normed", "normed_2", "normed_3"][: 1 + next_norms]
    assert spec["input_names"] == ["x", "w", "residual", "scale", *["next_w", "next_w_2", "next_w_3"][:next_norms],
                                   "params"]
    assert spec["source"].startswith(f"#define NEXT_NORMS {next_norms}\n")
    assert spec["name"] == f"gemma4_norm_residual_next_norms{next_norms}"
    assert len(out if next_norms else (out,)) == 1 + next_norms


class RecordingBuild:
    """Stands in for `_source.build` (CPU): records each launch's declared inputs and outputs and
    returns zeros of the asked shapes."""

    def __init__(self):
        self.launches = []

    def __call__(self, file, body, inputs, outputs, contiguous=True, defines=()):
        def launch(inputs: list, output_shapes, output_dtypes, **_):
            self.launches.append((declared_inputs, outputs, [a.shape for a in inputs]))
            return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
        declared_inputs = inputs
        return launch


def test_a_launch_declares_no_output_it_leaves_unread(monkeypatch):
    """Each output costs MLX's host an allocation a call (bench/host_cost.py): a KV-shared layer's
    rope_norm writes queries only, and the fused attention's split scratch is a persistent input."""
    from mlx_gemma4.config import RopeConfig
    from mlx_gemma4.rope import LayerRoPE

    rope_norm = importlib.import_module("mlx_gemma4.kernels.rope_norm")
    decode_attention = importlib.import_module("mlx_gemma4.kernels.decode_attention")

    recording = RecordingBuild()
    monkeypatch.setattr(rope_norm, "build", recording)
    monkeypatch.setattr(decode_attention, "build", recording)
    rope = LayerRoPE(RopeConfig("default", 10_000.0, 16), 16)
    weight = mx.ones((16,))
    queries, keys, values = rope_norm.rope_norm(mx.zeros((1, 1, 8 * 16)), weight, None, 3, rope, 1e-6, 0)
    assert recording.launches[-1][1] == ("queries",) and queries.shape == (1, 8, 1, 16) and keys is values is None
    rope_norm.rope_norm(mx.zeros((1, 1, 12 * 16)), weight, weight, 3, rope, 1e-6, 2)
    assert recording.launches[-1][1] == ("queries", "keys", "values")

    q, kv = mx.zeros((1, 8, 1, 16)), mx.zeros((1, 2, 40, 16))
    decode_attention.merged_splits_attention(q, kv, kv, None, fused=True)
    inputs, outputs, shapes = recording.launches[-1]
    assert outputs == ("out",) and inputs[-2:] == ("part_acc", "part_ml")
    splits = decode_attention._most_splits(8)
    assert shapes[-2:] == [(8 * splits * 16,), (8 * splits * 2,)]
    decode_attention.merged_splits_attention(q, kv, kv, None, fused=False)
    assert recording.launches[-2][1] == ("part_acc", "part_ml") and recording.launches[-1][1] == ("out",)
