"""Parity of the MLX decoder with transformers 5.23 on tiny random checkpoints (float32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_checkpoints import VARIANTS
from hf_checkpoints import WINDOW

from mlx_gemma4 import generate_tokens
from mlx_gemma4.generate import prefill

LOGIT_TOLERANCE = 1e-4  # float32 vs float32: transformers' own float64 error is ~5e-5 here
PROMPT = 23  # well past the sliding window of 6


def reference_logits(checkpoints, name: str, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return checkpoints.torch_model(name)(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_without_cache_match_transformers(checkpoints, name):
    ids = checkpoints.prompt(name, PROMPT)
    ours = np.array(checkpoints.model(name)(mx.array(ids)))
    assert ours.shape == (1, PROMPT, checkpoints.vocab_size(name))
    assert np.abs(ours - reference_logits(checkpoints, name, ids)).max() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_prefill_then_single_token_steps_match(checkpoints, name):
    ids = checkpoints.prompt(name, PROMPT, seed=1)
    model = checkpoints.model(name)
    cache = model.make_cache()
    first = WINDOW + 3
    steps = [np.array(model(mx.array(ids[:, :first]), cache))]
    steps += [np.array(model(mx.array(ids[:, t : t + 1]), cache)) for t in range(first, PROMPT)]
    ours = np.concatenate(steps, axis=1)
    assert np.abs(ours - reference_logits(checkpoints, name, ids)).max() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("chunk", [4, WINDOW + 3])  # chunks shorter and longer than the window
def test_chunked_prefill_matches(checkpoints, name, chunk):
    ids = checkpoints.prompt(name, PROMPT, seed=2)
    model = checkpoints.model(name)
    reference = reference_logits(checkpoints, name, ids)
    cache = model.make_cache()
    prompt_end = PROMPT - 4
    last = prefill(model, mx.array(ids[:, :prompt_end]), cache, step_size=chunk)
    assert np.abs(np.array(last) - reference[:, prompt_end - 1]).max() <= LOGIT_TOLERANCE
    for t in range(prompt_end, PROMPT):
        step = np.array(model(mx.array(ids[:, t : t + 1]), cache))[:, 0]
        assert np.abs(step - reference[:, t]).max() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generation_matches_transformers_generate(checkpoints, name):
    ids = checkpoints.prompt(name, 11, seed=3)
    hf_model = checkpoints.torch_model(name)
    new_tokens = 24
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )[0, ids.shape[1] :].tolist()
    ours = list(generate_tokens(checkpoints.model(name), ids[0].tolist(), max_tokens=new_tokens, stop_ids=[]))
    assert ours == expected


@pytest.mark.parametrize("name", list(VARIANTS))
def test_left_padded_batch_matches_rows_run_alone(checkpoints, name):
    model = checkpoints.model(name)
    long, short = checkpoints.prompt(name, 15, seed=4)[0], checkpoints.prompt(name, 9, seed=5)[0]
    pad = len(long) - len(short)
    batch = np.stack([long, np.concatenate([np.zeros(pad, dtype=long.dtype), short])])
    cache = model.make_cache(left_padding=[0, pad])
    logits = [np.array(model(mx.array(batch), cache))]
    follow = checkpoints.prompt(name, 2 * WINDOW, seed=6)[0]
    for token in follow:  # decode past the window with per-row positions
        logits.append(np.array(model(mx.array([[int(token)], [int(token)]]), cache)))
    logits = np.concatenate(logits, axis=1)
    for row, prompt in enumerate([long, short]):
        alone = np.array(model(mx.array(np.concatenate([prompt, follow])[None])))[0]
        assert np.abs(logits[row, len(long) - len(prompt) :] - alone).max() <= LOGIT_TOLERANCE


def test_bfloat16_greedy_is_as_faithful_to_float32_as_transformers_bfloat16(checkpoints):
    """bf16 top-1 agreement with float32, teacher-forced over 4 x 256 greedy steps.

    Random tiny weights give flat next-token distributions: rounding the weights alone to bf16
    flips ~3% of choices, so the bar is transformers' own bf16 model on the same tokens.
    """
    name, steps = "ple_shared", 256
    ours_f32, ours_bf16 = checkpoints.model(name), checkpoints.model(name, "bfloat16")
    hf_bf16 = checkpoints.torch_model(name).to(torch.bfloat16)
    try:
        ours_hits, hf_hits, ours_error, hf_error = [], [], [], []
        for seed in range(4):
            prompt = checkpoints.prompt(name, 16, seed=100 + seed)[0].tolist()
            tokens = np.array(list(generate_tokens(ours_f32, prompt, max_tokens=steps, stop_ids=[])))
            assert len(tokens) == steps
            sequence = [prompt + tokens[:-1].tolist()]
            decided = slice(len(prompt) - 1, None)  # positions that chose a generated token
            f32_logits = np.array(ours_f32(mx.array(sequence)))[0, decided]
            bf16_logits = np.array(ours_bf16(mx.array(sequence)).astype(mx.float32))[0, decided]
            with torch.no_grad():
                hf_logits = hf_bf16(torch.tensor(sequence)).logits.float().numpy()[0, decided]
            ours_hits.append(bf16_logits.argmax(-1) == tokens)
            hf_hits.append(hf_logits.argmax(-1) == tokens)
            ours_error.append(np.abs(bf16_logits - f32_logits).mean())
            hf_error.append(np.abs(hf_logits - f32_logits).mean())
    finally:
        hf_bf16.to(torch.float32)  # the session-wide reference model stays float32
    ours_agreement, hf_agreement = np.mean(ours_hits), np.mean(hf_hits)
    print(f"bf16 top-1 agreement: ours {ours_agreement:.4f}, transformers {hf_agreement:.4f}")
    assert ours_agreement >= hf_agreement - 0.01
    assert np.mean(ours_error) <= 1.25 * np.mean(hf_error)


def test_bfloat16_greedy_agrees_with_float32_on_a_trained_model(checkpoints):
    """>= 99% bf16 top-1 agreement with float32, teacher-forced over 4 x 256 greedy steps.

    The PLE model is first fitted to a synthetic Markov chain, so its choices have the margins
    of a trained model instead of the near-ties of random weights.
    """
    name, steps = "ple_trained", 256
    ours_f32, ours_bf16 = checkpoints.model(name), checkpoints.model(name, "bfloat16")
    hits = []
    for seed in range(4):
        prompt = checkpoints.prompt(name, 16, seed=200 + seed)[0].tolist()
        tokens = np.array(list(generate_tokens(ours_f32, prompt, max_tokens=steps, stop_ids=[])))
        sequence = mx.array([prompt + tokens[:-1].tolist()])
        bf16_logits = np.array(ours_bf16(sequence).astype(mx.float32))[0, len(prompt) - 1 :]
        hits.append(bf16_logits.argmax(-1) == tokens)
    agreement = np.mean(hits)
    print(f"bf16 top-1 agreement on the trained model: {agreement:.4f}")
    assert agreement >= 0.99


def separate_projections_model(path):
    """The checkpoint's model without load's projection fusion: q/k/v and gate/up apart."""
    from mlx_gemma4.config import ModelConfig, read_config_file
    from mlx_gemma4.load import _quantize_like_checkpoint, _weight_files
    from mlx_gemma4.model import Model

    config = ModelConfig.from_dict(read_config_file(path))
    weights = {key: value for file in _weight_files(path) for key, value in mx.load(str(file)).items()}
    model = Model(config)
    if config.quantization:
        _quantize_like_checkpoint(model, config.quantization, weights)
    model.load_weights(list(weights.items()), strict=True)
    return model


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_loaded_model_fuses_projections_and_computes_the_same(checkpoints, name, bits):
    model = checkpoints.model(name, "float32", bits)
    separate = separate_projections_model(checkpoints.converted(name, "float32", bits))
    for fused, apart in zip(model.layers, separate.layers):
        attn = fused.self_attn
        assert "gate_up_proj" in fused.mlp and "gate_proj" not in fused.mlp
        # KV-shared layers have only q_proj: nothing to fuse there.
        assert attn.projections == (("qkv_proj",) if attn.owns_cache else ("q_proj",))
        assert "q_proj" in apart.self_attn and "gate_proj" in apart.mlp
    ids = mx.array(checkpoints.prompt(name, PROMPT, seed=4))
    assert_same_logits(model(ids), separate(ids))
    cache, cache_apart = model.make_cache(), separate.make_cache()
    prefill(model, ids, cache, 5)
    prefill(separate, ids, cache_apart, 5)
    step = mx.array([[7]])
    assert_same_logits(model(step, cache), separate(step, cache_apart))


def assert_same_logits(fused: mx.array, apart: mx.array):
    """Equal up to float32 rounding of the logits' scale: a GPU's BLAS sums a fused product's
    columns in another order than the separate ones' (3.3e-5 at logits up to 4.6 on the H100)."""
    assert mx.abs(fused - apart).max().item() <= 2e-5 * max(1.0, mx.abs(apart).max().item())


