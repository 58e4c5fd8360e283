"""Side-by-side speed of mlx_gemma4 and mlx-lm on the same random-weight Gemma 4 checkpoint.

For each model and quantization, both runtimes get models made from one set of random bf16
Hugging Face weights, then run the same seeded prompts: prompt tok/s, time to first token,
greedy decode tok/s, peak memory and the decode bandwidth they achieve. The weights come from
a checkpoint on disk, or (for models too large for that) from a lazy stream built in memory.

    python bench/compare_mlx_lm.py --models e2b-mini,26b-a4b-mini --quant bf16,4bit
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes as mlx_lm_model_classes
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import quantize_model, save_config, save_model

import mlx_gemma4
from mlx_gemma4.config import from_hf_config
from mlx_gemma4.convert import convert_tensors, quantization_config
from mlx_gemma4.convert.quantize import PLE_TABLE_BITS, SENSITIVE_BITS, bits_for
from mlx_gemma4.convert.write import staged_directory
from mlx_gemma4.generate import prefill as mlx_gemma4_prefill
from mlx_gemma4.load import model_from_weights

from configs import MODELS, default_prompt_lengths  # bench/ is on sys.path when run as a script

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/mlx_gemma4_bench")
QUANT_BITS = {"bf16": None, "8bit": 8, "4bit": 4}
GROUP_SIZE = 64
# mlx-lm's quantization: "own" as mlx_lm.convert does it (its quant_predicate: the router at 8 bits,
# all else at --quant's), "ours" with our converter's per-layer bits, so both run the same model.
MLX_LM_RECIPES = ("own", "ours")
MLX_LM_MODULE_PREFIX = re.compile(r"^(language_model\.)?model\.")
SHARD_BYTES = 2 << 30  # 2 GiB shards: the writer holds one shard of random weights at a time
# The file path keeps a bf16 source, our bf16 copy and both runtimes' 8- and 4-bit copies, about
# 3.6x the source: within the GPU machine's 64 GB disk up to e4b (15 GB), not 26b-a4b (50 GB).
FILE_PATH_MAX_BF16_BYTES = 16e9
WEIGHT_STD = 0.02  # small enough that activations stay far from bf16 overflow over 60 layers
# Norm weights, layer scalars and router scales multiply activations: keep them near 1, not exactly 1.
SCALE_VECTOR = re.compile(r"(norm(_\d)?\.weight|layer_scalar|router\.scale|router\.per_expert_scale)$")
SANDWICH_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
MOE_NORMS = ("post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")
MIN_TOKEN_ID = 10  # random prompts skip the special ids at the bottom of the vocabulary
# Peak bandwidth of GPUs the roofline knows by name; others need --bandwidth-gbs.
GPU_BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0}
CUDA_FALLBACK_GBS = 3350.0  # H100 SXM HBM3
CPU_FALLBACK_GBS = 50.0  # a nominal server-CPU figure, not a measurement


# ---------------------------------------------------------------------------------------------
# Random Hugging Face checkpoint


def hf_tensor_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    """Gemma4ForCausalLM tensor names and shapes for a text config, in writing order."""
    hidden, num_layers = text["hidden_size"], text["num_hidden_layers"]
    heads, ple = text["num_attention_heads"], text.get("hidden_size_per_layer_input") or 0
    first_shared = num_layers - (text.get("num_kv_shared_layers") or 0)
    shapes = {"model.embed_tokens.weight": (text["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if ple:
        shapes["model.embed_tokens_per_layer.weight"] = (text["vocab_size_per_layer_input"], num_layers * ple)
        shapes["model.per_layer_model_projection.weight"] = (num_layers * ple, hidden)
        shapes["model.per_layer_projection_norm.weight"] = (ple,)
    for i, layer_type in enumerate(text["layer_types"]):
        full = layer_type == "full_attention"
        k_eq_v = full and text.get("attention_k_eq_v", False)
        head_dim = text["global_head_dim"] if full else text["head_dim"]
        global_kv = text.get("num_global_key_value_heads")
        kv_heads = global_kv if k_eq_v and global_kv is not None else text["num_key_value_heads"]
        shared = i >= first_shared
        width = text["intermediate_size"] * (2 if shared and text.get("use_double_wide_mlp") else 1)
        prefix = f"model.layers.{i}."
        for norm in SANDWICH_NORMS:
            shapes[f"{prefix}{norm}.weight"] = (hidden,)
        shapes[prefix + "layer_scalar"] = (1,)
        shapes[prefix + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[prefix + "self_attn.q_norm.weight"] = (head_dim,)
        if not shared:  # KV-shared layers read an earlier layer's K/V and carry no k/v weights
            shapes[prefix + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
            if not k_eq_v:
                shapes[prefix + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
            shapes[prefix + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[prefix + "mlp.gate_proj.weight"] = (width, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (width, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, width)
        if ple:
            shapes[prefix + "per_layer_input_gate.weight"] = (ple, hidden)
            shapes[prefix + "per_layer_projection.weight"] = (hidden, ple)
            shapes[prefix + "post_per_layer_input_norm.weight"] = (hidden,)
        if text.get("enable_moe_block"):
            experts, expert_width = text["num_experts"], text["moe_intermediate_size"]
            shapes[prefix + "router.proj.weight"] = (experts, hidden)
            shapes[prefix + "router.scale"] = (hidden,)
            shapes[prefix + "router.per_expert_scale"] = (experts,)
            shapes[prefix + "experts.gate_up_proj"] = (experts, 2 * expert_width, hidden)
            shapes[prefix + "experts.down_proj"] = (experts, hidden, expert_width)
            for norm in MOE_NORMS:
                shapes[f"{prefix}{norm}.weight"] = (hidden,)
    return shapes


def bf16_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(2 * int(np.prod(shape)) for shape in shapes.values())


def random_tensor(name: str, shape: tuple[int, ...], key: mx.array | None = None) -> mx.array:
    """One random bf16 tensor, from `key` or else from MLX's global random state."""
    if SCALE_VECTOR.search(name):
        return mx.random.uniform(0.9, 1.1, shape, dtype=mx.bfloat16, key=key)
    return mx.random.normal(shape, dtype=mx.bfloat16, scale=WEIGHT_STD, key=key)


