"""Reads kernel bodies from the `mlx_gemma4.metal` package and builds them for the back end.

A `metal/<name>.metal` file holds one or more bodies, each after a `// @kernel <body name>`
line; text before the first marker is commentary. On Metal a body compiles through
`mx.fast.metal_kernel` with `common.h` as header; on CUDA through `mx.fast.cuda_kernel` with
`cuda_compat.h` + `common.h` (the shim maps Metal's vocabulary onto CUDA).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

_MARKER = re.compile(r"^// @kernel (\w+)\s*$", re.MULTILINE)


def gpu_backend() -> str | None:
    """"metal", "cuda", or None when MLX has no GPU back end here."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def last_threadgroup_merges() -> bool:
    """Whether a launch's threadgroups may leave their results for the last one to finish, which
    merges them (cuda_compat.h's arrive_last): on CUDA. Metal's device-scope fences are untested
    here, so there the merge stays a launch of its own."""
    return gpu_backend() == "cuda"


@functools.cache
def runs_mma_tiles() -> bool:
    """Whether qmm's tensor-core tiles run here: CUDA from compute capability 8.0 (the shim's
    ldmatrix and bfloat16 mma.sync). qmm's Metal build (simdgroup matrices) is unmeasured, against
    MLX's tuned Metal kernels, so there MLX's own product stays."""
    return gpu_backend() == "cuda" and mx.device_info().get("compute_capability_major", 0) >= 8


@functools.cache
def multiprocessors() -> int:
    """The CUDA GPU's multiprocessors (MLX's device_info leaves them out), from the driver; 0
    where there is no CUDA driver to ask."""
    count = ctypes.c_int()
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    attribute = 16  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    if driver.cuInit(0) != 0 or driver.cuDeviceGetAttribute(ctypes.byref(count), attribute, 0) != 0:
        return 0
    return count.value


def kernels_enabled() -> bool:
    """Custom kernels run when a GPU back end exists and MLX_GEMMA4_KERNELS is not "0"."""
    return gpu_backend() is not None and os.environ.get("MLX_GEMMA4_KERNELS", "1") != "0"


_COMMENT_LINE = re.compile(r"^\s*//.*\n", re.MULTILINE)


def _read(filename: str) -> str:
    return resources.files("mlx_gemma4.metal").joinpath(filename).read_text()


def _strip(source: str) -> str:
    # MLX rebuilds the kernel's source string on every call: a shorter string is cheaper.
    return _COMMENT_LINE.sub("", source)


def metal_files() -> list[str]:
    """Kernel names: one per `metal/<name>.metal`."""
    names = [p.name for p in resources.files("mlx_gemma4.metal").iterdir()]
    return sorted(n[: -len(".metal")] for n in names if n.endswith(".metal"))


@functools.cache
def bodies(name: str) -> dict[str, str]:
    """The kernel bodies of `metal/<name>.metal`, by body name."""
    parts = _MARKER.split(_read(f"{name}.metal"))
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@functools.cache
def build(file: str, body: str, inputs: tuple[str, ...], outputs: tuple[str, ...], contiguous: bool = True,
          defines: tuple[tuple[str, int], ...] = ()):
    """The compiled-on-first-call kernel object for one body of `metal/<file>.metal`.

    `defines` become `#define NAME VALUE` lines before the body, for parts that name inputs or
    outputs only some builds declare (`#if NAME ...`); they name the kernel too, since MLX
    caches compiled kernels by name."""
    source = "".join(f"#define {key} {value}\n" for key, value in defines) + _strip(bodies(file)[body])
    name = f"gemma4_{body}" + "".join(f"_{key.lower()}{value}" for key, value in defines)
    return compile_source(name, source, inputs, outputs, contiguous)


def compile_source(name: str, source: str, inputs: tuple[str, ...], outputs: tuple[str, ...], contiguous: bool = True):
    """A kernel object for a body written in Metal's vocabulary (common.h's helpers in scope)."""
    backend = gpu_backend()
    if backend == "cuda":
        return mx.fast.cuda_kernel(
            name=name, input_names=list(inputs), output_names=list(outputs), source=_included_body(source, inputs),
            header=_cuda_header(), ensure_row_contiguous=contiguous,
        )
    if backend == "metal":
        return mx.fast.metal_kernel(
            name=name, input_names=list(inputs), output_names=list(outputs), source=source,
            header=_strip(_read("common.h")), ensure_row_contiguous=contiguous,
        )
    raise RuntimeError("custom kernels need MLX's Metal or CUDA back end; use the `_ref` twin on CPU")