def test_projections_of_different_quantization_stay_apart():
    import mlx.nn as nn

    from mlx_gemma4.model import fuse_linears

    parent = nn.Module()
    parent.gate_proj = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4)
    parent.up_proj = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=8)
    assert not fuse_linears(parent, ("gate_proj", "up_proj"), "gate_up_proj")
    assert "gate_proj" in parent and "up_proj" in parent and "gate_up_proj" not in parent
    parent.up_proj = nn.QuantizedLinear(64, 48, bias=False, group_size=32, bits=4)
    x = mx.random.normal((3, 64))
    expected = mx.concatenate([parent.gate_proj(x), parent.up_proj(x)], axis=-1)
    assert fuse_linears(parent, ("gate_proj", "up_proj"), "gate_up_proj")
    assert "gate_proj" not in parent and mx.array_equal(parent.gate_up_proj(x), expected)


def test_projections_fuse_where_decode_runs_compiled(checkpoints):
    """Up to the host-bound width, and wider where quantized projections take the qmv kernel."""
    import dataclasses

    from mlx_gemma4.kernels import TWINS, qmv_ref
    from mlx_gemma4.model import HOST_BOUND_MAX_HIDDEN

    def fused(model) -> bool:
        model.fuse_projections()
        attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
        assert ("qkv_proj" in attention) == ("gate_up_proj" in mlp) != ("q_proj" in attention)
        return "qkv_proj" in attention

    model = separate_projections_model(checkpoints.converted("moe", "float32", None))
    wide = dataclasses.replace(model.config, hidden_size=HOST_BOUND_MAX_HIDDEN + 1)
    narrow, model.config = model.config, wide
    assert not fused(model)
    model.config = narrow
    assert fused(model)
    quantized = separate_projections_model(checkpoints.converted("ple_shared", "float32", 4))
    quantized.config = dataclasses.replace(quantized.config, hidden_size=HOST_BOUND_MAX_HIDDEN + 1)
    quantized.use_kernels(TWINS)  # MLX's qmv: plain decode, projections apart
    assert not fused(quantized)
    quantized.use_kernels(dataclasses.replace(TWINS, quantized_matmul=lambda *args: qmv_ref(*args)))
    assert fused(quantized)