def random_hf_tensors(text: dict, seed: int) -> Iterator[tuple[str, mx.array]]:
    """The random checkpoint as a lazy stream of (name, tensor), nothing computed or written.
    Each tensor has its own key, from `seed` and its index: every call yields the same values."""
    shapes = hf_tensor_shapes(text)
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    for index, (name, shape) in enumerate(shapes.items()):
        yield name, random_tensor(name, shape, keys[index])


def plan_shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Group tensor names into shards of about SHARD_BYTES (bf16); a larger tensor gets its own."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_hf_checkpoint(text: dict, directory: Path, seed: int):
    """Write config.json and sharded bf16 safetensors; only a finished directory gets its name."""
    shapes = hf_tensor_shapes(text)
    shards = plan_shards(shapes)
    with staged_directory(directory) as staging:
        mx.random.seed(seed)
        weight_map = {}
        for number, names in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            log(f"  writing {file} ({len(names)} tensors)")
            tensors = {name: random_tensor(name, shapes[name]) for name in names}
            mx.save_safetensors(str(staging / file), tensors, metadata={"format": "pt"})
            weight_map.update({name: file for name in names})
            del tensors  # free this shard before the next one is generated
        index = {"metadata": {"total_size": bf16_bytes(shapes)}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(text, indent=2))


def model_workdir(workdir: Path, model: str, seed: int) -> Path:
    """Per-model directory keyed by the config and seed, so an edited config gets new weights."""
    digest = hashlib.sha1(json.dumps([MODELS[model], seed], sort_keys=True).encode()).hexdigest()[:10]
    return workdir / f"{model}-{digest}"


def prepare_hf_checkpoint(root: Path, model: str, seed: int) -> Path:
    hf_dir = root / "hf"
    if not hf_dir.is_dir():
        log(f"{model}: writing random-weight Hugging Face checkpoint to {hf_dir}")
        write_hf_checkpoint(MODELS[model], hf_dir, seed)
    return hf_dir


def prepare_mlx_gemma4_checkpoint(hf_dir: Path, root: Path, quant: str, reconvert: bool,
                                  sensitive_bits: int = SENSITIVE_BITS, ple_table_bits: int = PLE_TABLE_BITS) -> Path:
    target = root / f"mlx_gemma4-{quant}{bit_floors_suffix(sensitive_bits, ple_table_bits)}"
    if reconvert and target.is_dir():
        shutil.rmtree(target)
    if not target.is_dir():
        log(f"converting with mlx_gemma4.convert to {target}")
        mlx_gemma4.convert(hf_dir, target, dtype="bfloat16", quantize_bits=QUANT_BITS[quant], group_size=GROUP_SIZE,
                           sensitive_bits=sensitive_bits, ple_table_bits=ple_table_bits)
    return target