# MLX's CUDA back end hashes a custom kernel's whole source (header and body) at every launch to
# name its module: 20% of E2B's decode host time with the text inline. An #include line is short.
def _cuda_source_dir() -> Path:
    """Where CUDA kernel texts go to be included, each in a file named after its content."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_gemma4" / "cuda"


def _cuda_include(text: str) -> str:
    """An #include line for `text`, written once to _cuda_source_dir(); `text` itself where that
    cannot be written. The file's name is its content's hash, so MLX's caches, keyed by source,
    never serve a stale build."""
    path = _cuda_source_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.cuh"
    if '"' in str(path):
        return text
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_text(text)
            os.replace(partial, path)  # whole or absent, for processes building at once
    except OSError:
        return text
    return f'#include "{path}"\n'


@functools.cache
def _cuda_header() -> str:
    """The shim and common.h, one include for every kernel of the process. They go in `header`,
    after MLX's own includes, so the shim's macros never reach MLX code."""
    return _cuda_include(_strip(_read("cuda_compat.h") + _read("common.h")))


def _included_body(source: str, inputs: tuple[str, ...]) -> str:
    """`source` behind an include. MLX passes an input's shape, strides or ndim only where the
    source names them, so the names the body uses stay visible in a comment."""
    named = [f"{n}{suffix}" for n in inputs for suffix in ("_shape", "_strides", "_ndim") if f"{n}{suffix}" in source]
    return _cuda_include(source) + (f"// {' '.join(named)}\n" if named else "")


# MLX's CUDA allocator serves arrays of up to 8 bytes from one shared pool of managed memory,
# which the host writes too (each decode step's positions): a kernel that reads from it can wait
# for the page to migrate. Kernel parameters are padded past it.
POOLED_MAX_BYTES = 8


def parameter_array(values, dtype) -> mx.array:
    """`values` as a 1-D array, zero-padded past POOLED_MAX_BYTES (kernels read the leading ones)."""
    values = list(values)
    room = POOLED_MAX_BYTES // dtype.size + 1
    return mx.array(values + [0] * max(0, room - len(values)), dtype=dtype)


class _SharedBuffers:
    """The arrival counters and scratch arrays that one forward pass's launches share, by size."""

    def __init__(self, traced: bool):
        self.traced = traced
        self.arrays: dict[tuple[int, str], mx.array] = {}


_shared: _SharedBuffers | None = None


@contextlib.contextmanager
def shared_launch_buffers(traced: bool = False):
    """Inside it, launches share their arrival counters and scratch, as the launches of one
    forward pass never overlap: each waits on the one before through the residual stream.
    Outside it each launch takes its own. Two passes evaluated together run their launches at
    once on CUDA, where a shared counter would count both and stay wrong for the process.
    `traced`: the pass is being traced by mx.compile; its arrays are then made from host data,
    constants that every replay of the graph reuses at no cost. A nested call joins the open one."""
    global _shared
    if _shared is not None:
        yield
        return
    _shared = _SharedBuffers(traced)
    try:
        yield
    finally:
        _shared = None


def _launch_buffer(kind: str, size: int, make) -> mx.array:
    if _shared is None:
        return make()
    key = (size, kind)
    if key not in _shared.arrays:
        _shared.arrays[key] = make()
    return _shared.arrays[key]


def arrival_counters(count: int) -> mx.array:
    """`count` counters for arrive_last, 0 at each launch: the last threadgroup resets its own,
    for the next launch that shares them (shared_launch_buffers). From host data, so a trace
    captures them as a constant."""
    return _launch_buffer("counters", count, lambda: parameter_array([0] * count, mx.uint32))


def scratch(size: int) -> mx.array:
    """`size` float32 values that a launch writes and reads back through a cast (MLX sees an
    input: an output would cost the host an allocation a call), shared as arrival_counters are."""
    if _shared is not None and _shared.traced:
        return _launch_buffer("scratch", size, lambda: mx.array(np.zeros(size, np.float32)))
    return _launch_buffer("scratch", size, lambda: mx.zeros((size,), mx.float32))


@functools.lru_cache(maxsize=64)
def scalars(*values: float) -> mx.array:
    """A small float32 parameter array (eps, scales), made once per distinct set of values."""
    return parameter_array(values, mx.float32)


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