def switch_glu_and_experts(bits: int | None, fused: bool):
    """mlx-lm's SwitchGLU with Gemma's GELU gate (the reference) and our Experts, same weights."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchGLU

    from mlx_gemma4.kernels import TWINS, gelu_gate_ref
    from mlx_gemma4.model import Experts

    reference = SwitchGLU(64, 32, 16, activation=lambda up, gate: gelu_gate_ref(gate, up))
    experts = Experts(64, 32, 16, TWINS)
    if bits:
        nn.quantize(reference, group_size=32, bits=bits)
        nn.quantize(experts, group_size=32, bits=bits)
    experts.update(reference.parameters())
    if fused:
        experts.fuse_projections()
        assert "gate_up_proj" in experts and "gate_proj" not in experts
    return reference, experts


def routed(batch: int, length: int, seed: int = 1) -> mx.array:
    """Routing as the router gives it: k = 4 distinct experts of 16 per token, some left idle."""
    return mx.argsort(mx.random.uniform(shape=(batch, length, 12), key=mx.random.key(seed)), axis=-1)[..., :4]


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("batch,length", [(1, 1), (2, 1), (1, 8), (2, 37)])
def test_experts_equal_switch_glu(bits, fused, batch, length):
    """Every path of Experts: decode rows by constant row indices, rows sorted by expert (from
    SORT_MIN_ROWS routed rows), and one block per expert (grouped_experts)."""
    from mlx_gemma4.model import SORT_MIN_ROWS, grouped_experts

    reference, experts = switch_glu_and_experts(bits, fused)
    x = mx.random.normal((batch, length, 64), key=mx.random.key(0))
    indices = routed(batch, length)
    expected = reference(x, indices)
    assert expected.shape == (batch, length, 4, 64)
    out = experts(x, indices)
    assert out.shape == (batch, length, 4, 1, 64)
    assert mx.abs(out.squeeze(-2) - expected).max().item() <= 1e-5, ("sorted" if indices.size >= SORT_MIN_ROWS else
                                                                     "decode")
    grouped = grouped_experts(experts, x, indices)
    assert mx.abs(grouped.squeeze(-2) - expected).max().item() <= 1e-5


@pytest.mark.parametrize("room", [0, -1])
def test_grouped_experts_with_a_set_capacity_read_nothing_on_the_host(room):
    """Inside mx.compile (where a host read fails): rows up to `last` get SwitchGLU's output and
    rows past it reach no expert. The capacity is the busiest expert's count over the real rows
    plus `room`; the flag says whether an expert was routed more rows than that."""
    from mlx_gemma4.model import ExpertRows, grouped_experts

    reference, experts = switch_glu_and_experts(None, True)
    x = mx.random.normal((1, 37, 64), key=mx.random.key(0))
    indices = mx.argsort(mx.random.uniform(shape=(1, 30, 16), key=mx.random.key(1)), axis=-1)[..., :4]
    counts = np.bincount(np.array(indices).reshape(-1), minlength=16)
    busiest = counts.max()
    # The 7 padding rows past `last` pick the busiest experts: counted, they would overflow them.
    favourites = mx.array(np.argsort(-counts)[:4])
    indices = mx.concatenate([indices, mx.broadcast_to(favourites.astype(indices.dtype), (1, 7, 4))], axis=1)

    def grouped(x, indices, last):
        rows = ExpertRows(last, int(busiest) + room)
        out = grouped_experts(experts, x, indices, rows)
        return out, mx.stack(rows.overflows).any()

    out, overflowed = mx.compile(grouped)(x, indices, mx.array([29]))
    assert overflowed.item() is (room < 0)
    if room == 0:
        assert mx.abs(out[:, :30].squeeze(-2) - reference(x, indices)[:, :30]).max().item() <= 1e-5


def greedy_tokens(model, prompt: list[int], ops) -> list[int]:
    """Four greedy tokens with the kernel set `ops`. A routed twin must give the twins' tokens
    exactly; the default set's GPU kernels round otherwise, which flips a bfloat16 near-tie of
    these tiny checkpoints."""
    from mlx_gemma4 import generate_tokens

    model.use_kernels(ops)
    return list(generate_tokens(model, prompt, max_tokens=4, stop_ids=[]))


def test_quantized_projections_and_tied_head_take_the_kernel_sets_matmul(checkpoints):
    """Every quantized projection and the tied 4-bit LM head go through `ops.quantized_matmul`
    (where a kernel set can put qmv), and the tokens stay those of MLX's own QuantizedLinear."""
    import dataclasses

    import mlx.nn as nn

    from mlx_gemma4.kernels import TWINS, qmv_ref
    from mlx_gemma4.model import QuantizedLinear

    model = checkpoints.model("ple_shared", quantize_bits=4)
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and all(type(m) is QuantizedLinear for m in quantized)
    assert isinstance(model.embed_tokens, nn.QuantizedEmbedding) and "lm_head" not in model
    prompt = checkpoints.prompt("ple_shared", 9, seed=3)[0].tolist()
    expected = greedy_tokens(model, prompt, TWINS)
    shapes = []

    def counted(x, w, *rest):
        shapes.append(w.shape[0])
        return qmv_ref(x, w, *rest)

    assert greedy_tokens(model, prompt, dataclasses.replace(TWINS, quantized_matmul=counted)) == expected
    assert model.config.vocab_size in shapes  # the tied head
    assert len(shapes) >= len(quantized)