def bit_floors_suffix(sensitive_bits: int, ple_table_bits: int) -> str:
    """"-s4", "-t8", "-s4-t4": the floors that are not the converter's defaults, for a directory name."""
    floors = (("s", sensitive_bits, SENSITIVE_BITS), ("t", ple_table_bits, PLE_TABLE_BITS))
    return "".join(f"-{tag}{bits}" for tag, bits, default in floors if bits != default)


def prepare_mlx_lm_checkpoint(hf_dir: Path, root: Path, quant: str, reconvert: bool, recipe: str = "own",
                              sensitive_bits: int = SENSITIVE_BITS, ple_table_bits: int = PLE_TABLE_BITS) -> Path:
    """bf16 loads the HF directory as is; quantized follows mlx_lm.convert, with the recipe's per-layer bits."""
    bits = QUANT_BITS[quant]
    if bits is None:
        return hf_dir
    target = root / (f"mlx_lm-{quant}" if recipe == "own"
                     else f"mlx_lm-{quant}-ours{bit_floors_suffix(sensitive_bits, ple_table_bits)}")
    if reconvert and target.is_dir():
        shutil.rmtree(target)
    if not target.is_dir():
        log(f"quantizing with mlx_lm.utils.quantize_model to {target}")
        # mlx_lm.convert minus the tokenizer copy: the random checkpoint has no tokenizer.
        model, config = mlx_lm_load_model(hf_dir, lazy=True)
        model, config = quantize_like_mlx_lm_convert(model, config, bits, recipe, sensitive_bits, ple_table_bits)
        with staged_directory(target) as staging:
            save_model(staging, model, donate_model=True)
            save_config(config, staging / "config.json")
    return target


def quantize_like_mlx_lm_convert(model, config: dict, bits: int, recipe: str = "own",
                                 sensitive_bits: int = SENSITIVE_BITS, ple_table_bits: int = PLE_TABLE_BITS):
    """`quantize_model` as mlx_lm.convert calls it: the model's own quant_predicate, or ours."""
    predicate = None if recipe == "own" else partial(
        our_layer_bits, bits=bits, sensitive_bits=sensitive_bits, ple_table_bits=ple_table_bits
    )
    with contextlib.redirect_stdout(sys.stderr):  # its bits-per-weight note is progress, not report
        return quantize_model(model, config, GROUP_SIZE, bits, quant_predicate=predicate)


def our_layer_bits(path: str, _module, bits: int, sensitive_bits: int, ple_table_bits: int) -> dict:
    """The bits our converter gives an mlx-lm module: its path is our tensor key behind a prefix."""
    key = MLX_LM_MODULE_PREFIX.sub("", path) + ".weight"
    return {"group_size": GROUP_SIZE, "bits": bits_for(key, bits, sensitive_bits, ple_table_bits)}


def load_mlx_lm_model(path: Path):
    return mlx_lm_load_model(path)[0]


# ---------------------------------------------------------------------------------------------
# Models built in memory from the random stream: no checkpoint on disk


def evaluate_by_layer(model):
    """Compute the lazy weights one layer at a time, so one layer's bf16 sources exist at most."""
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def build_mlx_gemma4(text: dict, seed: int, quant: str, sensitive_bits: int = SENSITIVE_BITS,
                     ple_table_bits: int = PLE_TABLE_BITS) -> mlx_gemma4.Model:
    """Ours: the stream through the converter's per-tensor path, as the file path converts it."""
    bits = QUANT_BITS[quant]
    config = from_hf_config(text)
    bit_floors = dict(sensitive_bits=sensitive_bits, ple_table_bits=ple_table_bits)
    tensors = convert_tensors(
        config, random_hf_tensors(text, seed), dtype="bfloat16", quantize_bits=bits, group_size=GROUP_SIZE,
        **bit_floors,
    )
    config = replace(config, quantization=quantization_config(config, bits, GROUP_SIZE, **bit_floors))
    return model_from_weights(config, dict(tensors))  # evaluated one layer at a time


