"""generate_tokens: stopping, limits, sampling options, reproducibility, cache reuse."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_gemma4 import generate_tokens

NAME = "k_eq_v"


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints.model(NAME)


@pytest.fixture(scope="module")
def prompt(checkpoints):
    return checkpoints.prompt(NAME, 12, seed=20)[0].tolist()


def test_empty_stop_list_runs_to_max_tokens(model, prompt):
    assert len(list(generate_tokens(model, prompt, max_tokens=17, stop_ids=[]))) == 17


def test_generation_ends_on_a_stop_id_and_yields_it(model, prompt):
    greedy = list(generate_tokens(model, prompt, max_tokens=10, stop_ids=[]))
    stop = greedy[3]
    first_stop = greedy.index(stop)
    assert list(generate_tokens(model, prompt, max_tokens=10, stop_ids=[stop])) == greedy[: first_stop + 1]


def test_default_stops_include_end_of_turn_tokens(model, prompt):
    greedy = list(generate_tokens(model, prompt, max_tokens=40, stop_ids=[]))
    default = list(generate_tokens(model, prompt, max_tokens=40))
    cut = next((i for i, t in enumerate(greedy) if t in (1, 106, 50)), None)
    assert default == (greedy if cut is None else greedy[: cut + 1])


def test_sampling_is_reproducible_with_a_seed(model, prompt):
    options = dict(max_tokens=20, temperature=1.0, top_p=0.9, stop_ids=[])
    first = list(generate_tokens(model, prompt, seed=3, **options))
    assert first == list(generate_tokens(model, prompt, seed=3, **options))
    others = [list(generate_tokens(model, prompt, seed=s, **options)) for s in (4, 5, 6)]
    assert any(o != first for o in others)


def test_top_k_one_is_greedy(model, prompt):
    greedy = list(generate_tokens(model, prompt, max_tokens=12, stop_ids=[]))
    assert list(generate_tokens(model, prompt, max_tokens=12, temperature=1.0, top_k=1, seed=0, stop_ids=[])) == greedy


def test_greedy_decoding_takes_the_argmax_of_the_logits_without_normalising(model, prompt, monkeypatch):
    """Greedy tokens are the logits' argmax, found with no logsumexp over the vocabulary (a
    reduction and a subtraction a token); sampling still normalises."""
    greedy = list(generate_tokens(model, prompt, max_tokens=6, stop_ids=[]))
    logits = model(mx.array(prompt)[None])[:, -1]
    assert greedy[0] == mx.argmax(logits, axis=-1).item()
    calls = []
    logsumexp = mx.logsumexp
    monkeypatch.setattr(mx, "logsumexp", lambda *a, **k: calls.append(1) or logsumexp(*a, **k))
    assert list(generate_tokens(model, prompt, max_tokens=6, stop_ids=[])) == greedy
    assert not calls
    list(generate_tokens(model, prompt, max_tokens=6, temperature=1.0, seed=0, stop_ids=[]))
    assert len(calls) == 6


def test_passed_cache_is_extended_for_the_next_turn(model, prompt):
    """Continuing on the returned cache equals generating from the whole history at once."""
    cache = model.make_cache()
    reply = list(generate_tokens(model, prompt, max_tokens=5, stop_ids=[], cache=cache))
    assert cache[0].offset == len(prompt) + len(reply) - 1  # the last token is not fed yet
    follow = [reply[-1], 7, 9]
    continued = list(generate_tokens(model, follow, max_tokens=6, stop_ids=[], cache=cache))
    assert continued == list(generate_tokens(model, prompt + reply[:-1] + follow, max_tokens=6, stop_ids=[]))


@pytest.mark.parametrize("bad", [[], [[1, 2]]])
def test_bad_prompts_are_rejected(model, bad):
    with pytest.raises(ValueError, match="prompt_ids"):
        list(generate_tokens(model, bad, max_tokens=3))


def test_chunk_size_does_not_change_tokens(model, prompt):
    whole = list(generate_tokens(model, prompt, max_tokens=8, stop_ids=[]))
    assert list(generate_tokens(model, prompt, max_tokens=8, stop_ids=[], prefill_step_size=5)) == whole
    assert mx.array(whole).dtype == mx.int32


def test_min_p_near_one_is_greedy(model, prompt):
    greedy = list(generate_tokens(model, prompt, max_tokens=12, stop_ids=[]))
    sampled = list(generate_tokens(model, prompt, max_tokens=12, temperature=1.0, min_p=0.999, seed=1, stop_ids=[]))
    assert sampled == greedy


def test_repetition_penalty_stops_greedy_loops(model, prompt):
    greedy = list(generate_tokens(model, prompt, max_tokens=40, stop_ids=[]))
    assert len(set(greedy)) < len(greedy)  # random weights settle into a loop
    penalised = list(generate_tokens(model, prompt, max_tokens=40, repetition_penalty=1e4, stop_ids=[]))
    assert len(set(penalised)) == len(penalised)


@pytest.mark.parametrize("headroom", [3, 256])
def test_compiled_decode_step_equals_the_plain_step(checkpoints, headroom):
    """Past a full-cache growth (256 slots) and many ring wraps, the compiled step gives the
    plain step's logits and leaves the caches in the same state."""
    import numpy as np

    from mlx_gemma4.generate import CompiledDecode, prefill

    model = checkpoints.model("ple_shared")
    prompt = mx.array(checkpoints.prompt("ple_shared", 9, seed=30))
    plain, compiled = model.make_cache(sliding_headroom=headroom), model.make_cache(sliding_headroom=headroom)
    prefill(model, prompt, plain, 4)
    prefill(model, prompt, compiled, 4)
    step = CompiledDecode.for_model(model)
    worst = 0.0
    for token in np.random.RandomState(0).randint(3, 256, size=260).tolist():
        expected = model(mx.array([[token]]), plain)[:, -1]
        worst = max(worst, mx.abs(step(mx.array([[token]]), compiled) - expected).max().item())
    assert worst <= 1e-4
    assert [c.offset for c in compiled] == [c.offset for c in plain]
    # The caches stay usable by the plain path (prompt reuse, trimming, prefill of a next turn).
    follow = mx.array([[5, 6, 7]])
    assert mx.abs(model(follow, compiled) - model(follow, plain)).max().item() <= 1e-4