def kv_shared_layers(config) -> int:
    """How many layers read another's cache: a prompt's last row alone runs them (generate.prefill)."""
    return sum(spec.kv_source != i for i, spec in enumerate(config.layers))


@pytest.mark.parametrize("quantize_bits", [None, 4])
def test_decode_gated_projections_take_the_kernel_sets_gated_qmv(checkpoints, quantize_bits):
    """At decode, the MLP's down projection and the PLE projection take `ops.gated_qmv` (gelu_gate
    and the product in one launch) with their dense or quantized weights, prompt chunks keep the
    two ops, and the tokens stay those of the plain path."""
    import dataclasses

    from mlx_gemma4.kernels import TWINS, gated_qmv_ref

    model = checkpoints.model("ple_shared", dtype="bfloat16", quantize_bits=quantize_bits)
    prompt = checkpoints.prompt("ple_shared", 12, seed=4)[0].tolist()
    expected = greedy_tokens(model, prompt, TWINS)
    calls = []

    def counted(gate, up, up_offset, w, scales, *rest):
        calls.append((gate.shape[1], w.shape[0], up_offset, up is None, scales is None))
        return gated_qmv_ref(gate, up, up_offset, w, scales, *rest)

    assert greedy_tokens(model, prompt, dataclasses.replace(TWINS, gated_qmv=counted)) == expected
    config = model.config
    ple = config.hidden_size_per_layer_input
    assert {rows for rows, *_ in calls} == {1}
    downs = [call for call in calls if call[3]]  # the gate|up halves of one array
    assert {dense for *_, dense in downs} == {quantize_bits is None}
    # Each layer's PLE projection reads its own columns, and every step runs every layer's two;
    # so does the prompt's last row in the KV-shared layers, which it alone runs.
    assert {offset for _, _, offset, halves, _ in calls if not halves} == {i * ple for i in range(len(model.layers))}
    steps = len(downs) - kv_shared_layers(config)
    assert len(calls) == 2 * len(downs) and steps % len(model.layers) == 0 and steps >= len(model.layers)