def build_mlx_lm(text: dict, seed: int, quant: str, recipe: str = "own", sensitive_bits: int = SENSITIVE_BITS,
                 ple_table_bits: int = PLE_TABLE_BITS):
    """mlx-lm: the stream loaded as mlx_lm.utils.load_model loads the HF directory, then
    quantized as prepare_mlx_lm_checkpoint quantizes it."""
    model_class, args_class = mlx_lm_model_classes(text)
    model = model_class(args_class.from_dict(text))
    model.eval()
    model.load_weights(list(model.sanitize(dict(random_hf_tensors(text, seed))).items()), strict=True)
    if QUANT_BITS[quant] is not None:
        model, _ = quantize_like_mlx_lm_convert(model, text, QUANT_BITS[quant], recipe, sensitive_bits, ple_table_bits)
    evaluate_by_layer(model)
    return model


# ---------------------------------------------------------------------------------------------
# The two runtimes behind one interface


@dataclass
class Runtime:
    model: object
    prefill: Callable[[mx.array], mx.array]  # prompt [L] -> logits of its last position [1, vocab]
    decode: Callable[[mx.array, int], Iterator[int]]  # prompt [L], n -> n greedy token ids, EOS ignored


def mlx_gemma4_runtime(model: mlx_gemma4.Model, prefill_step_size: int) -> Runtime:
    def prefill(prompt: mx.array) -> mx.array:
        return mlx_gemma4_prefill(model, prompt[None], model.make_cache(), prefill_step_size)

    def decode(prompt: mx.array, num_tokens: int) -> Iterator[int]:
        return mlx_gemma4.generate_tokens(
            model, prompt, max_tokens=num_tokens, stop_ids=[], prefill_step_size=prefill_step_size
        )

    return Runtime(model, prefill, decode)


def mlx_lm_runtime(model, prefill_step_size: int) -> Runtime:
    def prefill(prompt: mx.array) -> mx.array:
        # generate_step's prompt loop: chunks fill the cache, the last token alone yields logits.
        cache = make_prompt_cache(model)
        while prompt.size > 1:
            chunk = prompt[: min(prefill_step_size, prompt.size - 1)]
            model(chunk[None], cache=cache)
            mx.eval([c.state for c in cache])
            prompt = prompt[chunk.size :]
            mx.clear_cache()
        return model(prompt[None], cache=cache)[:, -1]

    def decode(prompt: mx.array, num_tokens: int) -> Iterator[int]:
        # generate_step never stops on EOS (stream_generate does); its default sampler is argmax.
        steps = generate_step(prompt, model, max_tokens=num_tokens, prefill_step_size=prefill_step_size)
        return (token for token, _ in steps)

    return Runtime(model, prefill, decode)


# ---------------------------------------------------------------------------------------------
# Measurements


def decode_weight_bytes(model, expert_fraction: float) -> int:
    """Bytes of parameters one decode step reads: the PLE table is only gathered (one row),
    routed experts count for the top-k share, the tied embedding once as the LM head."""
    total = 0.0
    for path, array in tree_flatten(model.parameters()):
        if "embed_tokens_per_layer" in path:
            continue
        total += array.nbytes * (expert_fraction if ".experts." in path else 1.0)
    return int(total)


def time_prefill(runtime: Runtime, prompt: mx.array) -> tuple[float, float]:
    """(prefill seconds, time-to-first-token seconds) from a fresh cache."""
    start = time.perf_counter()
    logits = runtime.prefill(prompt)
    mx.eval(logits)
    prefilled = time.perf_counter()
    mx.eval(mx.argmax(logits, axis=-1))  # greedy: sampling the first token
    return prefilled - start, time.perf_counter() - start