def test_each_forward_pass_shares_launch_buffers_of_its_own(checkpoints, monkeypatch):
    """The kernels' launches in one forward pass share their arrival counters and scratch
    (kernels._source.shared_launch_buffers); two passes never do, as two passes evaluated together
    run their launches at once on CUDA. A compiled step's trace makes them constants of its graph."""
    from mlx_gemma4.generate import CompiledDecode
    from mlx_gemma4.kernels import _source

    model = checkpoints.model("ple_shared")
    seen = []
    layer_type = type(model.layers[0])
    run_layer = layer_type.__call__

    def recording(layer, *args, **kwargs):
        seen.append(_source._shared)
        return run_layer(layer, *args, **kwargs)

    monkeypatch.setattr(layer_type, "__call__", recording)
    cache = model.make_cache()
    passes = []
    for run in (lambda: model(mx.array([[5, 6, 7, 8]]), cache),
                lambda: model(mx.array([[9]]), cache),
                lambda: CompiledDecode(model)(mx.array([[10]]), cache)):
        seen.clear()
        run()
        assert len(seen) >= len(model.layers) and all(shared is seen[0] for shared in seen)
        passes.append(seen[0])
    assert len({id(shared) for shared in passes}) == 3 and None not in passes
    assert [shared.traced for shared in passes] == [False, False, True]
    assert _source._shared is None


