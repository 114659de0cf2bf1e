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