def time_decode(runtime: Runtime, prompt: mx.array, num_tokens: int) -> float:
    """Decode tok/s from the first yielded token to the last: prefill is excluded."""
    stamps = [time.perf_counter() for _ in runtime.decode(prompt, num_tokens)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def fresh_peak_memory():
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def measure(
    make_model: Callable[[], object],
    make_runtime: Callable[[object], Runtime],
    prompts: dict[int, mx.array],
    decode_prompt: mx.array,
    gen_tokens: int,
    trials: int,
    expert_fraction: float,
    peak_after_build: bool,
) -> dict:
    """Build one runtime and time it. Peak memory covers loading and every run, or with
    `peak_after_build` (weights built in memory) only the runs: random generation is no load cost."""
    fresh_peak_memory()
    runtime = make_runtime(make_model())
    if peak_after_build:
        fresh_peak_memory()
    result = {"decode_weight_bytes": decode_weight_bytes(runtime.model, expert_fraction), "prompt": {}}
    for length, prompt in prompts.items():
        time_prefill(runtime, prompt)  # warm-up: first use of each shape compiles / allocates
        runs = [time_prefill(runtime, prompt) for _ in range(trials)]
        result["prompt"][length] = {"prefill_s": [r[0] for r in runs], "ttft_s": [r[1] for r in runs]}
    time_decode(runtime, decode_prompt, min(gen_tokens, 16))  # warm-up
    result["decode_tok_s"] = [time_decode(runtime, decode_prompt, gen_tokens) for _ in range(trials)]
    result["peak_memory_bytes"] = mx.get_peak_memory()
    return result


def compare(model: str, quant: str, args) -> dict:
    """Both runtimes on one model and quantization; a runtime that fails is reported, not fatal."""
    text = MODELS[model]
    in_memory = builds_in_memory(model, args)
    if not in_memory:
        root = model_workdir(args.workdir, model, args.seed)
        hf_dir = prepare_hf_checkpoint(root, model, args.seed)

    rng = np.random.default_rng(args.seed)
    lengths = args.prompt_lengths or default_prompt_lengths(model)
    prompts = {n: mx.array(rng.integers(MIN_TOKEN_ID, text["vocab_size"], n), dtype=mx.int32) for n in lengths}
    decode_prompt = mx.array(rng.integers(MIN_TOKEN_ID, text["vocab_size"], args.decode_prompt_length), dtype=mx.int32)
    expert_fraction = text["top_k_experts"] / text["num_experts"] if text.get("enable_moe_block") else 1.0

    weights = "in memory" if in_memory else "files"
    result = {"model": model, "quant": quant, "weights": weights, "prompt_lengths": list(lengths)}
    ours = {"sensitive_bits": args.sensitive_bits, "ple_table_bits": args.ple_table_bits}
    theirs = {"recipe": args.mlx_lm_recipe, **ours}
    result.update(ours, mlx_lm_recipe=args.mlx_lm_recipe)
    runtimes = {
        "mlx_gemma4": (partial(prepare_mlx_gemma4_checkpoint, **ours), mlx_gemma4.load_model,
                       partial(build_mlx_gemma4, **ours), mlx_gemma4_runtime),
        "mlx_lm": (partial(prepare_mlx_lm_checkpoint, **theirs), load_mlx_lm_model, partial(build_mlx_lm, **theirs),
                   mlx_lm_runtime),
    }
    for key, (prepare, load, build, runtime) in runtimes.items():
        log(f"{model} {quant}: {key} ({weights})")
        try:
            if in_memory:
                make_model = partial(build, text, args.seed, quant)
            else:
                make_model = partial(load, prepare(hf_dir, root, quant, args.reconvert))
            make_runtime = partial(runtime, prefill_step_size=args.prefill_step_size)
            result[key] = measure(
                make_model, make_runtime, prompts, decode_prompt, args.gen_tokens, args.trials, expert_fraction,
                peak_after_build=in_memory,
            )
        except Exception as exc:  # converter, loader or runtime failure: keep the traceback, go on
            log(traceback.format_exc())
            result[key] = {"error": f"{type(exc).__name__}: {exc}"}
        gc.collect()  # drop this runtime's model before the next one loads
        mx.clear_cache()
    return result


def builds_in_memory(model: str, args) -> bool:
    """--in-memory / --no-in-memory if given, else in memory when the bf16 source is too large for disk."""
    if args.in_memory is not None:
        return args.in_memory
    return bf16_bytes(hf_tensor_shapes(MODELS[model])) > FILE_PATH_MAX_BF16_BYTES


# ---------------------------------------------------------------------------------------------
# Report


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def git_commit() -> str:
    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_bandwidth() -> tuple[float, str]:
    """Roofline bandwidth in GB/s and where the figure comes from."""
    if mx.cuda.is_available():
        name = mx.device_info().get("device_name", "")
        for gpu, gbs in GPU_BANDWIDTH_GBS.items():
            if gpu in name:
                return gbs, f"{gpu} peak HBM bandwidth"
        return CUDA_FALLBACK_GBS, f"H100 SXM figure assumed for '{name}'; pass --bandwidth-gbs"
    return CPU_FALLBACK_GBS, "nominal CPU figure, not measured; pass --bandwidth-gbs"


def environment(args) -> dict:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(mx.default_device()),
        "device_info": {k: v for k, v in info.items() if isinstance(v, (str, int, float))},
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "mlx_gemma4_commit": git_commit(),
        "bandwidth_gbs": args.bandwidth_gbs,
        "bandwidth_source": args.bandwidth_source,
    }