@pytest.mark.parametrize("length", [9, 12])  # last chunks of 1 and 4 tokens
def test_prompt_last_token_runs_in_the_last_chunk_not_a_decode_step(checkpoints, length):
    """The last prompt token rides in the last chunk (the weights read once for it): no decode
    step runs, and the logits and caches are the whole model's (KV-shared layers, window of 6)."""
    from mlx_gemma4.generate import prefill

    model = checkpoints.model("ple_shared")
    model._compiled_decode = None
    cache = model.make_cache()
    prompt = mx.array(checkpoints.prompt("ple_shared", length, seed=31))
    logits = prefill(model, prompt, cache, 4)
    assert model._compiled_decode is None
    assert mx.abs(logits - model(prompt)[:, -1]).max().item() <= 1e-4
    follow = mx.array([[5, 6]])
    expected = model(mx.concatenate([prompt, follow], axis=1))[:, -2:]
    assert mx.abs(model(follow, cache) - expected).max().item() <= 1e-4


@pytest.mark.parametrize("name", ["ple_shared", "k_eq_v"])
@pytest.mark.parametrize("length", [1, 11, 64, 200, 300, 512])
@pytest.mark.parametrize("headroom", [3, 256])
def test_compiled_prompt_gives_the_plain_prompts_logits_and_caches(checkpoints, monkeypatch, name, length, headroom):
    """A prompt padded to its bucket (sliding window shorter than it from 11 tokens on, rings
    shorter than the bucket with headroom 3) gives the logits of the plain fill and step, and
    leaves the caches it leaves: same offsets and K/V."""
    from mlx_gemma4 import generate
    from mlx_gemma4.generate import CompiledPrompt, prefill

    monkeypatch.setattr(generate, "runs_on_cpu", lambda: False)  # it runs on GPUs only
    model = checkpoints.model(name)
    prompt = mx.array(checkpoints.prompt(name, length, seed=32))
    compiled, plain = model.make_cache(sliding_headroom=headroom), model.make_cache(sliding_headroom=headroom)
    assert CompiledPrompt.applies_to(model, prompt, compiled)
    logits = CompiledPrompt.for_model(model)(prompt, compiled)
    monkeypatch.setattr(CompiledPrompt, "applies_to", staticmethod(lambda *args: False))
    assert mx.abs(logits - prefill(model, prompt, plain, 512)).max().item() <= 1e-4
    assert [c.offset for c in compiled] == [c.offset for c in plain] == [length] * len(plain)
    for ours, theirs in zip(compiled, plain):
        for a, b in zip(ours.state, theirs.state):
            # 1e-4 as for the logits: a GPU's GEMM over a padded bucket of rows sums in another
            # order than over the prompt's (H100, p=200: 2.8e-5 on K/V of magnitude 2).
            assert a.shape == b.shape and mx.abs(a - b).max().item() <= 1e-4
    follow = mx.array([[5, 6, 7]])
    assert mx.abs(model(follow, compiled) - model(follow, plain)).max().item() <= 1e-4


