from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from search.parsing import parse_bytes, parse_dims, parse_ints

names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@given(st.dictionaries(names, st.integers(1, 10_000), min_size=1, max_size=6))
def test_parse_dims_roundtrips(dims):
    text = ",".join(f"{k}={v}" for k, v in dims.items())
    assert parse_dims(text) == dims


@given(st.text(max_size=40))
def test_parse_dims_raises_only_valueerror(text):
    try:
        out = parse_dims(text)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert all(isinstance(v, int) and v >= 1 for v in out.values())


@pytest.mark.parametrize(
    "text, match",
    [("user_id=0", "must be >= 1"), ("user_id=x", "must be an integer"), ("user_id", "NAME=INT"),
     ("a=1,a=2", "twice"), ("user_id=1.5", "must be an integer")],
)
def test_parse_dims_names_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_dims(text)


@pytest.mark.parametrize("text, value", [("250000", 250000), ("2.5MB", 2_500_000), ("64KiB", 65536), ("1e6", 10**6),
                                         ("3 g", 3 * 10**9)])
def test_parse_bytes_units(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5", "12 parsecs", "0"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="memory budget"):
        parse_bytes(text)


def test_parse_ints():
    assert parse_ints("64, 32", "--hidden") == (64, 32)
    with pytest.raises(ValueError, match="--hidden"):
        parse_ints("64,x", "--hidden")


@given(st.integers(1, 10**12))
def test_parse_bytes_plain_integers_round_trip(n):
    assert parse_bytes(str(n)) == n


_UNITS = {"k": 10**3, "kb": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "g": 10**9, "GB": 10**9,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@given(st.integers(1, 10**5), st.sampled_from(sorted(_UNITS)), st.sampled_from(["", " ", "  "]))
def test_parse_bytes_units_scale_the_number(n, unit, pad):
    assert parse_bytes(f"{pad}{n}{pad}{unit}{pad}") == n * _UNITS[unit]


@given(st.text(max_size=30))
def test_parse_bytes_raises_only_one_line_value_errors(text):
    try:
        value = parse_bytes(text)
    except ValueError as e:
        assert str(e).startswith("memory budget ") and "\n" not in str(e)
    else:
        assert isinstance(value, int) and value >= 1


@given(st.dictionaries(names, st.integers(1, 10_000), min_size=1, max_size=6),
       st.lists(st.sampled_from(["", " ", "\t"]), min_size=4, max_size=4))
def test_parse_dims_ignores_whitespace_and_empty_entries(dims, pads):
    a, b, c, d = pads
    text = f",{a}".join(f"{b}{k}{c}={d}{v}{a}" for k, v in dims.items()) + ",,"
    assert parse_dims(text) == dims


@given(names, st.integers(1, 100), st.integers(1, 100))
def test_parse_dims_refuses_any_feature_given_twice(name, first, second):
    with pytest.raises(ValueError, match=f"dim for '{name}' is given twice"):
        parse_dims(f"{name}={first},{name}={second}")
