"""SamplingOptions: range checks, updates, and the checkpoint's recommended defaults."""

from __future__ import annotations

import json

import pytest

from mlx_gemma4.sampling import SamplingOptions, checkpoint_sampling


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_context_size=0), "repetition_context_size"),
    ],
)
def test_out_of_range_values_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**bad)


def test_updated_applies_only_given_values():
    base = SamplingOptions(temperature=1.0, top_k=64)
    assert base.updated(top_k=None, top_p=0.5) == SamplingOptions(temperature=1.0, top_k=64, top_p=0.5)


def test_repetition_penalty_of_one_adds_no_processor():
    assert SamplingOptions(repetition_penalty=1.0).logits_processors() == []
    assert len(SamplingOptions(repetition_penalty=1.3).logits_processors()) == 1


def test_checkpoint_defaults_come_from_generation_config(tmp_path):
    assert checkpoint_sampling(tmp_path) == SamplingOptions()  # no file: greedy
    config = {"do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95, "min_p": None}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert checkpoint_sampling(tmp_path) == SamplingOptions(temperature=1.0, top_k=64, top_p=0.95)
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    assert checkpoint_sampling(tmp_path) == SamplingOptions()