def summarize(side: dict, bandwidth_gbs: float) -> dict | None:
    """Medians of one runtime's runs and the derived figures; None when it failed."""
    if "error" in side:
        return None
    median = statistics.median
    decode = median(side["decode_tok_s"])
    gbs = side["decode_weight_bytes"] * decode / 1e9
    return {
        "prompt_tok_s": {n: n / median(r["prefill_s"]) for n, r in side["prompt"].items()},
        "ttft_ms": {n: 1e3 * median(r["ttft_s"]) for n, r in side["prompt"].items()},
        "decode_tok_s": decode,
        "decode_gbs": gbs,
        "roofline_pct": 100 * gbs / bandwidth_gbs,
        "peak_gb": side["peak_memory_bytes"] / 1e9,
    }


def compared_cells(ours: dict | None, theirs: dict | None, value: Callable[[dict], float], spec: str) -> list[str]:
    """Ours, mlx-lm and ours / mlx-lm; a failed runtime shows as 'failed'."""
    a, b = (None if side is None else value(side) for side in (ours, theirs))
    shown = ["failed" if v is None else format(v, spec) for v in (a, b)]
    return shown + ["-" if a is None or b is None else f"{a / b:.2f}"]


def paired_cell(ours: dict | None, theirs: dict | None, value: Callable[[dict], float], spec: str) -> str:
    return " / ".join("failed" if side is None else format(value(side), spec) for side in (ours, theirs))


def quant_label(result: dict) -> str:
    """The quant cell: "4bit", plus our bit floors if not the defaults ("s4": sensitive bits, "t8": the
    PLE table's), "same bits" if mlx-lm took ours."""
    label = result["quant"]
    if QUANT_BITS[label] is None:
        return label
    sensitive_bits = result.get("sensitive_bits", SENSITIVE_BITS)
    # Runs before session 36 held the PLE table at the sensitive bits.
    label += bit_floors_suffix(sensitive_bits, result.get("ple_table_bits", sensitive_bits)).replace("-", " ")
    if result.get("mlx_lm_recipe", "own") == "ours":
        label += " same bits"
    return label


def markdown_table(results: list[dict], bandwidth_gbs: float) -> str:
    header = (
        "| model | quant | p | prompt tok/s ours | mlx-lm | ratio | TTFT ms ours / mlx-lm "
        "| decode tok/s ours | mlx-lm | ratio | peak GB ours / mlx-lm | decode GB/s ours / mlx-lm "
        "| % roofline ours / mlx-lm |"
    )
    lines = [header, "|" + "---|" * 13]
    for result in results:
        ours, theirs = (summarize(result[key], bandwidth_gbs) for key in ("mlx_gemma4", "mlx_lm"))
        for row, length in enumerate(result["prompt_lengths"]):
            cells = [result["model"], quant_label(result), str(length)]
            cells += compared_cells(ours, theirs, lambda s: s["prompt_tok_s"][length], ",.0f")
            cells.append(paired_cell(ours, theirs, lambda s: s["ttft_ms"][length], ",.1f"))
            if row == 0:  # decode and memory are per model and quant, not per prompt length
                cells += compared_cells(ours, theirs, lambda s: s["decode_tok_s"], ",.1f")
                cells.append(paired_cell(ours, theirs, lambda s: s["peak_gb"], ".2f"))
                cells.append(paired_cell(ours, theirs, lambda s: s["decode_gbs"], ",.1f"))
                cells.append(paired_cell(ours, theirs, lambda s: s["roofline_pct"], ".1f"))
            else:
                cells += [""] * 6
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


WEIGHT_PATHS = {
    "files": "a random bf16 HF checkpoint on disk, converted by each runtime's converter (cached "
    "under --workdir); peak memory counts from before loading",
    "in memory": "random bf16 HF tensors drawn lazily (one key per tensor), converted and loaded by "
    "each runtime in memory, no files; peak memory counts from after the build, so it covers the "
    "runs (weights, caches, activations), not the random generation",
}


