"""KV caches: one per cache-owning layer (KV-shared layers read their source layer's).

Positions are counted in storage slots: slot p holds the p-th token of every batch row. Rows
that are left-padded have `left_padding[b]` padding slots first, so their token positions (what
RoPE sees) are `p - left_padding[b]`, and slots below `left_padding[b]` are masked out.

Each cache builds the attention mask for the keys it is about to return, from its state
BEFORE the update, so the model builds one mask per layer type and shares it across layers.
Masks are boolean [B or 1, 1, L, S] arrays, the string "causal", or None (attend to all).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

from .errors import Gemma4Error

ALLOC_STEP = 256  # slots added per growth; amortises the copy when a buffer grows
DEFAULT_SLIDING_HEADROOM = 256  # extra ring slots: how far back a wrapped sliding cache can trim


def _grow(buffer: mx.array | None, like: mx.array, slots: int) -> mx.array:
    """Return `buffer` extended to `slots` slots on axis 2, or a new one shaped after `like`."""
    B, H, _, D = like.shape
    extra = mx.zeros((B, H, slots - (0 if buffer is None else buffer.shape[2]), D), like.dtype)
    return extra if buffer is None else mx.concatenate([buffer, extra], axis=2)


class _PaddedCache(_BaseCache):
    def __init__(self, left_padding: list[int] | mx.array | None = None):
        self.keys = self.values = None
        self.offset = 0  # slots written
        self.left_padding = None if left_padding is None else mx.array(left_padding, dtype=mx.int32)

    def rope_offset(self) -> int | mx.array:
        """Token position of the next slot, per row when rows are left-padded."""
        return self.offset if self.left_padding is None else self.offset - self.left_padding

    def _padding_mask(self, key_slots: mx.array) -> mx.array:
        return key_slots[None, None, None, :] >= self.left_padding[:, None, None, None]

    def _finish_mask(self, mask: mx.array | None, key_slots: mx.array) -> mx.array | None:
        if self.left_padding is None:
            return mask
        padding = self._padding_mask(key_slots)
        return padding if mask is None else mask & padding

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def _allocated_after(self, end: int) -> int:
        """Slots the buffers will have once positions up to `end` are stored."""
        allocated = 0 if self.keys is None else self.keys.shape[2]
        return allocated if end <= allocated else (end + ALLOC_STEP - 1) // ALLOC_STEP * ALLOC_STEP

    def _ensure_slots(self, like: mx.array, end: int):
        """Grow the buffers (shaped after `like` when there are none) to `_allocated_after(end)`."""
        slots = self._allocated_after(end)
        if self.keys is None or slots > self.keys.shape[2]:
            self.keys, self.values = _grow(self.keys, like, slots), _grow(self.values, like, slots)


class KVCache(_PaddedCache):
    """Full-attention cache: every token, in order, in buffers that grow by ALLOC_STEP."""

    def make_mask(self, length: int) -> mx.array | str | None:
        if self.left_padding is None:
            # One query sees every key; "causal" is bottom-right aligned in fast SDPA.
            return None if length == 1 else "causal"
        end = self.offset + length
        key_slots = mx.arange(end)
        if length == 1:
            return self._finish_mask(None, key_slots)
        query_slots = mx.arange(self.offset, end)[:, None]
        return self._finish_mask(key_slots[None, :] <= query_slots, key_slots)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        end = self.offset + keys.shape[2]
        self._ensure_slots(keys, end)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trimmable(self) -> int:
        return self.offset

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def snapshot(self) -> int:
        # Writes only ever land at or past `offset`, so the offset alone marks this point.
        return self.offset

    def restore(self, snapshot: int):
        self.offset = snapshot

    def to_saved(self) -> tuple[dict, dict]:
        arrays = dict(zip(("keys", "values"), self.state))
        return arrays, {"kind": "full", "offset": self.offset}

    @classmethod
    def from_saved(cls, arrays: dict, meta: dict, left_padding=None) -> "KVCache":
        cache = cls(left_padding)
        if arrays:
            cache.keys, cache.values, cache.offset = arrays["keys"], arrays["values"], meta["offset"]
        return cache


class SlidingKVCache(_PaddedCache):
    """Sliding-window ring buffer that stays exact after it wraps and can still be trimmed.

    Position p lives in slot p % capacity, capacity = window + headroom. A query at position q
    sees keys q-window+1 .. q (transformers' `kv > q - W`). The headroom keeps older tokens, so
    up to `headroom` + 1 tokens can be trimmed (speculative rollback, prompt-cache reuse) even
    after the ring has wrapped. `lowest` is the oldest position still held.
    """

    def __init__(self, window: int, headroom: int = DEFAULT_SLIDING_HEADROOM, left_padding=None):
        super().__init__(left_padding)
        self.window = window
        self.capacity = window + headroom
        self.lowest = 0

    def _recent_start(self) -> int:
        """First position new queries can see: the W-1 tokens before the next one."""
        return max(self.lowest, self.offset - (self.window - 1))

    def _slot_positions(self, newest: int, slots: int) -> mx.array:
        """Position held by each slot once `newest` is written (stale slots come out < lowest)."""
        slot = mx.arange(slots)
        return newest - mx.remainder(newest - slot, self.capacity)

    def make_mask(self, length: int) -> mx.array | None:
        if length == 1:
            newest = self.offset
            slots = self._allocated_after(newest + 1)
            if slots < self.capacity:
                # Growth phase: update_and_fetch returns exactly the window, in order: no mask
                # keeps fast SDPA on its fused single-query path.
                if self.left_padding is None:
                    return None
                return self._finish_mask(None, mx.arange(max(0, newest + 1 - self.window), newest + 1))
            key_slots = self._slot_positions(newest, slots)
            lowest_after = max(self.lowest, newest + 1 - self.capacity)
            mask = (key_slots >= lowest_after) & (key_slots > newest - self.window)
            return self._finish_mask(mask[None, None, None, :], key_slots)
        key_slots = mx.arange(self._recent_start(), self.offset + length)
        query_slots = mx.arange(self.offset, self.offset + length)[:, None]
        mask = (key_slots[None, :] <= query_slots) & (key_slots[None, :] > query_slots - self.window)
        return self._finish_mask(mask[None, None], key_slots)

    def _allocated_after(self, end: int) -> int:
        allocated = 0 if self.keys is None else self.keys.shape[2]
        # A ring stops growing at its capacity: slot p % capacity holds position p.
        return max(allocated, min(self.capacity, super()._allocated_after(end)))

    def _ordered(self, buffer: mx.array, start: int, stop: int) -> mx.array:
        """Slots holding positions start..stop-1 (fewer than capacity), in position order."""
        first, count = start % self.capacity, stop - start
        if first + count <= self.capacity:
            return buffer[..., first : first + count, :]
        return mx.concatenate([buffer[..., first:, :], buffer[..., : first + count - self.capacity, :]], axis=2)

    def _store(self, keys: mx.array, values: mx.array, first_position: int):
        """Write consecutive positions first_position.. into their ring slots."""
        count = keys.shape[2]
        slot = first_position % self.capacity
        head = min(count, self.capacity - slot)
        self.keys[..., slot : slot + head, :] = keys[..., :head, :]
        self.values[..., slot : slot + head, :] = values[..., :head, :]
        if head < count:
            self.keys[..., : count - head, :] = keys[..., head:, :]
            self.values[..., : count - head, :] = values[..., head:, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        end = self.offset + length
        if length == 1:
            self._ensure_slots(keys, end)
            self._store(keys, values, self.offset)
            self.offset, self.lowest = end, max(self.lowest, end - self.capacity)
            if self.keys.shape[2] < self.capacity:
                start = max(0, end - self.window)
                return self.keys[..., start:end, :], self.values[..., start:end, :]
            return self.keys, self.values
        # Several tokens: attend over the W-1 previous tokens plus the new ones, in order.
        start = self._recent_start()
        if self.keys is not None and start < self.offset:
            keys = mx.concatenate([self._ordered(self.keys, start, self.offset), keys], axis=2)
            values = mx.concatenate([self._ordered(self.values, start, self.offset), values], axis=2)
        self._ensure_slots(keys, end)
        kept = min(length, self.capacity)
        self._store(keys[..., -kept:, :], values[..., -kept:, :], end - kept)
        self.offset, self.lowest = end, max(self.lowest, end - self.capacity)
        return keys, values

    def trimmable(self) -> int:
        """Tokens that can be removed while the window behind the new end stays complete."""
        floor = 0 if self.lowest == 0 else self.lowest + self.window - 1
        return max(0, self.offset - floor)

    def trim(self, n: int) -> int:
        n = min(n, self.trimmable())
        self.offset -= n
        return n

    @property
    def state(self):
        return [] if self.keys is None else (self.keys, self.values)

    def snapshot(self) -> tuple:
        # Copies, made now: decode may write the ring's slots in place (kernels.rope_norm), which
        # a second handle to the same buffer would see.
        buffers = () if self.keys is None else _copied((self.keys, self.values))
        return buffers, self.offset, self.lowest

    def restore(self, snapshot: tuple):
        buffers, self.offset, self.lowest = snapshot
        self.keys, self.values = _copied(buffers) if buffers else (None, None)  # the snapshot stays as taken

    def to_saved(self) -> tuple[dict, dict]:
        arrays = dict(zip(("keys", "values"), self.state))
        meta = {"kind": "sliding", "offset": self.offset, "lowest": self.lowest}
        return arrays, {**meta, "window": self.window, "capacity": self.capacity}

    @classmethod
    def from_saved(cls, arrays: dict, meta: dict, left_padding=None) -> "SlidingKVCache":
        cache = cls(meta["window"], meta["capacity"] - meta["window"], left_padding)
        if arrays:
            cache.keys, cache.values = arrays["keys"], arrays["values"]
            cache.offset, cache.lowest = meta["offset"], meta["lowest"]
        return cache


def _copied(buffers: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
    copies = tuple(mx.array(b) for b in buffers)
    mx.async_eval(copies)  # queued before any later step's writes
    return copies


class StepView:
    """A cache as one compiled single-token step sees it.

    Buffers keep a fixed shape and the position is an array, so one traced graph serves every
    step: the new K/V are scattered in at the array position, and the mask is computed from it.
    The slot layout is the caches' own, so results are written straight back.
    """

    def __init__(self, cache: _PaddedCache, keys: mx.array, values: mx.array, position: mx.array, lowest: mx.array):
        self.keys, self.values, self.position, self.lowest = keys, values, position, lowest
        self.capacity = getattr(cache, "capacity", None)  # a ring for sliding layers
        self.window = getattr(cache, "window", None)

    @staticmethod
    def prepare(cache: _PaddedCache):
        """Give a filled `cache` room for one more token, by the cache's own growth rule:
        attention reads every slot of the buffer, so a ring grows to its capacity only as tokens come."""
        cache._ensure_slots(cache.keys, cache.offset + 1)

    @staticmethod
    def commit(cache: _PaddedCache, buffers: tuple[mx.array, mx.array] | None):
        """Advance `cache` by the step's token; `buffers`: the step's new K/V buffers, None where
        rope_norm wrote into the cache's own."""
        if buffers is not None:
            cache.keys, cache.values = buffers
        cache.offset += 1
        if isinstance(cache, SlidingKVCache):
            cache.lowest = max(cache.lowest, cache.offset - cache.capacity)

    def rope_offset(self) -> mx.array:
        return self.position

    def make_mask(self, length: int) -> mx.array:
        slots = mx.arange(self.keys.shape[2])
        if self.capacity is None:
            return (slots <= self.position)[None, None, None, :]
        held = self.position - mx.remainder(self.position - slots, self.capacity)  # position in each slot
        return ((held >= self.lowest) & (held > self.position - self.window))[None, None, None, :]

    def step_slot(self) -> tuple[mx.array, mx.array, mx.array]:
        """(keys buffer, values buffer, slot) for `rope_norm(..., into=)`, which writes the new
        K and V there; `store` takes the buffers it returns."""
        slot = self.position if self.capacity is None else mx.remainder(self.position, self.capacity)
        return self.keys, self.values, slot

    def store(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


PROMPT_CACHE_FORMAT = "mlx_gemma4.prompt_cache"
PROMPT_CACHE_VERSION = 1
_CACHE_KINDS = {"full": KVCache, "sliding": SlidingKVCache}


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """One conversation's KV caches and the tokens they hold, reused from turn to turn.

    A new prompt keeps the longest prefix the caches share with it and computes only the rest.
    Rewinding a wrapped sliding ring reaches back only `headroom` tokens, and the chat template
    drops a reply's thoughts from the history, so each turn also keeps a snapshot of the caches
    at the point where the next turn's prompt will part from this one.
    """

    def __init__(self, model, caches: list | None = None, tokens: list[int] | None = None):
        self.model = model
        self.caches = model.make_cache() if caches is None else caches
        self.tokens = list(tokens or [])  # tokens fed so far; the caches hold the first `offset`
        self._snapshot: tuple[int, list] | None = None

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    def held_tokens(self) -> list[int]:
        return self.tokens[: self.offset]

    def reuse(self, prompt: list[int]) -> int:
        """Rewind to the longest prefix of `prompt` the caches can keep; returns its length.

        At least the last prompt token is always left to compute: it yields the next logits.
        """
        held = self.held_tokens()
        keep = min(common_prefix_length(held, prompt), len(prompt) - 1)
        drop = len(held) - keep
        if drop and all(c.trimmable() >= drop for c in self.caches):
            for c in self.caches:
                c.trim(drop)
        elif drop and self._snapshot is not None and self._snapshot[0] <= keep:
            keep, states = self._snapshot
            for c, state in zip(self.caches, states):
                c.restore(state)
        elif drop:
            keep, self.caches = 0, self.model.make_cache()
        if self._snapshot is not None and self._snapshot[0] > keep:
            self._snapshot = None  # the slots it relied on are about to be rewritten
        self.tokens = list(prompt[:keep])
        return keep

    def take_snapshot(self):
        """Remember the caches as they are now, for `reuse` to return to."""
        self._snapshot = (self.offset, [c.snapshot() for c in self.caches])

    def save(self, path: str | Path, metadata: dict[str, str] | None = None):
        """Write caches and tokens to one safetensors file (atomically; no snapshot)."""
        arrays, metas = {}, []
        for i, c in enumerate(self.caches):
            state, meta = c.to_saved()
            arrays.update({f"{i}.{name}": value for name, value in state.items()})
            metas.append(meta)
        header = {
            "format": PROMPT_CACHE_FORMAT,
            "version": str(PROMPT_CACHE_VERSION),
            "model": model_fingerprint(self.model),
            "tokens": json.dumps(self.held_tokens()),
            "caches": json.dumps(metas),
            **(metadata or {}),
        }
        path = Path(path)
        staging = path.with_name(path.name + ".partial.safetensors")
        mx.save_safetensors(str(staging), arrays, metadata=header)
        os.replace(staging, path)

    @classmethod
    def load(cls, path: str | Path, model) -> tuple["PromptCache", dict[str, str]]:
        """Read a saved prompt cache for `model`; returns it and the file's metadata."""
        try:
            arrays, header = mx.load(str(path), return_metadata=True)
        except Exception as exc:
            raise Gemma4Error(f"cannot read prompt cache {path}: {exc}") from None
        if header.get("format") != PROMPT_CACHE_FORMAT or header.get("version") != str(PROMPT_CACHE_VERSION):
            raise Gemma4Error(f"{path} is not a mlx_gemma4 prompt cache (version {PROMPT_CACHE_VERSION})")
        if header.get("model") != model_fingerprint(model):
            raise Gemma4Error(f"{path} was saved for a different model; it cannot be reused with this one")
        caches = []
        for i, meta in enumerate(json.loads(header["caches"])):
            state = {name: arrays[f"{i}.{name}"] for name in ("keys", "values") if f"{i}.{name}" in arrays}
            caches.append(_CACHE_KINDS[meta["kind"]].from_saved(state, meta))
        return cls(model, caches, json.loads(header["tokens"])), header


def model_fingerprint(model) -> str:
    """Identifies the layer geometry a cache was built for (not the weights)."""
    table = json.dumps(model.config.to_dict(), sort_keys=True)
    return hashlib.sha256(table.encode()).hexdigest()[:16]
