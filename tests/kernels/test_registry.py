"""Every kernel is complete (CPU; never skipped): each `metal/<name>.metal` has a wrapper module
`mlx_gemma4.kernels.<name>` with `<name>` and its twin `<name>_ref` (same signature, twin
defined above the kernel), a parity test file and a row in bench/kernels.py; the catalogue names it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

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