def test_compiled_prompt_takes_only_short_prompts_into_empty_caches_of_unpadded_models_on_a_gpu(
    checkpoints, monkeypatch
):
    import dataclasses

    from mlx_gemma4 import generate
    from mlx_gemma4.generate import CompiledPrompt, prefill
    from mlx_gemma4.model import HOST_BOUND_MAX_HIDDEN

    model = checkpoints.model("ple_shared")
    prompt = mx.array(checkpoints.prompt("ple_shared", 9, seed=33))
    cache = model.make_cache()
    assert CompiledPrompt.applies_to(model, prompt, cache) is (mx.default_device() != mx.cpu)
    monkeypatch.setattr(generate, "runs_on_cpu", lambda: False)
    assert CompiledPrompt.applies_to(model, prompt, cache)
    longest = mx.zeros((1, CompiledPrompt.MAX_TOKENS), mx.int32)
    assert CompiledPrompt.applies_to(model, longest, cache)
    assert not CompiledPrompt.applies_to(model, mx.concatenate([longest, prompt], axis=1), cache)
    quantized = checkpoints.model("ple_shared", quantize_bits=4)
    assert CompiledPrompt.applies_to(quantized, longest, quantized.make_cache())
    assert not CompiledPrompt.applies_to(model, mx.concatenate([prompt, prompt]), cache)  # two rows
    assert not CompiledPrompt.applies_to(model, prompt, model.make_cache(left_padding=[0]))
    moe = checkpoints.model("moe")
    assert CompiledPrompt.applies_to(moe, prompt, moe.make_cache())
    config = model.config
    model.config = dataclasses.replace(config, hidden_size=HOST_BOUND_MAX_HIDDEN + 1)  # the 31B's regime
    assert not CompiledPrompt.applies_to(model, prompt, cache)
    model.config = config
    model._compiled_prompt = None
    prefill(model, prompt, cache, 4)  # longer than a chunk: plain
    assert model._compiled_prompt is None and cache[0].offset == prompt.shape[1]
    assert not CompiledPrompt.applies_to(model, prompt, cache)  # the caches hold tokens now
    prefill(model, prompt, model.make_cache(), 512)
    assert isinstance(model._compiled_prompt, CompiledPrompt)


def test_compiled_prompt_queues_one_cache_owner_at_a_time_each_while_the_one_before_runs(checkpoints, monkeypatch):
    """Each cache owner's K/V is queued, then the host waits for the owner before it: the device
    never holds more than two layers' queued buffers. The plain fill's logits all the same."""
    from mlx_gemma4 import generate
    from mlx_gemma4.generate import CompiledPrompt

    monkeypatch.setattr(generate, "runs_on_cpu", lambda: False)
    model = checkpoints.model("ple_shared")
    prompt = mx.array(checkpoints.prompt("ple_shared", 40, seed=35))
    cache = model.make_cache()
    calls = []
    queue, wait = mx.async_eval, mx.eval
    monkeypatch.setattr(mx, "async_eval", lambda *arrays: (calls.append(("queue", arrays)), queue(*arrays)))
    monkeypatch.setattr(mx, "eval", lambda *arrays: (calls.append(("wait", arrays)), wait(*arrays)))
    compiled, queued_outputs = CompiledPrompt.for_model(model), []
    compiled_queue = compiled._queue

    def kept_queue(*args):
        queued_outputs.append(compiled_queue(*args))
        return queued_outputs[-1]

    monkeypatch.setattr(compiled, "_queue", kept_queue)
    logits = compiled(prompt, cache)
    monkeypatch.undo()
    assert [kind for kind, _ in calls] == ["queue", "wait"] * len(cache)
    queued, waited = calls[0::2], calls[1::2]
    assert waited[0][1] == ([],)
    for (_, before), (_, waited_for) in zip(queued, waited[1:]):
        assert waited_for[0] is before[0]
    outputs = queued_outputs[0]
    segments = [segment for _, (segment,) in queued]
    assert all(a is b for a, b in zip(segments, [*outputs[2][1:], outputs], strict=True))  # owners' K/V, the rest
    assert mx.abs(logits - model(prompt)[:, -1]).max().item() <= 1e-4


