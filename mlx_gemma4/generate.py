"""Token generation: chunked prefill, then a decode loop that keeps the device busy."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import KVCache, PromptCache, StepView, _PaddedCache, common_prefix_length
from .channels import ChannelParser, Event
from .errors import Gemma4Error
from .kernels._source import shared_launch_buffers
from .model import (
    EXPERT_CAPACITY_FACTOR, HOST_BOUND_MAX_HIDDEN, ExpertRows, Model, quantized_products_only, runs_on_cpu,
)
from .sampling import SamplingOptions

# <eos>, <turn|> and <|tool_response>: a turn ends on any of them (reference section 3.2).
DEFAULT_STOP_IDS = (1, 106, 50)


def prefill(model: Model, prompt: mx.array, cache: list, step_size: int) -> mx.array:
    """Feed `prompt` [B, L] in chunks of `step_size`; logits of the last position, [B, vocab].

    All but the last chunk only fill the caches. In the last, the KV-shared layers and the LM
    head run on the last position alone, so nothing is computed for positions whose outputs no
    one reads, and the weights are read once for the chunk (the last token as a decode step of
    its own read them again: 31B 4-bit, H100, p=128: 72.5 against 91.6 ms to the first token).
    """
    if step_size < 1:
        raise ValueError("prefill_step_size must be at least 1")
    if prompt.shape[1] <= step_size and CompiledPrompt.applies_to(model, prompt, cache):
        return CompiledPrompt.for_model(model)(prompt, cache)
    last_chunk = (prompt.shape[1] - 1) // step_size * step_size
    prefill_only(model, prompt[:, :last_chunk], cache, step_size)
    return model.last_logits(prompt[:, last_chunk:], cache)


def prefill_only(model: Model, prompt: mx.array, cache: list, step_size: int):
    """Write all of `prompt` [B, L] into `cache`, in chunks of `step_size`, computing no logits.

    The last chunk is left running: the host goes on to queue the next step while the device
    fills (E4B 4-bit, H100, p=128: 28.8 against 33.0 ms to the first token).
    """
    for start in range(0, prompt.shape[1], step_size):
        model.prefill(prompt[:, start : start + step_size], cache)
        (mx.eval if start + step_size < prompt.shape[1] else mx.async_eval)([c.state for c in cache])


class FillView:
    """An empty cache as a compiled prompt sees it: the fresh cache's masks, and the chunk's K/V
    handed back as they are (CompiledPrompt stores them in the real caches afterwards)."""

    def __init__(self, empty: _PaddedCache):
        self.empty = empty
        self.keys = self.values = None

    def rope_offset(self) -> int:
        return 0

    def make_mask(self, length: int):
        return self.empty.make_mask(length)

    def last_token_mask(self, position: mx.array) -> mx.array:
        """The mask of one query at `position` over this chunk's keys (padding past it included)."""
        return StepView(self.empty, self.keys, self.values, position, mx.zeros((1,), mx.int32)).make_mask(1)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