@pytest.mark.parametrize("quantize_bits", [None, 4])
def test_decode_sub_blocks_end_in_the_kernel_sets_gated_qmv_norm_residual(checkpoints, quantize_bits):
    """At decode, a PLE layer's feed-forward block (no layer_scalar, no next norm) and PLE block
    (layer_scalar, the next layer's input norm) end in `ops.gated_qmv_norm_residual`, which takes
    the projection and its norm_residual in one launch; the tokens stay those of the two ops."""
    import dataclasses

    from mlx_gemma4.kernels import TWINS, gated_qmv_norm_residual_ref

    model = checkpoints.model("ple_shared", dtype="bfloat16", quantize_bits=quantize_bits)
    prompt = checkpoints.prompt("ple_shared", 12, seed=4)[0].tolist()
    expected = greedy_tokens(model, prompt, TWINS)
    calls = []

    def counted(gate, up, up_offset, *operands_and_norm):
        *_, weight, residual, scale, eps, next_weight = operands_and_norm
        calls.append((up is None, scale is not None, next_weight is not None, residual.shape))
        return gated_qmv_norm_residual_ref(gate, up, up_offset, *operands_and_norm)

    assert greedy_tokens(model, prompt, dataclasses.replace(TWINS, gated_qmv_norm_residual=counted)) == expected
    downs = [call for call in calls if call[0]]
    assert downs and {call[1:3] for call in downs} == {(False, False)}
    assert {call[1:3] for call in calls if not call[0]} == {(True, True)}
    # Every step runs every layer's two, and the prompt's last row the KV-shared layers'.
    steps = len(downs) - kv_shared_layers(model.config)
    assert len(calls) == 2 * len(downs) and steps % len(model.layers) == 0
    assert {shape for *_, shape in calls} == {(1, 1, model.config.hidden_size)}


# Quantized in float32: on the CPU the model hands its quantized products float32 inputs, as the twin does there.
@pytest.mark.parametrize("name,dtype,quantize_bits",
                         [("ple_shared", "bfloat16", None), ("ple_shared", "float32", 4), ("moe", "float32", 4)])
