"""Ours against an earlier version of ours, in ONE process on ONE set of random weights: decode
tok/s, the host's ms a decode step and time to the first token in interleaved trials, and the
graph nodes of each one's compiled decode step. Host-bound speed spreads widely between
processes on the lent GPU hosts, so a change is judged this way, not by two runs of
compare_mlx_lm.py.

    python bench/against_commit.py --base 7cbe15b --model e2b --quant bf16 [--trials 5]
    python bench/against_commit.py --base-dir DIR ...   # DIR: `git archive REV mlx_gemma4 metal convert` unpacked

The base is imported as the package `mlx_gemma4_base`: its files are laid out as the installed
package is (metal/ and convert/ inside it) and its kernels renamed, so that MLX's kernel cache
never hands one version's kernel to the other.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
from compare_mlx_lm import GROUP_SIZE, QUANT_BITS, random_hf_tensors  # noqa: E402
from configs import MODELS  # noqa: E402

import mlx_gemma4  # noqa: E402
from mlx_gemma4.config import from_hf_config  # noqa: E402
from mlx_gemma4.convert import convert_tensors  # noqa: E402

BASE = "mlx_gemma4_base"


def unpack(rev: str, into: Path) -> Path:
    """The files of `rev` that make the package, from this repository's git history."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "mlx_gemma4", "metal", "convert"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def import_base(tree: Path, workdir: Path):
    """Import the package in `tree` (a checkout's mlx_gemma4/, metal/ and convert/) as BASE."""
    package = workdir / BASE
    shutil.copytree(tree / "mlx_gemma4", package)
    for part in ("metal", "convert"):
        shutil.copytree(tree / part, package / part)
    source = package / "kernels" / "_source.py"
    text = source.read_text().replace('"mlx_gemma4.metal"', f'"{BASE}.metal"')
    source.write_text(text.replace('f"gemma4_{body}"', 'f"gemma4base_{body}"'))
    spec = importlib.util.spec_from_file_location(BASE, package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASE] = module
    spec.loader.exec_module(module)
    return module


def build(package, text: dict, tensors: dict, bits: int | None):
    """`package`'s model from converted tensors, as load_converted builds it."""
    config = importlib.import_module(f"{package.__name__}.config").from_hf_config(text)
    convert = importlib.import_module(f"{package.__name__}.convert")
    config = replace(config, quantization=convert.quantization_config(config, bits, GROUP_SIZE))
    return importlib.import_module(f"{package.__name__}.load").model_from_weights(config, dict(tensors))


def step_nodes(package, model) -> tuple[collections.Counter, int]:
    """Graph nodes of one compiled decode step after a 64-token prompt, by primitive, and the
    arrays they write (each output costs MLX's host an allocation: bench/host_cost.py)."""
    generate = importlib.import_module(f"{package.__name__}.generate")
    cache = model.make_cache()
    generate.prefill_only(model, mx.array([[5] * 64]), cache, 2048)
    step = generate.decode_step(model, cache)
    token = mx.array([[7]])
    mx.eval(step(token, cache))
    logits = step(token, cache)
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as dot:
        mx.export_to_dot(dot.name, logits, *[a for c in cache for a in (c.keys, c.values)])
        graph = Path(dot.name).read_text()
    mx.eval(logits)
    labels = dict(re.findall(r'\{ (\d+) \[label ="([^"]*)"', graph))
    # Edges leave a node for each array it writes: `ID -> "NAME"`.
    outputs = sum(source in labels for source in re.findall(r'^(\d+) -> "', graph, re.M))
    return collections.Counter(labels.values()), outputs


def decode_tok_s(package, model, prompt: mx.array, tokens: int) -> float:
    stamps = [time.perf_counter() for _ in package.generate_tokens(model, prompt, max_tokens=tokens, stop_ids=[])]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def step_host_ms(package, model, prompt: mx.array, steps: int = 48) -> float:
    """Median ms to build and hand over one decode step, one step at a time (no pipelining): the
    host's share of a step, which spreads far less between trials than tok/s does."""
    generate = importlib.import_module(f"{package.__name__}.generate")
    cache = model.make_cache()
    generate.prefill_only(model, prompt[None], cache, 2048)
    step = generate.decode_step(model, cache)
    token = mx.array([[7]])
    hosts = []
    for _ in range(steps + 8):  # the first steps trace and allocate
        start = time.perf_counter()
        token = mx.argmax(step(token, cache), axis=-1)[:, None]
        mx.async_eval(token)
        hosts.append(time.perf_counter() - start)
        mx.eval(token)
    return 1e3 * statistics.median(hosts[-steps:])