class CompiledPrompt:
    """A prompt into empty caches through one `mx.compile`d graph per length bucket: every
    position fills the caches, and the last alone runs the KV-shared layers and the LM head.

    On a GPU a prompt to a model up to HOST_BOUND_MAX_HIDDEN wide is bound by the host building
    its graphs, as decode is. To the first token at p=512 (H100), against a plain fill: E2B bf16
    9.6 against 18.0 ms, E2B 4-bit 9.1 against 14.3, E4B bf16 12.6 against 20.0, E4B 4-bit 19.0
    against 25.3, 26B-A4B 4-bit 76.4 against 98.3 (p=128: E2B bf16 7.0 against 11.2). Prompts
    are padded at the end to a multiple of BUCKET tokens, so one trace (20-70 ms) serves BUCKET
    lengths: causal attention keeps the padding out of every real position's K/V and logits,
    the experts' grouping leaves it out (model.ExpertRows), and only the real positions are
    stored. Longer prompts run plain, as do the 31B (98 against 112 ms at p=128, but 5 s for
    the first call) and the CPU, where a compiled fill measured no faster and its first call per
    bucket took seconds (e2b-mini, 2 cores).

    The host queues a compiled graph faster than the device runs it, and the device holds each
    queued buffer until it is done with it: at p=512, queued at once, E4B 4-bit held 3.1 GB over
    its weights (it multiplies dequantized weights) and 26B-A4B 10.2, where their plain fills
    held 0.6 and 0.5. So the graph goes to the device one cache-owning layer at a time, each
    queued while the one before runs, never further ahead (`_queue`): 0.6 and 1.2 GB, and no
    slower than queued at once (E2B bf16 0.12 GB, the plain fill 0.08). Its products stay
    quantized (model.quantized_products_only): E4B 4-bit 0.2 GB, its prompt 26 against 20 ms.
    """

    BUCKET = 64
    MAX_TOKENS = 512

    def __init__(self, model: Model):
        self.model = model
        self._cache: list = []  # the caches being filled; their kinds and windows shape the graph
        self._prompt = mx.compile(self._traced)
        self.capacity_factors: dict[int, float] = {}  # per bucket: the experts' room (model.ExpertRows)
        # Whether the traced graph flags expert overflows (CUDA's grouped experts; set by the
        # trace): only then is the flag read, a wait on the host.
        self.checks_overflow = False

    @staticmethod
    def for_model(model: Model) -> "CompiledPrompt":
        if not isinstance(getattr(model, "_compiled_prompt", None), CompiledPrompt):
            model._compiled_prompt = CompiledPrompt(model)
        return model._compiled_prompt

    @staticmethod
    def applies_to(model: Model, prompt: mx.array, cache: list) -> bool:
        return (
            not runs_on_cpu()
            and model.config.hidden_size <= HOST_BOUND_MAX_HIDDEN
            and CompiledDecode.applies_to(model, cache)
            and prompt.shape[0] == 1
            and prompt.shape[1] <= CompiledPrompt.MAX_TOKENS
            and all(c.empty() for c in cache)
        )

    @shared_launch_buffers(traced=True)
    @quantized_products_only()
    def _traced(self, tokens: mx.array, last: mx.array, capacity_factor: float):
        # A ring longer than the chunk, whatever the real caches' headroom: FillView's buffers are
        # linear (slot p holds position p), which the ring's slot arithmetic reads right only then.
        views = [FillView(type(c)() if isinstance(c, KVCache) else type(c)(c.window, tokens.shape[1]))
                 for c in self._cache]
        config = self.model.config
        rows = ExpertRows.for_chunk(config, tokens.shape[1], last, capacity_factor) if config.enable_moe_block else None
        logits = self.model.last_logits(tokens, views, last, rows)
        self.checks_overflow = rows is not None and bool(rows.overflows)
        overflowed = mx.stack(rows.overflows).any() if self.checks_overflow else mx.array(False)
        return logits, overflowed, [(v.keys, v.values) for v in views]

    def _queue(self, tokens: mx.array, last: mx.array, capacity_factor: float):
        """The compiled graph's outputs, queued on the device up to each cache owner's K/V in
        turn: queueing one waits for the one before, so at most two layers' buffers are held."""
        outputs = self._prompt(tokens, last, capacity_factor)
        _, _, filled = outputs
        running = []
        for segment in filled[1:] + [outputs]:
            mx.async_eval(segment)
            mx.eval(running)  # already queued: waits for it
            running = segment
        return outputs

    def __call__(self, prompt: mx.array, cache: list) -> mx.array:
        """Logits [1, vocab] of the last position of `prompt` [1, L]; fills the empty `cache`."""
        length = prompt.shape[1]
        padded = -(-length // self.BUCKET) * self.BUCKET
        self._cache = cache
        last = mx.array([length - 1], dtype=mx.int32)
        tokens = mx.pad(prompt, ((0, 0), (0, padded - length)))
        while True:
            factor = self.capacity_factors.get(padded, EXPERT_CAPACITY_FACTOR)
            logits, overflowed, filled = self._queue(tokens, last, factor)
            # An expert routed more rows than it had room for: again with twice the room, which
            # ends by room for every row (random-weight 26B-A4B, p=64: 4 times the share was short).
            if not (self.checks_overflow and overflowed.item()):
                break
            self.capacity_factors[padded] = 2 * factor
        self._cache = []  # traced: a dropped cache's buffers are freed now, not at the next prompt
        for c, (keys, values) in zip(cache, filled):
            c.update_and_fetch(keys[..., :length, :], values[..., :length, :])
        return logits


class CompiledDecode:
    """Single-token decode steps through one `mx.compile`d graph per buffer size.

    Decode is bound by per-operation overhead, not bytes: compiling the whole step fuses the
    elementwise work and replays the graph without Python. Buffers grow outside the graph
    (a retrace every ALLOC_STEP tokens on full-attention caches); positions are arrays.
    """

    def __init__(self, model: Model):
        self.model = model
        model.keep_transposed_weights()  # fewer graph nodes per step (model.Linear)
        model.keep_scalars_off_the_small_pool()
        self._cache: list = []  # the caches being traced; their kinds and windows shape the graph
        self._replaced: list[int] = []  # set by each trace
        self._step = mx.compile(self._traced)

    @staticmethod
    def for_model(model: Model) -> "CompiledDecode":
        if not isinstance(getattr(model, "_compiled_decode", None), CompiledDecode):
            model._compiled_decode = CompiledDecode(model)
        return model._compiled_decode

    @staticmethod
    def applies_to(model: Model, cache: list) -> bool:
        # Per-row positions (left padding) take the plain path, and so do models whose
        # operations are long enough that host overhead no longer dominates (Model.compiles_decode).
        return model.compiles_decode() and all(c.left_padding is None for c in cache)

    @shared_launch_buffers(traced=True)
    def _traced(self, token, position, lowest, buffers):
        views = [StepView(c, keys, values, position, lowest) for c, (keys, values) in zip(self._cache, buffers)]
        logits = self.model(token, views)[:, -1]
        # Caches whose buffers the step replaced; the others took the new K/V in place (rope_norm).
        # The same for every trace of one model and kernel set.
        self._replaced = [i for i, (v, (keys, _)) in enumerate(zip(views, buffers)) if v.keys is not keys]
        return logits, [(views[i].keys, views[i].values) for i in self._replaced]

    def __call__(self, token: mx.array, cache: list) -> mx.array:
        """Logits [1, vocab] for `token` [1, 1]; advances `cache` (already prefilled) by one."""
        for c in cache:
            StepView.prepare(c)
        self._cache = cache
        position = mx.array([cache[0].offset], dtype=mx.int32)
        # Every sliding cache sees the same writes, so one `lowest` serves them all.
        lowest = mx.array([max(getattr(c, "lowest", 0) for c in cache)], dtype=mx.int32)
        logits, buffers = self._step(token, position, lowest, [(c.keys, c.values) for c in cache])
        self._cache = []  # traced: a dropped cache's buffers are freed now, not at the next step
        replaced = dict(zip(self._replaced, buffers))
        for i, c in enumerate(cache):
            StepView.commit(c, replaced.get(i))
        return logits


def decode_step(model: Model, cache: list) -> Callable[[mx.array, list], mx.array]:
    """`step(token [B, 1], cache) -> logits [B, vocab]`: the compiled step where it applies to
    these caches (once they hold a token: it grows buffers shaped after them), else the model."""
    if cache[0].keys is not None and CompiledDecode.applies_to(model, cache):
        return CompiledDecode.for_model(model)
    return lambda token, c: model(token, c)[:, -1]


def _token_stream(
    model: Model,
    new_ids: list[int],
    cache: list,
    *,
    context: list[int],
    options: SamplingOptions,
    max_tokens: int,
    stops: set[int],
    prefill_step_size: int,
) -> Iterator[int]:
    """Feed `new_ids` after `context` (already in `cache`), then yield sampled tokens."""
    if max_tokens <= 0:
        return
    sampler, processors = options.sampler(), options.logits_processors()
    history = mx.array(context + new_ids, dtype=mx.int32) if processors else None
    if options.seed is not None:
        mx.random.seed(options.seed)

    def sample(logits: mx.array) -> mx.array:
        nonlocal history
        for process in processors:
            logits = process(history, logits)
        # The argmax needs no log-probabilities: their logsumexp and subtraction over 262,144
        # logits took 41 us a token under ncu on an H100 (E2B's whole step: 3 ms), and two nodes.
        token = sampler(logits if options.greedy else logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        if processors:
            history = mx.concatenate([history, token])
        return token

    token = sample(prefill(model, mx.array(new_ids, dtype=mx.int32)[None], cache, prefill_step_size))
    mx.async_eval(token)
    step = decode_step(model, cache)
    for produced in range(1, max_tokens + 1):
        if produced < max_tokens:  # queue the next step before reading this token back
            next_token = sample(step(token[:, None], cache))
            mx.async_eval(next_token)
        value = token.item()
        yield value
        if value in stops or produced == max_tokens:
            return
        token = next_token


def stop_ids_for(model: Model, stop_ids: Sequence[int] | None) -> set[int]:
    """`None`: <eos>, <turn|>, <|tool_response> and the config's eos ids; else exactly `stop_ids`."""
    return set(DEFAULT_STOP_IDS) | set(model.config.eos_token_ids) if stop_ids is None else set(stop_ids)


def generate_tokens(
    model: Model,
    prompt_ids: Sequence[int] | mx.array,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    prefill_step_size: int = 512,
    stop_ids: Sequence[int] | None = None,
    cache: list | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids, the stop token included when one is hit.

    Greedy at temperature 0. `stop_ids=None` stops on <eos>, <turn|>, <|tool_response>
    and the config's eos ids; `stop_ids=[]` never stops early. A passed `cache` is extended.
    """
    prompt = mx.array(prompt_ids, dtype=mx.int32)
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt_ids must be a non-empty 1-D sequence of token ids")
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    options = SamplingOptions(temperature, top_p, top_k, min_p, repetition_penalty, seed=seed)
    yield from _token_stream(
        model,
        prompt.tolist(),
        model.make_cache() if cache is None else cache,
        context=[],
        options=options,
        max_tokens=max_tokens,
        stops=stop_ids_for(model, stop_ids),
        prefill_step_size=prefill_step_size,
    )


class _StopStrings:
    """Cuts streamed text at the first user stop string, holding back a possible partial one."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = [s for s in stop_strings if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string ended the reply."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def close(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Stats:
    """How one reply went. `reused_tokens` prompt tokens came from the prompt cache."""

    prompt_tokens: int
    reused_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    time_to_first_token: float
    peak_memory_gb: float
    finish_reason: str  # "stop" (stop token or string) or "length"
    channel: str = "stats"


@dataclass
class Reply:
    answer: str
    thought: str
    tool_calls: list[Event] = field(default_factory=list)
    stats: Stats | None = None


def _prompt_ids(tokenizer, messages_or_prompt, tools, enable_thinking) -> tuple[list[int], int]:
    """Prompt ids, and where the next turn's prompt will part from them (a snapshot point)."""
    if isinstance(messages_or_prompt, mx.array):
        messages_or_prompt = messages_or_prompt.tolist()
    if isinstance(messages_or_prompt, (list, tuple)) and all(isinstance(t, int) for t in messages_or_prompt):
        ids = list(messages_or_prompt)
        return ids, len(ids)
    messages = messages_or_prompt
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    render = dict(tools=tools, enable_thinking=enable_thinking)
    ids = tokenizer.apply_chat_template(messages, **render)
    # The template drops a reply's thoughts from history: the next prompt matches this one
    # only up to where the reply's history form starts.
    history = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "."}], add_generation_prompt=False, **render
    )
    return ids, common_prefix_length(ids, history)


def stream_generate(
    model: Model,
    tokenizer,
    messages_or_prompt,
    *,
    max_tokens: int = 2048,
    enable_thinking: bool = False,
    tools: list[dict] | None = None,
    stop_strings: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = 512,
    **sampling,
) -> Iterator[Event | Stats]:
    """Yield the reply as channel events (thought / answer / tool_call), then one `Stats`.

    `messages_or_prompt`: chat messages, a user message as a string, or token ids used as is.
    `sampling`: temperature, top_p, top_k, min_p, repetition_penalty, seed (greedy by default).
    Pass the same `prompt_cache` on every turn of a conversation to compute only new tokens.
    """
    options = SamplingOptions(**sampling)
    ids, parting = _prompt_ids(tokenizer, messages_or_prompt, tools, enable_thinking)
    context = model.config.max_position_embeddings
    if not ids:
        raise Gemma4Error("the prompt is empty")
    if len(ids) >= context:
        raise Gemma4Error(f"the prompt is {len(ids)} tokens; this model's context is {context}")
    max_tokens = min(max_tokens, context - len(ids))
    keeper = PromptCache(model) if prompt_cache is None else prompt_cache

    stops = stop_ids_for(model, stop_ids)
    mx.reset_peak_memory()
    start = time.perf_counter()
    reused = first = keeper.reuse(ids)
    snapshot_at = min(parting, len(ids) - 1)
    if prompt_cache is not None and snapshot_at > reused:
        prefill_only(model, mx.array(ids[reused:snapshot_at], dtype=mx.int32)[None], keeper.caches, prefill_step_size)
        keeper.take_snapshot()
        first = snapshot_at
    tokens = _token_stream(
        model,
        ids[first:],
        keeper.caches,
        context=ids[:first],
        options=options,
        max_tokens=max_tokens,
        stops=stops,
        prefill_step_size=prefill_step_size,
    )
    detokenizer, parser, stopper = tokenizer.detokenizer(), ChannelParser(), _StopStrings(stop_strings)
    generated, finish, first_token_at = [], "length", None
    try:
        for token in tokens:
            first_token_at = first_token_at or time.perf_counter()
            generated.append(token)
            if token in stops:
                finish = "stop"
                break
            detokenizer.add_token(token)
            text, stopped = stopper.feed(detokenizer.last_segment)
            yield from parser.feed(text)
            if stopped:
                finish = "stop"
                break
        detokenizer.finalize()
        text, stopped = stopper.feed(detokenizer.last_segment)
        if stopped:
            finish = "stop"
        yield from parser.feed(text + ("" if stopped else stopper.close()))
        yield from parser.close()
    finally:
        tokens.close()
        keeper.tokens = ids + generated
    end = time.perf_counter()
    first_token_at = first_token_at or end
    yield Stats(
        prompt_tokens=len(ids),
        reused_tokens=reused,
        prompt_tps=(len(ids) - reused) / max(first_token_at - start, 1e-9),
        generation_tokens=len(generated),
        generation_tps=(len(generated) - 1) / (end - first_token_at) if len(generated) > 1 else 0.0,
        time_to_first_token=first_token_at - start,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
    )


def generate(model: Model, tokenizer, messages_or_prompt, **options) -> Reply:
    """The whole reply of `stream_generate` (same arguments): answer, thought, tool calls, stats."""
    reply = Reply(answer="", thought="")
    for item in stream_generate(model, tokenizer, messages_or_prompt, **options):
        if isinstance(item, Stats):
            reply.stats = item
        elif item.channel == "tool_call":
            reply.tool_calls.append(item)
        elif item.channel == "thought":
            reply.thought += item.text
        else:
            reply.answer += item.text
    return reply


from ._callable import make_module_callable  # noqa: E402  (needs `generate` defined above)

make_module_callable(__name__, "generate")