@pytest.mark.parametrize("length", [11, 64, 200, 500])
def test_compiled_prompt_of_a_moe_model_groups_the_experts_rows_without_the_host(checkpoints, monkeypatch, length):
    """The experts take fixed-capacity blocks that leave the padding out: the plain fill's
    logits and caches. A bucket whose prompt overflows an expert gets more room."""
    from mlx_gemma4 import generate
    from mlx_gemma4 import model as model_module
    from mlx_gemma4.generate import CompiledPrompt, prefill

    monkeypatch.setattr(generate, "runs_on_cpu", lambda: False)
    monkeypatch.setattr(model_module, "groups_experts_by_block", lambda: True)  # CUDA's expert path
    model = checkpoints.model("moe")
    model._compiled_prompt = None
    prompt = mx.array(checkpoints.prompt("moe", length, seed=34))
    compiled, plain = model.make_cache(), model.make_cache()
    logits = CompiledPrompt.for_model(model)(prompt, compiled)
    expected = model(prompt, plain)[:, -1]
    assert mx.abs(logits - expected).max().item() <= 1e-4
    for ours, theirs in zip(compiled, plain):
        for a, b in zip(ours.state, theirs.state):
            assert a.shape == b.shape and mx.abs(a - b).max().item() <= 1e-5

    # Room for a quarter of an even share overflows: the prompt runs again with more, the same logits.
    monkeypatch.setattr(generate, "EXPERT_CAPACITY_FACTOR", 0.25)
    model._compiled_prompt = None
    cache = model.make_cache()
    assert mx.abs(prefill(model, prompt, cache, 512) - expected).max().item() <= 1e-4
    assert [c.offset for c in cache] == [length] * len(cache)
    bucket = -(-length // CompiledPrompt.BUCKET) * CompiledPrompt.BUCKET
    assert model._compiled_prompt.capacity_factors[bucket] >= 0.5 and model._compiled_prompt.checks_overflow

    # Metal's expert path (SwitchGLU) has no room to overflow: no flag is read, the same logits.
    monkeypatch.setattr(model_module, "groups_experts_by_block", lambda: False)
    model._compiled_prompt = None
    assert mx.abs(CompiledPrompt.for_model(model)(prompt, model.make_cache()) - expected).max().item() <= 1e-4
    assert not model._compiled_prompt.checks_overflow and not model._compiled_prompt.capacity_factors


def test_compiled_prompt_and_step_keep_no_cache_after_they_return(checkpoints, monkeypatch):
    """A cache the caller drops is freed at once: neither compiled graph holds on to the caches
    it last filled (a finished chat's K/V would stay until the next prompt or step)."""
    import gc
    import weakref

    from mlx_gemma4 import generate
    from mlx_gemma4.generate import CompiledDecode, CompiledPrompt

    monkeypatch.setattr(generate, "runs_on_cpu", lambda: False)
    model = checkpoints.model("ple_shared")
    cache = model.make_cache()
    mx.eval(CompiledPrompt.for_model(model)(mx.array(checkpoints.prompt("ple_shared", 9, seed=36)), cache))
    mx.eval(CompiledDecode.for_model(model)(mx.array([[5]]), cache))
    dropped = [weakref.ref(c) for c in cache]
    del cache
    gc.collect()
    assert all(ref() is None for ref in dropped)


def test_compiled_decode_step_writes_the_caches_in_place(checkpoints):
    """The step's graph holds the only reference to each cache buffer, so the new K/V slot is
    written in place: a step over two 64 MB buffers allocates less than one of them. Attention's
    scores over the buffer's slots are the step's largest transient (10.5 MB on the CPU, 28.2 on
    the H100, where MLX's attention runs unfused at head_dim 32); a copy would be 64 MB."""
    from mlx_gemma4.cache import KVCache
    from mlx_gemma4.generate import CompiledDecode, prefill

    model = checkpoints.model("ple_shared")
    cache = model.make_cache()
    prefill(model, mx.array(checkpoints.prompt("ple_shared", 9, seed=3)), cache, 4)
    full = next(c for c in cache if isinstance(c, KVCache))
    buffer_bytes = 64 << 20
    slots = buffer_bytes // (full.keys.shape[1] * full.keys.shape[3] * 4)
    full.keys, full.values = (mx.concatenate([b, mx.zeros((1, b.shape[1], slots, b.shape[3]))], axis=2)
                              for b in (full.keys, full.values))
    mx.eval(full.keys, full.values)
    step = CompiledDecode.for_model(model)
    mx.eval(step(mx.array([[5]]), cache))  # trace outside the measurement
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(step(mx.array([[6]]), cache))
    assert mx.get_peak_memory() - before < buffer_bytes


def test_use_kernels_reaches_every_layer_and_the_compiled_step(checkpoints):
    import dataclasses

    from mlx_gemma4.kernels import TWINS, norm_residual_ref

    model = checkpoints.model("ple_shared")
    prompt = checkpoints.prompt("ple_shared", 9, seed=8)[0].tolist()
    expected = list(generate_tokens(model, prompt, max_tokens=6, stop_ids=[]))
    calls = []

    def counted(*args):
        calls.append(1)
        return norm_residual_ref(*args)

    model.use_kernels(dataclasses.replace(TWINS, norm_residual=counted))
    assert list(generate_tokens(model, prompt, max_tokens=6, stop_ids=[])) == expected
    # Three sub-block ends per layer in the last prompt token's forward and in the traced
    # decode step (plus the prompt's cache-filling layers).
    assert len(calls) >= 2 * 3 * len(model.layers)


def test_compiled_decode_applies_to_unpadded_rows_up_to_the_hidden_limit_or_with_qmv(checkpoints):
    import dataclasses

    from mlx_gemma4.generate import CompiledDecode
    from mlx_gemma4.kernels import TWINS, qmv_ref
    from mlx_gemma4.model import HOST_BOUND_MAX_HIDDEN

    model = checkpoints.model("ple_shared")
    assert CompiledDecode.applies_to(model, model.make_cache())
    assert not CompiledDecode.applies_to(model, model.make_cache(left_padding=[2, 0]))
    model.config = dataclasses.replace(model.config, hidden_size=HOST_BOUND_MAX_HIDDEN + 1)
    assert not CompiledDecode.applies_to(model, model.make_cache())
    # A wide model whose quantized projections take a kernel other than MLX's qmv runs compiled.
    quantized = checkpoints.model("ple_shared", quantize_bits=4)
    quantized.config = dataclasses.replace(quantized.config, hidden_size=HOST_BOUND_MAX_HIDDEN + 1)
    quantized.use_kernels(TWINS)
    assert not CompiledDecode.applies_to(quantized, quantized.make_cache())
    quantized.use_kernels(dataclasses.replace(TWINS, quantized_matmul=lambda *args: qmv_ref(*args)))
    assert CompiledDecode.applies_to(quantized, quantized.make_cache())
    model.use_kernels(dataclasses.replace(TWINS, quantized_matmul=lambda *args: qmv_ref(*args)))
    assert not CompiledDecode.applies_to(model, model.make_cache())  # nothing quantized for it to speed up


def test_compiled_prompt_multiplies_quantized_weights_where_a_plain_fill_dequantizes_them(checkpoints, monkeypatch):
    """On CUDA a plain 300-token chunk multiplies dequantized weights; the compiled prompt, whose
    queued layers would each hold theirs, keeps the quantized products (model.quantized_products_only)."""
    from mlx_gemma4 import generate, model as model_module
    from mlx_gemma4.generate import CompiledPrompt, prefill

    dequantized = []

    def counted(table, x):
        dequantized.append(x.shape[1])
        return plain_product(table, x)

    plain_product = model_module.dequantized_product
    monkeypatch.setattr(model_module, "dequantized_product", counted)
    monkeypatch.setattr(generate, "runs_on_cpu", lambda: False)
    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "0")  # the twins: this CPU can build no CUDA kernel
    model = checkpoints.model("ple_shared", quantize_bits=4)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    prompt = mx.array(checkpoints.prompt("ple_shared", 300, seed=34))
    compiled = model.make_cache()
    logits = CompiledPrompt.for_model(model)(prompt, compiled)
    assert dequantized == []
    monkeypatch.setattr(CompiledPrompt, "applies_to", staticmethod(lambda *args: False))
    assert mx.abs(logits - prefill(model, prompt, model.make_cache(), 512)).max().item() <= 1e-4
    assert dequantized and set(dequantized) == {300}  # the cache owners, over every position
