"""Sampling options, checked once, turned into mlx-lm's samplers and logits processors."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from mlx_lm.sample_utils import make_logits_processors, make_sampler


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen. The defaults are greedy (temperature 0)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None

    def __post_init__(self):
        problems = {
            "temperature must be >= 0": self.temperature < 0,
            "top_p must be in (0, 1]": not 0 < self.top_p <= 1,
            "top_k must be >= 0 (0 keeps every token)": self.top_k < 0,
            "min_p must be in [0, 1)": not 0 <= self.min_p < 1,
            "repetition_penalty must be > 0": self.repetition_penalty is not None and self.repetition_penalty <= 0,
            "repetition_context_size must be >= 1": self.repetition_context_size < 1,
        }
        for message, failed in problems.items():
            if failed:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        """Temperature 0: mlx-lm's sampler takes the argmax, whatever the other options say."""
        return self.temperature == 0

    def sampler(self):
        """logprobs [B, V] -> token ids [B]; a greedy one takes raw logits as well (the same argmax)."""
        return make_sampler(temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self) -> list:
        """Processors (tokens so far, logits) -> logits, applied before sampling."""
        if self.repetition_penalty in (None, 1.0):
            return []
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty, repetition_context_size=self.repetition_context_size
        )

    def updated(self, **changes) -> "SamplingOptions":
        """A copy with the non-None `changes` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def checkpoint_sampling(model_dir: str | Path) -> SamplingOptions:
    """The sampling the checkpoint's generation_config.json recommends (greedy if it has none).

    Gemma 4 ships temperature 1.0, top_k 64, top_p 0.95 (reference section 3.2).
    """
    file = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return SamplingOptions()
    if not config.get("do_sample", False):
        return SamplingOptions()
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return SamplingOptions(**{k: config[k] for k in names if config.get(k) is not None})