def test_decode_attention_blocks_end_in_the_kernel_sets_qmv_norm_residual(checkpoints, name, dtype, quantize_bits):
    """At decode, every layer's attention block ends in `ops.qmv_norm_residual`: o_proj and the
    post-attention norm_residual in one launch, with the feed-forward block's input norm (a MoE
    layer's three); prompt chunks take o_proj and norm_residual apart. Tokens stay the two ops'."""
    import dataclasses

    from mlx_gemma4.kernels import TWINS, qmv_norm_residual_ref

    model = checkpoints.model(name, dtype=dtype, quantize_bits=quantize_bits)
    prompt = checkpoints.prompt(name, 12, seed=4)[0].tolist()
    expected = greedy_tokens(model, prompt, TWINS)
    calls = []

    def counted(x, w, scales, *rest):
        *_, scale, eps, next_weight = rest
        calls.append((x.shape, scales is None, scale is None, len(next_weight)))
        return qmv_norm_residual_ref(x, w, scales, *rest)

    assert greedy_tokens(model, prompt, dataclasses.replace(TWINS, qmv_norm_residual=counted)) == expected
    config = model.config
    next_norms = 3 if config.enable_moe_block else 1
    assert {call[1:] for call in calls} == {(quantize_bits is None, True, next_norms)}
    # The heads' outputs of every layer kind, one row each.
    widths = {config.num_attention_heads * layer.head_dim for layer in config.layers}
    assert {shape for shape, *_ in calls} == {(1, 1, width) for width in widths}
    # Every step runs every layer's, and the prompt's last row the KV-shared layers'.
    steps = len(calls) - kv_shared_layers(config)
    assert steps % len(model.layers) == 0 and steps >= len(model.layers)


# Quantized in float32: on the CPU the model hands its quantized products float32 inputs, as the twin does there.
@pytest.mark.parametrize("dtype,quantize_bits", [("bfloat16", None), ("float32", 4)])
def test_ple_layers_end_their_feed_forward_with_the_ple_gate_in_gated_qmv_norm_residual_qmv(checkpoints, dtype,
                                                                                             quantize_bits):
    """At decode, a PLE layer's feed-forward end (no layer_scalar, no next norm) and its PLE gate
    come from one `ops.gated_qmv_norm_residual_qmv` call; the tokens stay those of the two ops."""
    import dataclasses

    from mlx_gemma4.kernels import TWINS, gated_qmv_norm_residual_qmv_ref

    model = checkpoints.model("ple_shared", dtype=dtype, quantize_bits=quantize_bits)
    prompt = checkpoints.prompt("ple_shared", 12, seed=4)[0].tolist()
    expected = greedy_tokens(model, prompt, TWINS)
    calls = []

    def counted(gate, up, up_offset, w, scales, *rest):
        *_, scale, eps, then = rest
        calls.append((gate.shape[:2], up is None, scales is None, scale is None, then[0].shape[0]))
        return gated_qmv_norm_residual_qmv_ref(gate, up, up_offset, w, scales, *rest)

    assert greedy_tokens(model, prompt, dataclasses.replace(TWINS, gated_qmv_norm_residual_qmv=counted)) == expected
    config = model.config
    assert set(calls) == {((1, 1), True, quantize_bits is None, True, config.hidden_size_per_layer_input)}
    # Every step runs every layer's, and the prompt's last row the KV-shared layers'.
    steps = len(calls) - kv_shared_layers(config)
    assert steps % len(model.layers) == 0 and steps >= len(model.layers)


# Quantized in float32: on the CPU the model hands its quantized products float32 inputs, as the twin does there.
@pytest.mark.parametrize("name,dtype,quantize_bits",
                         [("ple_shared", "float32", 4), ("k_eq_v", "float32", 4), ("ple_shared", "bfloat16", None)])
def test_quantized_mlps_leave_gate_up_through_qmv_gelu_and_project_its_x(checkpoints, name, dtype, quantize_bits):
    """At decode, a quantized MLP's gate|up projection and gelu_gate are one `ops.qmv_gelu` call,
    and its down projection reads that x as it is: `ops.qmv_norm_residual_qmv` with a PLE layer's
    gate, `ops.qmv_norm_residual` elsewhere. Dense weights keep the gated path. Tokens stay the twins'."""
    import collections
    import dataclasses

    from mlx_gemma4.kernels import TWINS, qmv_gelu_ref, qmv_norm_residual_qmv_ref, qmv_norm_residual_ref

    model = checkpoints.model(name, dtype=dtype, quantize_bits=quantize_bits)
    prompt = checkpoints.prompt(name, 12, seed=4)[0].tolist()
    expected = greedy_tokens(model, prompt, TWINS)
    calls = collections.Counter()

    def counted(label, twin):
        def call(*operands):
            calls[label] += 1
            return twin(*operands)
        return call

    ops = dataclasses.replace(TWINS, qmv_gelu=counted("gelu", qmv_gelu_ref),
                              qmv_norm_residual_qmv=counted("end then", qmv_norm_residual_qmv_ref),
                              qmv_norm_residual=counted("end", qmv_norm_residual_ref))
    assert greedy_tokens(model, prompt, ops) == expected
    if quantize_bits is None:
        assert calls["gelu"] == calls["end then"] == 0 and calls["end"] > 0  # o_proj's alone
        return
    # Every step runs every layer's, and the prompt's last row the KV-shared layers'.
    steps = calls["gelu"] - kv_shared_layers(model.config)
    assert steps % len(model.layers) == 0 and steps >= len(model.layers)
    if model.config.hidden_size_per_layer_input:
        assert calls["end then"] == calls["gelu"]
    else:  # each layer's o_proj and down projection
        assert calls["end then"] == 0 and calls["end"] == 2 * calls["gelu"]


