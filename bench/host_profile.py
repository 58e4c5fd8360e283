"""Where the host's time goes while we decode: native stacks of the Python thread, sampled.

    python bench/host_profile.py --model e2b --quant bf16 [--runs 4] [--tokens 512] \
        [--callers _Hash_bytes,malloc_async] [--children CustomKernel::eval_gpu,Matmul::eval_gpu]

Decode is bound by the host on the lent GPU machines, and they have no perf, gdb or py-spy.
This compiles a small sampler with the C compiler (Linux, glibc): a timer signals the decoding
thread every `--period-us` of wall time and records its stack (glibc's backtrace), through
MLX's C++ code, the CUDA driver and Python. Symbols come from `nm` on each library. Printed:
the share of samples by leaf library and leaf function, the share of samples each function is
on the stack (inclusive), what calls each `--callers` function and what each `--children`
function calls (substrings of symbol names). libc's inner functions go by the nearest exported
name (a wait in pthread_cond_wait reads __nptl_death_event). Session 24 found MLX's CUDA back
end hashing each custom kernel's whole source at every launch this way.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import functools
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
from against_commit import decode_tok_s  # noqa: E402
from compare_mlx_lm import build_mlx_gemma4  # noqa: E402
from configs import MODELS  # noqa: E402

import mlx_gemma4  # noqa: E402

_SAMPLER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define MAX_SAMPLES 60000
#define DEPTH 48
static void* stacks[MAX_SAMPLES][DEPTH];
static int depths[MAX_SAMPLES];
static volatile int taken = 0;
static timer_t timer;
static void on_tick(int signal) {
  int i = taken;
  if (i < MAX_SAMPLES) { depths[i] = backtrace(stacks[i], DEPTH); taken = i + 1; }
}
int sampler_start(int period_us) {
  void* warm[4]; backtrace(warm, 4);  /* loads the unwinder outside the signal handler */
  struct sigaction action; memset(&action, 0, sizeof action);
  action.sa_handler = on_tick; action.sa_flags = SA_RESTART; sigemptyset(&action.sa_mask);
  sigaction(SIGPROF, &action, NULL);
  struct sigevent event; memset(&event, 0, sizeof event);
  event.sigev_notify = SIGEV_THREAD_ID; event.sigev_signo = SIGPROF;
  event._sigev_un._tid = syscall(SYS_gettid);
  if (timer_create(CLOCK_MONOTONIC, &event, &timer)) return -1;
  struct itimerspec every; every.it_interval.tv_sec = 0; every.it_interval.tv_nsec = period_us * 1000L;
  every.it_value = every.it_interval;
  return timer_settime(timer, 0, &every, NULL);
}
int sampler_stop(const char* path) {
  timer_delete(timer);
  FILE* out = fopen(path, "w");
  for (int i = 0; i < taken; i++) {
    for (int d = 2; d < depths[i]; d++) {  /* past the handler and the signal frame */
      Dl_info info;
      if (dladdr(stacks[i][d], &info) && info.dli_fname)
        fprintf(out, "%s+%lx ", info.dli_fname, (unsigned long)((char*)stacks[i][d] - (char*)info.dli_fbase));
    }
    fprintf(out, "\n");
  }
  fclose(out);
  return taken;
}
"""


def build_sampler(directory: Path) -> ctypes.CDLL:
    (directory / "sampler.c").write_text(_SAMPLER)
    library = directory / "sampler.so"
    try:
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(directory / "sampler.c")],
                       check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"host_profile needs a C compiler (cc) and glibc: {error}") from None
    return ctypes.CDLL(str(library))


@functools.cache
def symbols(library: str) -> tuple[list[int], list[str]]:
    """(sorted start addresses, demangled names) of a library's functions, full table first."""
    for flags in (["-C", "--defined-only"], ["-D", "-C", "--defined-only"]):
        listing = subprocess.run(["nm", *flags, library], capture_output=True, text=True).stdout
        found = sorted((int(address, 16), name) for address, kind, name in
                       (row.split(" ", 2) for row in listing.splitlines() if row.count(" ") >= 2)
                       if kind in "tTwWiI")
        if len(found) > 100:
            break
    return [a for a, _ in found], [n for _, n in found]


@functools.cache
def frame_name(frame: str) -> str:
    library, offset = frame.rsplit("+", 1)
    addresses, names = symbols(library)
    i = bisect.bisect_right(addresses, int(offset, 16)) - 1
    return f"{Path(library).name}:{names[i] if i >= 0 else '?'}"[:160]


def report(stacks: list[list[str]], callers: list[str], children: list[str], top: int):
    total = len(stacks)
    share = lambda count: f"{100 * count / total:6.1f}%"  # noqa: E731
    leaf_library, leaf, inclusive = collections.Counter(), collections.Counter(), collections.Counter()
    for stack in stacks:
        leaf_library[stack[0].split(":", 1)[0]] += 1
        leaf[stack[0]] += 1
        inclusive.update(set(stack))
    print(f"{total} samples\n## leaf library")
    for name, count in leaf_library.most_common(10):
        print(share(count), name)
    print("## leaf function")
    for name, count in leaf.most_common(top):
        print(share(count), name)
    print("## on the stack")
    for name, count in inclusive.most_common(2 * top):
        print(share(count), name)
    for heading, targets, neighbours in (("called by", callers, lambda s, i: s[i + 1:i + 4]),
                                         ("calls", children, lambda s, i: s[max(0, i - 2):i][::-1])):
        for target in targets:
            chains = collections.Counter()
            for stack in stacks:
                at = next((i for i, name in enumerate(stack) if target in name), None)
                if at is not None:
                    chains[" | ".join(neighbours(stack, at)) or "(itself)"] += 1
            print(f"## {target} {heading}")
            for chain, count in chains.most_common(15):
                print(share(count), chain)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e2b", choices=sorted(MODELS))
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--period-us", type=int, default=250)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--callers", default="", help="comma-separated substrings of function names")
    parser.add_argument("--children", default="", help="comma-separated substrings of function names")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        sampler = build_sampler(Path(scratch))
        model = build_mlx_gemma4(MODELS[args.model], 0, args.quant)
        prompt = mx.array([5] * 64)
        for _ in range(3):  # traces, compiles and allocates
            decode_tok_s(mlx_gemma4, model, prompt, 64)
        sampler.sampler_start(args.period_us)
        rates = [decode_tok_s(mlx_gemma4, model, prompt, args.tokens) for _ in range(args.runs)]
        sampler.sampler_stop(str(Path(scratch) / "stacks.txt").encode())
        stacks = [[frame_name(f) for f in line.split()] for line in (Path(scratch) / "stacks.txt").read_text().splitlines()]
    print(f"# {args.model} {args.quant}: decode tok/s while sampled {[round(r, 1) for r in rates]}")
    report([s for s in stacks if s], [c for c in args.callers.split(",") if c], [c for c in args.children.split(",") if c],
           args.top)


if __name__ == "__main__":
    main()
