"""SamplingParams: validation names the bad field, the ``stop`` alias, and the presets."""

from __future__ import annotations

import math

import pytest

from nano_qwen3_mlx.sampling_params import SamplingParams

INVALID = [
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -1),
    ("min_p", 1.5),
    ("min_p", -0.1),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.5),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", math.nan),
    ("logprobs", 21),
    ("logprobs", -1),
    ("min_tokens", -1),
    ("stop_sequences", [""]),
    ("stop_sequences", ["ok", ""]),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_value_raises_naming_the_field(field, value):
    """Each out-of-range value raises ValueError whose message names the field."""
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("stop", ["", [""], ["a", ""]])
def test_empty_stop_alias_is_rejected(stop):
    """Empty strings given through the ``stop`` alias are rejected like stop_sequences."""
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=stop)


def test_boundary_values_are_accepted():
    """The edges of every range are valid."""
    params = SamplingParams(
        temperature=0, top_p=1.0, top_k=0, min_p=1.0, max_tokens=1, repetition_penalty=0.01,
        presence_penalty=-2, frequency_penalty=2, logprobs=20, min_tokens=0,
    )
    assert params.is_greedy
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_clone_validates_overrides():
    """clone() copies with changes and validates them again."""
    base = SamplingParams(temperature=0.5, stop=["x"])
    assert base.clone(top_k=3).top_k == 3 and base.clone().stop_sequences == ["x"]
    with pytest.raises(ValueError, match="top_k"):
        base.clone(top_k=-3)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"stop": "END"}, ["END"]),
        ({"stop": ["a", "b"]}, ["a", "b"]),
        ({"stop_sequences": ["x"], "stop": "y"}, ["x", "y"]),
        ({"stop_sequences": ["x"], "stop": ["y", "z"]}, ["x", "y", "z"]),
        ({"stop_sequences": "END"}, ["END"]),
    ],
)
def test_stop_alias_merges_into_stop_sequences(kwargs, expected):
    """``stop`` (a string or a list) is appended to stop_sequences and then cleared."""
    params = SamplingParams(**kwargs)
    assert params.stop_sequences == expected
    assert params.stop is None
    assert "stop" not in params.to_dict()


def test_string_stop_sequences_with_stop_alias_is_not_split():
    """A string stop_sequences plus the stop alias keeps the string whole."""
    params = SamplingParams(stop_sequences="END", stop="STOP")
    assert params.stop_sequences == ["END", "STOP"]


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("balanced", {"temperature": 0.7, "top_p": 0.9, "top_k": 50}),
        ("creative", {"temperature": 1.0, "top_p": 0.95, "top_k": 100}),
        ("factual", {"temperature": 0.3, "top_p": 0.8, "top_k": 20}),
        ("code", {"temperature": 0.1, "top_p": 0.95, "repetition_penalty": 1.05}),
        ("deterministic", {"temperature": 0.0}),
    ],
)
def test_presets_values_and_overrides(preset, expected):
    """Presets return their documented values and accept overrides of any field."""
    factory = getattr(SamplingParams, preset)
    params = factory()
    assert {name: getattr(params, name) for name in expected} == expected
    overridden = factory(max_tokens=500, temperature=0.0)
    assert overridden.max_tokens == 500 and overridden.is_greedy
    with pytest.raises(ValueError, match="top_p"):
        factory(top_p=0)


def test_preset_examples_from_the_seed_api():
    """The exact calls the seed API documents."""
    assert SamplingParams.creative(max_tokens=500).max_tokens == 500
    assert SamplingParams.deterministic().temperature == 0
    assert SamplingParams.deterministic().is_greedy
    assert SamplingParams.balanced(max_tokens=200).max_tokens == 200
