"""Parity bounds for kernel vs twin, per dtype, in one place: an output passes only if it is
within atol + rtol * |ref| everywhere AND its normalised MSE is under `nmse`.

Kernel and twin both compute in float32 and round to the storage dtype where the twin stores
an intermediate, so they mostly differ by an ulp of the output dtype; the bounds leave a few ulps.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.kernels import gpu_backend

DTYPES = [mx.float32, mx.float16, mx.bfloat16]

TOLERANCES = {
    # dtype: (atol, rtol, nmse). Test tensors are unit-scale, so outputs reach |x| ~ 8: atol is
    # 2 ulps there (an intermediate rounded one ulp apart in kernel and twin, e.g. a normed value
    # before RoPE, can land on a small output); NMSE then bounds the average error tightly.
    mx.float32: (2e-5, 2e-4, 1e-10),
    mx.float16: (1e-2, 1e-2, 1e-6),
    mx.bfloat16: (8e-2, 5e-2, 5e-5),
}

requires_gpu = pytest.mark.skipif(gpu_backend() is None, reason="no MLX GPU back end (Metal or CUDA) here")

# The largest errors seen, per (kernel, dtype): printed at the end of a GPU run (see conftest).
WORST: dict[tuple[str, str], tuple[float, float]] = {}


def assert_close(
    out: mx.array, ref: mx.array, dtype, label: str = "", extra_atol: float = 0.0, extra_nmse: float = 0.0
) -> None:
    """`extra_atol` / `extra_nmse`: room for the twin's own error against a float64 oracle,
    where it exceeds these bounds (MLX's RoPE angles at positions in the thousands)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    a = np.array(out.astype(mx.float32), dtype=np.float64)
    b = np.array(ref.astype(mx.float32), dtype=np.float64)
    assert np.isfinite(a).all(), f"{label}: non-finite output"
    atol, rtol, nmse_bound = TOLERANCES[dtype]
    atol += extra_atol
    nmse_bound += extra_nmse
    err = np.abs(a - b)
    nmse = float((err**2).sum() / max((b**2).sum(), 1e-30))
    key = (label.split("[")[0], str(dtype).split(".")[-1])
    worst = WORST.get(key, (0.0, 0.0))
    WORST[key] = (max(worst[0], float(err.max())), max(worst[1], nmse))
    excess = err - (atol + rtol * np.abs(b))
    assert excess.max() <= 0, f"{label}: max abs err {err.max():.3e} breaks atol {atol} + rtol {rtol} * |ref|"
    assert nmse <= nmse_bound, f"{label}: NMSE {nmse:.3e} > {nmse_bound}"


def random(shape, dtype, scale: float = 1.0, seed: int = 0) -> mx.array:
    return (mx.random.normal(shape, key=mx.random.key(seed)) * scale).astype(dtype)


def run_and_replayed(call, replayed: bool = True) -> list:
    """call()'s results: run plain, then (with `replayed`) traced by mx.compile and replayed
    twice. A traced graph keeps the arrival counters its trace made, so the replay reads what the
    first run of the graph left: they must be 0 again after each launch."""
    if not replayed:
        return [call()]
    traced = mx.compile(call)
    return [call(), traced(), traced()]