@pytest.mark.parametrize("name,dtype,quantize_bits", [("ple_shared", "bfloat16", None), ("k_eq_v", "float32", 4)])
def test_decode_heads_come_from_the_kernel_sets_qmv_rope_norm(checkpoints, name, dtype, quantize_bits):
    """In a compiled decode step every layer's heads come from `ops.qmv_rope_norm`: the q|k|v
    projection and rope_norm in one launch, K and V into the cache slot, a KV-shared layer's
    queries alone; prompt chunks take the two ops. Tokens stay the two ops'."""
    import dataclasses

    from mlx_gemma4.kernels import TWINS, qmv_rope_norm_ref

    model = checkpoints.model(name, dtype=dtype, quantize_bits=quantize_bits)
    prompt = checkpoints.prompt(name, 12, seed=4)[0].tolist()
    expected = greedy_tokens(model, prompt, TWINS)
    calls = []

    def counted(x, w, scales, *rest):
        num_kv_heads, k_eq_v, into = rest[-3:]
        calls.append((x.shape, scales is None, num_kv_heads, k_eq_v, into is not None))
        return qmv_rope_norm_ref(x, w, scales, *rest)

    assert greedy_tokens(model, prompt, dataclasses.replace(TWINS, qmv_rope_norm=counted)) == expected
    config = model.config
    owners = [layer for i, layer in enumerate(config.layers) if layer.kv_source == i]
    kinds = {(layer.num_kv_heads, layer.k_eq_v, True) for layer in owners}
    kinds |= {(0, False, False)} if len(owners) < len(config.layers) else set()
    assert {call[1:] for call in calls} == {(quantize_bits is None, *kind) for kind in kinds}
    assert {shape for shape, *_ in calls} == {(1, 1, config.hidden_size)}
    # Every step runs every layer's, and the prompt's last row the KV-shared layers'.
    steps = len(calls) - kv_shared_layers(config)
    assert steps % len(model.layers) == 0 and steps >= len(model.layers)


def test_quantized_matmuls_take_float32_inputs_on_the_cpu(checkpoints, monkeypatch):
    """On MLX's CPU back end a bfloat16 model hands its quantized projections, tied head and
    experts float32 inputs (8x faster there) and keeps its dtype; elsewhere they take bfloat16."""
    import dataclasses

    from mlx_gemma4 import model as model_module
    from mlx_gemma4.kernels import TWINS, qmv_ref

    model = checkpoints.model("moe", dtype="bfloat16", quantize_bits=4)
    projection_inputs, expert_inputs = [], []

    def recorded(x, *rest):
        projection_inputs.append(x.dtype)
        return qmv_ref(x, *rest)

    def recorded_experts(linear, x, *rest, product=model_module.gather_product, **options):
        expert_inputs.append(x.dtype)
        return product(linear, x, *rest, **options)

    model.use_kernels(dataclasses.replace(TWINS, quantized_matmul=recorded))
    monkeypatch.setattr(model_module, "gather_product", recorded_experts)
    prompt = mx.array(checkpoints.prompt("moe", 5, seed=1))
    for on_cpu, inputs in ((True, mx.float32), (False, mx.bfloat16)):
        monkeypatch.setattr(model_module, "runs_on_cpu", lambda: on_cpu)
        projection_inputs.clear(), expert_inputs.clear()
        assert model(prompt).dtype == mx.bfloat16
        assert set(projection_inputs) == set(expert_inputs) == {inputs}


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_product_equals_quantized_matmul(bits):
    import mlx.nn as nn

    from mlx_gemma4.model import dequantized_product

    table = nn.QuantizedLinear(128, 96, bias=False, group_size=32, bits=bits)
    x = mx.random.normal((1, 300, 128), key=mx.random.key(2))
    expected = mx.quantized_matmul(x, table.weight, table.scales, table.biases, True, 32, bits)
    out = dequantized_product(table, x)
    assert out.shape == expected.shape == (1, 300, 96)
    assert mx.abs(out - expected).max().item() <= 1e-4