def ttft_ms(package, model, prompt: mx.array) -> float:
    prefill = importlib.import_module(f"{package.__name__}.generate").prefill
    start = time.perf_counter()
    mx.eval(mx.argmax(prefill(model, prompt[None], model.make_cache(), 2048), axis=-1))
    return 1e3 * (time.perf_counter() - start)


def interleaved(runs: dict, measure, trials: int) -> dict[str, list[float]]:
    """`measure(package, model)` per version, trials in a new random order each round."""
    values = collections.defaultdict(list)
    for _ in range(trials):
        for name in random.sample(list(runs), len(runs)):
            values[name].append(measure(*runs[name]))
    return values


def report(label: str, values: dict[str, list[float]], unit: str):
    medians = {name: statistics.median(v) for name, v in values.items()}
    trials = "; ".join(f"{name} [{', '.join(f'{x:.1f}' for x in v)}]" for name, v in values.items())
    print(f"| {label} | {medians['ours']:.1f} | {medians['base']:.1f} | {medians['ours'] / medians['base']:.3f} |"
          f" {unit}: {trials}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base", help="a git revision of this repository")
    where.add_argument("--base-dir", type=Path, help="a tree holding mlx_gemma4/, metal/ and convert/")
    parser.add_argument("--model", default="e2b", choices=sorted(MODELS))
    parser.add_argument("--quant", default="bf16", choices=sorted(QUANT_BITS))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--prompt-lengths", default="128,512", help="TTFT prompts; the decode prompt is 512 tokens")
    args = parser.parse_args()
    text, bits = MODELS[args.model], QUANT_BITS[args.quant]
    with tempfile.TemporaryDirectory() as workdir:
        tree = args.base_dir or unpack(args.base, Path(workdir))
        base = import_base(tree, Path(workdir) / "import")
        tensors = dict(convert_tensors(from_hf_config(text), random_hf_tensors(text, 0), dtype="bfloat16",
                                       quantize_bits=bits, group_size=GROUP_SIZE))
        runs = {"ours": (mlx_gemma4, build(mlx_gemma4, text, tensors, bits)),
                "base": (base, build(base, text, tensors, bits))}
        del tensors
        print(f"{args.model} {args.quant}, {mx.default_device()}, mlx {mx.__version__}, base {args.base or tree}")
        nodes = {name: step_nodes(*run) for name, run in runs.items()}
        for name, (counts, outputs) in nodes.items():
            print(f"{name}: {sum(counts.values())} nodes writing {outputs} arrays a decode step; "
                  + ", ".join(f"{kind} {n}" for kind, n in counts.most_common(8)))
        prompt = mx.random.randint(10, text["vocab_size"], (512,), key=mx.random.key(1)).astype(mx.int32)
        first = {name: list(package.generate_tokens(model, prompt, max_tokens=16, stop_ids=[]))
                 for name, (package, model) in runs.items()}
        print("same 16 greedy tokens:", first["ours"] == first["base"])
        print("| measure | ours | base | ours / base |\n|---|---:|---:|---:|")
        report(f"decode tok/s, {args.gen_tokens} after 512", interleaved(
            runs, lambda package, model: decode_tok_s(package, model, prompt, args.gen_tokens), args.trials), "tok/s")
        report("host ms a decode step, unpipelined", interleaved(
            runs, lambda package, model: step_host_ms(package, model, prompt), args.trials), "ms")
        for length in map(int, args.prompt_lengths.split(",")):
            ids = mx.random.randint(10, text["vocab_size"], (length,), key=mx.random.key(length)).astype(mx.int32)
            interleaved(runs, lambda package, model: ttft_ms(package, model, ids), 2)  # traces and compiles
            report(f"TTFT p={length} ms", interleaved(
                runs, lambda package, model: ttft_ms(package, model, ids), args.trials), "ms")  # noqa: B023


if __name__ == "__main__":
    main()