def print_report(env: dict, args, results: list[dict]):
    info = ", ".join(f"{k}={v}" for k, v in env["device_info"].items())
    print(f"# mlx_gemma4 vs mlx-lm, {env['date']}")
    print(f"- device: {env['device']} ({info})")
    print(f"- mlx {env['mlx']}, mlx-lm {env['mlx_lm']}, mlx_gemma4 commit {env['mlx_gemma4_commit']}")
    print(f"- roofline bandwidth: {env['bandwidth_gbs']:g} GB/s ({env['bandwidth_source']})")
    for weights, description in WEIGHT_PATHS.items():
        models = sorted({r["model"] for r in results if r["weights"] == weights}, key=list(MODELS).index)
        if models:
            print(f"- weights of {', '.join(models)}: {description}")
    print(
        f"- random bf16 weights, batch 1, median of {args.trials} trials after a warm-up; prefill step "
        f"{args.prefill_step_size}; decode: {args.gen_tokens} greedy tokens after a "
        f"{args.decode_prompt_length}-token prompt, EOS ignored; ratio = ours / mlx-lm; "
        f"GB/s counts weight bytes read per decoded token (KV cache excluded)"
    )
    theirs = ("quantized with the same per-layer bits (--mlx-lm-recipe ours)" if args.mlx_lm_recipe == "ours"
              else "keep the router at 8")
    print(f"- our quantized models keep the PLE table at {args.ple_table_bits} bits or more (--ple-table-bits), "
          f"the PLE projections and MoE router at {args.sensitive_bits} (--sensitive-bits); mlx-lm's {theirs}")
    print()
    print(markdown_table(results, env["bandwidth_gbs"]))
    failures = [(r, key) for r in results for key in ("mlx_gemma4", "mlx_lm") if "error" in r[key]]
    if failures:
        print()
    for result, key in failures:
        print(f"- failed: {result['model']} {result['quant']} {key}: {result[key]['error']}")


