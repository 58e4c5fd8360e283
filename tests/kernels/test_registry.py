"""Every kernel is complete (CPU; never skipped): each `metal/<name>.metal` has a wrapper module
`mlx_gemma4.kernels.<name>` with `<name>` and its twin `<name>_ref` (same signature, twin
defined above the kernel), a parity test file and a row in bench/kernels.py; the catalogue names it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from functools import partial
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


def included(text: str) -> str:
    """`text` with each #include line replaced by the file it names, as NVRTC reads it."""
    return re.sub(r'#include "([^"]+)"\n', lambda line: Path(line.group(1)).read_text(), text)


@pytest.fixture
def cuda_builds(monkeypatch, tmp_path):
    """Kernels built as on CUDA, on any machine: the specs handed to `mx.fast.cuda_kernel`, each
    with the arrays of its launches ("launched"); a launch returns zeros of its output shapes.
    "source" and "header" hold the texts the compiler reads, "sent_source" and "sent_header" what
    MLX was handed."""
    from mlx_gemma4.kernels import _source

    built = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def record(**spec):
        spec["sent_source"], spec["sent_header"] = spec["source"], spec["header"]
        spec["source"], spec["header"] = included(spec["source"]), included(spec["header"])
        spec["launched"] = []
        built.append(spec)

        def launch(inputs, output_shapes, output_dtypes, **_):
            spec["launched"].append(inputs)
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return launch

    monkeypatch.setattr(_source, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(mx.fast, "cuda_kernel", record)
    _source.build.cache_clear()
    _source._cuda_header.cache_clear()  # its file lies under each test's XDG_CACHE_HOME
    yield built
    _source.build.cache_clear()
    _source._cuda_header.cache_clear()


@pytest.mark.parametrize("next_norms", [0, 1, 3])
def test_norm_residual_declares_only_the_next_norms_asked_for(cuda_builds, next_norms):
    """Each declared output costs the host time on every call (bench/host_cost.py: about 2.4 us
    on an H100), so a launch declares only the next norms it writes; the body's `#if NEXT_NORMS`
    parts follow a #define before it, and the define names the kernel (MLX caches compiled
    kernels by name)."""
    from mlx_gemma4.kernels import norm_residual

    x = mx.ones((1, 2, 64))
    weights = tuple(mx.ones((64,)) for _ in range(next_norms))
    out = norm_residual(x, x[0, 0], x, None, 1e-6, weights[0] if next_norms == 1 else (weights or None))
    (spec,) = cuda_builds
    assert spec["output_names"] == ["out", "normed", "normed_2", "normed_3"][: 1 + next_norms]
    assert spec["input_names"] == ["x", "w", "residual", "scale", *["next_w", "next_w_2", "next_w_3"][:next_norms],
                                   "params"]
    assert spec["source"].startswith(f"#define NEXT_NORMS {next_norms}\n")
    assert spec["name"] == f"gemma4_norm_residual_next_norms{next_norms}"
    assert len(out if next_norms else (out,)) == 1 + next_norms


@pytest.mark.parametrize("kv_heads", [0, 2])
def test_rope_norm_declares_keys_and_values_only_where_it_writes_them(cuda_builds, kv_heads):
    """A KV-shared layer (no kv heads) builds rope_norm with the queries output alone."""
    from mlx_gemma4.config import RopeConfig
    from mlx_gemma4.kernels import rope_norm
    from mlx_gemma4.rope import LayerRoPE

    weight = mx.ones((16,))
    rope = LayerRoPE(RopeConfig("default", 10_000.0, 16), 16)
    x = mx.zeros((1, 1, (8 + 2 * kv_heads) * 16))
    queries, keys, values = rope_norm(x, weight, weight if kv_heads else None, 3, rope, 1e-6, kv_heads)
    (spec,) = cuda_builds
    assert spec["output_names"] == ["queries", "keys", "values"][: 3 if kv_heads else 1]
    assert spec["source"].startswith(f"#define QUERIES_ONLY {int(not kv_heads)}\n")
    assert queries.shape == (1, 8, 1, 16)
    assert (keys is values is None) if not kv_heads else keys.shape == values.shape == (1, kv_heads, 1, 16)


def test_rope_norm_writes_a_decode_step_into_the_cache_buffers(cuda_builds, monkeypatch):
    """With `into` on CUDA, rope_norm takes the cache buffers and the slot as inputs and declares
    the queries output alone: no keys or values outputs, and no scatter after it in the graph."""
    from mlx_gemma4.config import RopeConfig
    from mlx_gemma4.kernels import rope_norm
    from mlx_gemma4.rope import LayerRoPE

    # The module, not the function the package exports under its name.
    monkeypatch.setattr(importlib.import_module("mlx_gemma4.kernels.rope_norm"), "gpu_backend", lambda: "cuda")
    weight = mx.ones((16,))
    rope = LayerRoPE(RopeConfig("default", 10_000.0, 16), 16)
    buffers = (mx.zeros((1, 2, 8, 16)), mx.zeros((1, 2, 8, 16)))
    slot = mx.array([3], dtype=mx.int32)
    queries, keys, values = rope_norm(mx.zeros((1, 1, 12 * 16)), weight, weight, 3, rope, 1e-6, 2, False,
                                      (*buffers, slot))
    (spec,) = cuda_builds
    assert spec["output_names"] == ["queries"]
    assert spec["input_names"][-3:] == ["k_cache", "v_cache", "slot"]
    assert "#define INTO_CACHE 1\n" in spec["source"]
    (inputs,) = spec["launched"]
    assert inputs[-3] is buffers[0] and inputs[-2] is buffers[1] and inputs[-1] is slot
    assert keys is buffers[0] and values is buffers[1] and queries.shape == (1, 8, 1, 16)


def launched_twice_in_and_out_of_one_pass(call):
    """call() twice inside one shared_launch_buffers scope, then twice outside it; the last result."""
    from mlx_gemma4.kernels._source import shared_launch_buffers

    with shared_launch_buffers():
        call()
        call()
    call()
    return call()


def assert_shared_in_one_pass_only(launched: list, count: int) -> None:
    """The last `count` inputs: the same arrays for two launches of one pass, new arrays for each
    launch outside one, every counter 0."""
    first, second, third, fourth = (inputs[-count:] for inputs in launched)
    assert all(a is b for a, b in zip(first, second))
    assert not any(a is b for a, b in zip(second + third, third + fourth))
    assert not any(counters.any().item() for counters in (first[0], third[0], fourth[0]))


@pytest.mark.parametrize("fused", [False, True])
def test_fused_attention_keeps_its_split_scratch_in_inputs(cuda_builds, fused):
    """FUSED_COMBINE writes out alone; the splits go to scratch inputs sized for the most splits
    its rows take, shared with the arrival counters by the launches of one forward pass."""
    from mlx_gemma4.kernels.decode_attention import _most_splits, merged_splits_attention

    q, kv = mx.zeros((1, 8, 1, 16)), mx.zeros((1, 2, 40, 16))
    launched_twice_in_and_out_of_one_pass(lambda: merged_splits_attention(q, kv, kv, None, fused))
    partial_pass = cuda_builds[0]
    splits = ["part_acc", "part_ml"]
    assert partial_pass["output_names"] == (["out"] if fused else splits)
    assert partial_pass["input_names"] == ["q", "k", "v", "mask"] + (["arrivals", *splits] if fused else [])
    if fused:
        room = 8 * _most_splits(8)
        assert [a.shape for a in partial_pass["launched"][0][-2:]] == [(room * 16,), (room * 2,)]
        assert_shared_in_one_pass_only(partial_pass["launched"], 3)
    else:
        assert cuda_builds[1]["input_names"] == splits and cuda_builds[1]["output_names"] == ["out"]


def test_cuda_builds_hand_mlx_include_lines_for_their_texts(cuda_builds, tmp_path):
    """MLX's CUDA back end hashes a kernel's whole source at every launch, so the shim, common.h
    and the body reach it as #include lines of files named after their content; the names of
    the shapes and strides a body reads stay in the source, where MLX looks for them."""
    from mlx_gemma4.kernels import _source
    from mlx_gemma4.kernels.decode_attention import merged_splits_attention

    q, kv = mx.zeros((1, 8, 1, 16)), mx.zeros((1, 2, 40, 16))
    merged_splits_attention(q, kv, kv, None, False)
    partial = cuda_builds[0]
    for sent, text in ((partial["sent_header"], partial["header"]), (partial["sent_source"], partial["source"])):
        (path,) = re.findall(r'#include "([^"]+)"', sent)
        # The path's length is pytest's (its numbered tmp dirs grow); the rest of the text is short.
        assert Path(path).parent == tmp_path / "mlx_gemma4" / "cuda" and len(sent) - len(path) < 200 < len(text)
    assert "arrive_last" in partial["header"] and "decode_attention" not in partial["header"]
    body = _source._strip(bodies("decode_attention")["decode_attention_partial"])
    assert body in partial["source"]
    read_shapes = {n + s for n in partial["input_names"] for s in ("_shape", "_strides", "_ndim") if n + s in body}
    assert read_shapes == {"q_shape", "q_strides", "k_shape", "k_strides", "v_strides", "mask_shape", "mask_strides"}
    assert all(name in partial["sent_source"] for name in read_shapes)


def test_cuda_builds_keep_their_texts_inline_where_the_cache_cannot_be_written(cuda_builds, tmp_path):
    from mlx_gemma4.kernels import _source, gelu_gate

    (tmp_path / "mlx_gemma4").write_text("a file where the cache directory would go")
    gelu_gate(mx.zeros((1, 1, 64)), mx.zeros((1, 1, 64)))
    (spec,) = cuda_builds
    assert "#include" not in spec["sent_header"] + spec["sent_source"]
    assert spec["sent_source"].startswith(_source._strip(bodies("gelu_gate")["gelu_gate"]))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("next_norms", [0, 1, 3])
def test_norm_residual_builds_leave_the_product_in_scratch_inputs(cuda_builds, gated, next_norms):
    """NORM_RESIDUAL declares the block's outputs alone (out, and a normed output per next norm):
    the product's rows go to a float32 scratch input sized for them, shared with the arrival
    counter by the launches of one forward pass."""
    from mlx_gemma4.kernels import gated_qmv_norm_residual, qmv_norm_residual

    x, w, vector = mx.zeros((1, 2, 2 * 64)), mx.zeros((48, 64), mx.bfloat16), mx.ones((48,))
    residual = mx.zeros((1, 2, 48))
    next_weight = {0: None, 1: vector}.get(next_norms, (vector,) * next_norms)
    if gated:
        call = partial(gated_qmv_norm_residual, x, None, 0, w, None, None, 0, 0, vector, residual, None, 1e-6,
                       next_weight)
    else:
        call = partial(qmv_norm_residual, x[..., :64], w, None, None, 0, 0, vector, residual, None, 1e-6, next_weight)
    out = launched_twice_in_and_out_of_one_pass(call)
    (spec,) = cuda_builds
    assert spec["output_names"] == ["out", "normed", "normed_2", "normed_3"][: 1 + next_norms]
    leading = ["x", "up", "up_column"] if gated else ["x"]
    assert spec["input_names"] == [*leading, "w", "scales", "biases", "residual", "norm_w", "scale",
                                   *["next_w", "next_w_2", "next_w_3"][:next_norms], "params", "arrivals", "projected"]
    defines = f"#define GATED {int(gated)}\n#define NORM_RESIDUAL 1\n#define NEXT_NORMS {next_norms}\n"
    assert spec["source"].startswith(defines)
    first = spec["launched"][0]
    assert first[-1].shape == (2 * 48,) and first[-1].dtype == mx.float32
    assert_shared_in_one_pass_only(spec["launched"], 2)
    assert (len(out) == 1 + next_norms) if next_norms else out.shape == (1, 2, 48)
