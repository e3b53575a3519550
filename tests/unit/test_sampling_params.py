"""SamplingParams validation: every field rejects bad values with a ValueError naming the field."""

from __future__ import annotations

import math

import pytest

from miaotui.sampling_params import SamplingParams

BAD_VALUES = [
    # (field, bad value)
    ("n", 0),
    ("n", -1),
    ("n", 1.5),
    ("n", True),
    ("n", "2"),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1.0"),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("top_p", None),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", "5"),
    ("top_k", False),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("min_p", "0.1"),
    ("seed", 1.0),
    ("seed", "42"),
    ("seed", True),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.0),
    ("max_tokens", True),
    ("min_tokens", -1),
    ("min_tokens", 1.0),
    ("min_tokens", None),
    ("stop", 5),
    ("stop", ["ok", 3]),
    ("stop", [None]),
    ("stop", {"a"}),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1, 2.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", ["7"]),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("ignore_eos", None),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", math.nan),
    ("presence_penalty", "1"),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", math.inf),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
    ("logprobs", True),
    ("skip_special_tokens", 0),
    ("skip_special_tokens", "false"),
    ("skip_special_tokens", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_raises_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(("min_tokens", "max_tokens"), [(5, 4), (2, 1), (17, 16)])
def test_min_tokens_greater_than_max_tokens(min_tokens, max_tokens):
    with pytest.raises(ValueError, match="^min_tokens"):
        SamplingParams(min_tokens=min_tokens, max_tokens=max_tokens)


def test_min_tokens_greater_than_default_max_tokens():
    # Default max_tokens is 16.
    with pytest.raises(ValueError, match="^min_tokens"):
        SamplingParams(min_tokens=17)


def test_min_tokens_with_unbounded_max_tokens_is_fine():
    p = SamplingParams(min_tokens=1000, max_tokens=None)
    assert p.min_tokens == 1000 and p.max_tokens is None


def test_min_tokens_equal_to_max_tokens_is_fine():
    assert SamplingParams(min_tokens=8, max_tokens=8).min_tokens == 8


def test_stop_token_ids_not_a_list_raises_value_error():
    # A scalar (e.g. `"stop_token_ids": 2` from a JSON body) must be a ValueError naming the field,
    # not a TypeError from list(2).
    with pytest.raises(ValueError, match="^stop_token_ids"):
        SamplingParams(stop_token_ids=2)


def test_huge_integer_number_field_raises_value_error():
    # Python ints beyond float range (JSON allows them) must be rejected as ValueError too,
    # not leak an OverflowError from math.isfinite.
    with pytest.raises(ValueError, match="^temperature"):
        SamplingParams(temperature=10**400)


def test_defaults_pass():
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert p.seed is None
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop is None and p.stop_strings == ()
    assert p.stop_token_ids is None
    assert p.ignore_eos is False and p.skip_special_tokens is True
    assert p.logprobs is None
    assert not p.greedy
    assert not p.uses_penalties


def test_good_values_pass():
    p = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, seed=1234,
                       max_tokens=100, min_tokens=10, stop=["a", "bc"], stop_token_ids=(3, 0),
                       ignore_eos=True, repetition_penalty=1.3, presence_penalty=-2,
                       frequency_penalty=2, logprobs=20, skip_special_tokens=False)
    assert p.n == 4 and p.temperature == 0.7 and p.top_p == 0.9 and p.top_k == 50
    assert p.min_p == 0.05 and p.seed == 1234 and p.max_tokens == 100 and p.min_tokens == 10
    assert p.stop_strings == ("a", "bc")
    assert p.stop_token_ids == [3, 0]
    assert p.ignore_eos is True and p.skip_special_tokens is False
    assert p.repetition_penalty == 1.3 and p.presence_penalty == -2 and p.frequency_penalty == 2
    assert p.logprobs == 20
    assert p.uses_penalties


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(temperature=0.0), dict(temperature=2),
    dict(top_p=1), dict(top_p=1e-6),
    dict(top_k=-1), dict(top_k=0), dict(top_k=1),
    dict(min_p=0), dict(min_p=1),
    dict(seed=0), dict(seed=-5), dict(seed=2**40),
    dict(max_tokens=1), dict(max_tokens=None),
    dict(stop=None), dict(stop=[]), dict(stop=("x", "y")),
    dict(stop_token_ids=[]), dict(stop_token_ids=[0]),
    dict(repetition_penalty=0.5), dict(repetition_penalty=3),
    dict(presence_penalty=2.0), dict(frequency_penalty=-2.0),
    dict(logprobs=0), dict(logprobs=None),
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_boundary_values_pass(kwargs):
    p = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        if key == "stop_token_ids":
            assert p.stop_token_ids == list(value)
        else:
            assert getattr(p, key) == value


def test_single_stop_string_becomes_tuple():
    p = SamplingParams(stop="x")
    assert p.stop_strings == ("x",)


def test_stop_list_becomes_tuple_in_order():
    assert SamplingParams(stop=["b", "a", "b"]).stop_strings == ("b", "a", "b")


def test_greedy_threshold():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize("kwargs", [dict(repetition_penalty=1.1), dict(presence_penalty=0.1),
                                    dict(frequency_penalty=-0.1)])
def test_uses_penalties(kwargs):
    assert SamplingParams(**kwargs).uses_penalties