def write_plot(results: list[dict], bandwidth_gbs: float, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed to write a PNG
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"- plot: matplotlib is not installed, {path} not written")
        return
    labels, series = [], {"mlx_gemma4": [], "mlx-lm": [], "roofline (mlx_gemma4 weights)": []}
    for result in results:
        ours, theirs = result["mlx_gemma4"], result["mlx_lm"]
        if "error" in ours or "error" in theirs:
            continue
        labels.append(f"{result['model']}\n{result['quant']}")
        series["mlx_gemma4"].append(statistics.median(ours["decode_tok_s"]))
        series["mlx-lm"].append(statistics.median(theirs["decode_tok_s"]))
        series["roofline (mlx_gemma4 weights)"].append(bandwidth_gbs * 1e9 / ours["decode_weight_bytes"])
    if not labels:
        print(f"- plot: no model ran in both runtimes, {path} not written")
        return
    positions, width = np.arange(len(labels)), 0.27
    figure, axes = plt.subplots(figsize=(max(6.0, 1.8 * len(labels)), 4.5))
    for offset, (name, values) in enumerate(series.items()):
        axes.bar(positions + (offset - 1) * width, values, width, label=name)
    axes.set_xticks(positions)
    axes.set_xticklabels(labels)
    axes.set_yscale("log")  # the roofline can sit orders of magnitude above achieved speed
    axes.set_ylabel("decode tok/s (batch 1)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"- plot: {path}")


# ---------------------------------------------------------------------------------------------
# CLI


def load_run(path: Path) -> dict:
    """A `--json` run as `main` had it: JSON turned the prompt lengths' keys into strings."""
    run = json.loads(path.read_text())
    for result in run["results"]:
        for side in (result["mlx_gemma4"], result["mlx_lm"]):
            if "prompt" in side:
                side["prompt"] = {int(length): runs for length, runs in side["prompt"].items()}
    return run


def print_merged_report(runs: list[dict], bandwidth_gbs: float) -> list[dict]:
    """One table over earlier `--json` runs (each model's row still from one process); returns
    their results."""
    print("# mlx_gemma4 vs mlx-lm, merged from separate runs")
    for run in runs:
        env, args = run["environment"], run["args"]
        models = ", ".join(dict.fromkeys(f"{r['model']} {r['quant']}" for r in run["results"]))
        print(f"- {models}: {env['date']}, {env['device_info'].get('device_name', env['device'])}, mlx {env['mlx']}, "
              f"mlx-lm {env['mlx_lm']}, commit {env['mlx_gemma4_commit']}; median of {args['trials']} trials, "
              f"decode {args['gen_tokens']} tokens after {args['decode_prompt_length']}")
    print(f"- roofline bandwidth: {bandwidth_gbs:g} GB/s")
    print()
    results = [result for run in runs for result in run["results"]]
    print(markdown_table(results, bandwidth_gbs))
    return results


def comma_list(choices):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return items

    return parse


def positive_ints(text: str) -> list[int]:
    values = [int(item) for item in text.split(",") if item.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give positive integers separated by commas")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=comma_list(list(MODELS)), default=["e2b-mini", "26b-a4b-mini"])
    parser.add_argument("--quant", type=comma_list(list(QUANT_BITS)), default=["bf16", "4bit"])
    parser.add_argument(
        "--prompt-lengths",
        type=positive_ints,
        help="prompt tok/s at these lengths (default 128,512 on -mini models, else 128,512,2048)",
    )
    parser.add_argument("--decode-prompt-length", type=int, default=512, help="prompt length before the timed decode")
    parser.add_argument("--gen-tokens", type=int, default=128, help="greedy tokens per decode trial (at least 2)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--prefill-step-size", type=int, default=2048, help="prompt chunk size in both runtimes")
    parser.add_argument(
        "--bandwidth-gbs", type=float, help="roofline memory bandwidth (default: H100 3350, H200 4800, CPU 50)"
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="checkpoint cache, reused across runs")
    parser.add_argument("--reconvert", action="store_true", help="convert again (after a converter change)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the prompts")
    parser.add_argument(
        "--in-memory",
        action=argparse.BooleanOptionalAction,
        help=f"build both models in memory from a lazy random stream, writing no files (default: "
        f"in memory when the bf16 HF checkpoint exceeds {FILE_PATH_MAX_BF16_BYTES / 1e9:g} GB, i.e. "
        f"26b-a4b and 31b; from files on disk otherwise)",
    )
    parser.add_argument(
        "--sensitive-bits", type=int, default=SENSITIVE_BITS,
        help=f"our converter's --q-sensitive-bits (default {SENSITIVE_BITS}; 4 quantizes the PLE projections as "
        "mlx-lm's 4-bit convert does)",
    )
    parser.add_argument(
        "--ple-table-bits", type=int, default=PLE_TABLE_BITS,
        help=f"our converter's --q-ple-table-bits (default {PLE_TABLE_BITS}; 4 quantizes the PLE table as mlx-lm's "
        "4-bit convert does)",
    )
    parser.add_argument(
        "--mlx-lm-recipe", choices=MLX_LM_RECIPES, default="own",
        help="mlx-lm's per-layer bits: 'own' as mlx_lm.convert quantizes (default), 'ours' as our converter does "
        "with --sensitive-bits and --ple-table-bits, so both runtimes run the same quantized model",
    )
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--plot", type=Path, help="write a decode tok/s bar plot here (needs matplotlib)")
    parser.add_argument(
        "--from-json", type=Path, nargs="+", metavar="JSON",
        help="run nothing: one table (and --plot) over earlier --json runs of one roofline bandwidth",
    )
    args = parser.parse_args(argv)
    if args.gen_tokens < 2:
        parser.error("--gen-tokens must be at least 2 (decode speed is timed between tokens)")
    if args.trials < 1 or args.decode_prompt_length < 1 or args.prefill_step_size < 1:
        parser.error("--trials, --decode-prompt-length and --prefill-step-size must be positive")
    if args.bandwidth_gbs is None:
        args.bandwidth_gbs, args.bandwidth_source = default_bandwidth()
    else:
        args.bandwidth_source = "--bandwidth-gbs"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        runs = [load_run(path) for path in args.from_json]
        bandwidths = {run["environment"]["bandwidth_gbs"] for run in runs}
        if len(bandwidths) > 1:
            raise SystemExit(f"--from-json: the runs assume different roofline bandwidths {sorted(bandwidths)}")
        (bandwidth_gbs,) = bandwidths
        results = print_merged_report(runs, bandwidth_gbs)
        if args.plot:
            write_plot(results, bandwidth_gbs, args.plot)
        return
    env = environment(args)
    results = [compare(model, quant, args) for model in args.models for quant in args.quant]
    print_report(env, args, results)
    if args.json:
        report = {"environment": env, "args": vars(args), "results": results}
        args.json.write_text(json.dumps(report, indent=2, default=str))  # default=str: Path arguments
        print(f"- raw results: {args.json}")
    if args.plot:
        write_plot(results, env["bandwidth_gbs"], args.plot)


if __name__ == "__main__":
    main()