def test_long_quantized_prompt_chunks_take_the_dequantized_product_on_cuda(monkeypatch):
    """From DEQUANTIZE_MIN_ROWS rows, and on CUDA only, a quantized projection multiplies its
    dequantized weight instead of calling the kernel set's quantized matmul, but not inside
    quantized_products_only."""
    import dataclasses

    import mlx.nn as nn

    from mlx_gemma4.kernels import TWINS, qmv_ref
    from mlx_gemma4.model import DEQUANTIZE_MIN_ROWS, QuantizedLinear, quantized_products_only

    calls = []

    def counted(x, *rest):
        calls.append(x.shape[1])
        return qmv_ref(x, *rest)

    layer = nn.QuantizedLinear(128, 64, bias=False, group_size=32, bits=4)
    layer.__class__, layer.ops = QuantizedLinear, dataclasses.replace(TWINS, quantized_matmul=counted)
    rows = DEQUANTIZE_MIN_ROWS[4]
    x = mx.random.normal((1, rows, 128), key=mx.random.key(3))
    expected = qmv_ref(x, layer.weight, layer.scales, layer.biases, 32, 4)
    assert mx.abs(layer(x) - expected).max().item() <= 1e-4 and calls == [rows] * (not mx.cuda.is_available())
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    calls.clear()
    assert mx.abs(layer(x) - expected).max().item() <= 1e-4 and calls == []
    layer(x[:, : rows - 1])
    assert calls == [rows - 1]
    with quantized_products_only():  # as a compiled prompt is traced
        layer(x)
    assert calls == [rows - 1, rows]
    layer(x)
    assert calls == [rows - 1, rows]


def test_linear_multiplies_its_kept_transposed_view_until_the_weight_changes():
    import io

    from mlx_gemma4.model import Linear

    layer = Linear(16, 8, bias=False)
    x = mx.random.normal((1, 3, 16))
    mx.eval(layer.parameters(), x)
    layer.keep_transposed()
    assert "_weight_t" in layer and list(layer.parameters()) == ["weight"]
    graph = io.StringIO()
    mx.export_to_dot(graph, layer(x))
    assert "Transpose" not in graph.getvalue() and "Flatten" not in graph.getvalue()
    assert mx.allclose(layer(x), x @ layer.weight.T)
    layer.weight = mx.random.normal((8, 16))  # as load_weights and fuse_projections replace it
    assert "_weight_t" not in layer and mx.allclose(layer(x), x @ layer.weight.T)


def test_prefill_hands_layers_over_on_a_gpu_and_waits_only_past_the_queued_byte_limit(checkpoints, monkeypatch):
    import mlx_gemma4.model as model_module

    model = checkpoints.model("ple_shared")
    ids = mx.array(checkpoints.prompt("ple_shared", 12, seed=4))
    owners = next(i for i, layer in enumerate(model.config.layers) if layer.kv_source != i)
    waits, evaluate = [], mx.eval
    monkeypatch.setattr(mx, "eval", lambda *arrays: (waits.append(len(arrays)), evaluate(*arrays)))
    monkeypatch.setattr(model_module, "queues_layers", lambda: True)  # as on a GPU
    model.prefill(ids, model.make_cache())
    assert waits == []  # a tiny model's layers stay far below QUEUED_BYTES
    monkeypatch.setattr(model_module, "QUEUED_BYTES", -(1 << 62))  # below any change in held bytes
    model.prefill(ids, model.make_cache())
    assert len(waits) == owners  # once past the limit, after every layer queued
    monkeypatch.setattr(model_module, "queues_layers", lambda: False)  # as on MLX's CPU back end
    waits.clear()
    model.prefill(ids, model.make_cache())
    assert waits == []
