from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.encode import UNKNOWN, Column, Encoder, bucketize, normalize
from pipelines.schema import Feature


def test_encoder_unknown_values_map_to_zero():
    train = pd.DataFrame({"u": ["a", "b", "b"], "g": ["x|y", "y", "x"]})
    enc = Encoder.fit(train, (Feature("u"), Feature("g", multi=True)))
    cols = enc.transform(pd.DataFrame({"u": ["b", "zzz", None], "g": ["y|new", None, "x"]}))
    u = enc.vocabs["u"]
    assert cols["u"].values.tolist() == [u.categories.index("b") + 1, UNKNOWN, UNKNOWN]
    g = enc.vocabs["g"]
    assert cols["g"].offsets.tolist() == [0, 2, 3, 4]
    assert cols["g"].values.tolist() == [g.categories.index("y") + 1, UNKNOWN, UNKNOWN, g.categories.index("x") + 1]


def test_encoder_min_freq_folds_rare_values_into_unknown():
    train = pd.DataFrame({"u": ["a"] * 3 + ["b"]})
    enc = Encoder.fit(train, (Feature("u"),), min_freq=2)
    assert enc.vocabs["u"].categories == ["a"]
    assert enc.vocabs["u"].counts.tolist() == [1, 3]
    assert enc.transform(pd.DataFrame({"u": ["b", "a"]}))["u"].values.tolist() == [0, 1]


def test_normalize_treats_int_float_and_str_alike():
    a = normalize(pd.Series([196, 3]))
    b = normalize(pd.Series([196.0, np.nan]))
    c = normalize(pd.Series(["196", ""]))
    assert a[0] == b[0] == c[0] == "196"
    assert pd.isna(b[1]) and pd.isna(c[1])
    mixed = normalize(pd.Series([196.0, "196", 196, 0.5, float("inf"), None, ""], dtype=object))  # an object column
    assert mixed[:5].tolist() == ["196", "196", "196", "0.5", "inf"] and mixed[5:].isna().all()


def test_bools_spell_apart_from_ints_whatever_comes_first():
    assert normalize(pd.Series([True, False])).tolist() == ["True", "False"]  # a bool column's spelling, kept
    assert normalize(pd.Series([True, False, None], dtype="boolean")).tolist()[:2] == ["True", "False"]
    feats = (Feature("s"), Feature("m", multi=True))
    cases = [
        ([True, 1, 0, False, "x"], ["True", "1", "0", "False", "x"]),
        ([1, True, False, 0, "x"], ["1", "True", "False", "0", "x"]),
        ([np.True_, 1.0, 0, np.False_, "x"], ["True", "1", "0", "False", "x"]),
    ]
    for cells, tokens in cases:
        column = pd.Series(cells, dtype=object)  # pd.factorize holds True == 1 and False == 0
        frame = pd.DataFrame({"s": column, "m": column})
        enc = Encoder.fit(frame, feats)
        s = enc.vocabs["s"]
        assert s.categories == ["0", "1", "False", "True", "x"] and s.counts.tolist() == [0, 1, 1, 1, 1, 1], cells
        vectorised = Encoder(enc.vocabs)
        vectorised.SMALL_FRAME = -1
        want = [s.code(t) for t in tokens]
        for out in (vectorised.transform(frame), enc.transform(frame)):  # both paths
            assert out["s"].values.tolist() == out["m"].values.tolist() == want, cells
        bools = pd.DataFrame({"s": [True, False], "m": [True, False]})  # a bool column's cells mean the same
        assert enc.transform(bools)["s"].values.tolist() == [s.code("True"), s.code("False")]


def test_bucketize_labels_intervals():
    out = bucketize(pd.Series([10, 18, 30, 70, None]), (18, 25, 60))
    assert out.tolist()[:4] == ["<18", "[18, 25)", "[25, 60)", ">=60"]
    assert pd.isna(out.iloc[4])


def test_encoder_roundtrips_through_dict():
    train = pd.DataFrame({"u": ["a", "b"], "g": ["x|y", "y"]})
    enc = Encoder.fit(train, (Feature("u"), Feature("g", multi=True)))
    again = Encoder.from_dict(enc.to_dict())
    frame = pd.DataFrame({"u": ["b", "q"], "g": ["y|x", "q"]})
    for name in ("u", "g"):
        assert np.array_equal(enc.transform(frame)[name].values, again.transform(frame)[name].values)


def test_encoder_missing_column_is_named():
    enc = Encoder.fit(pd.DataFrame({"u": ["a", "b"]}), (Feature("u"),))
    with pytest.raises(ValueError, match="column 'u' is missing"):
        enc.transform(pd.DataFrame({"v": [1]}))


@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=4), min_size=1, max_size=30), st.data())
def test_column_take_gathers_bags(bags, data):
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bags])]).astype(np.int64)
    col = Column(np.concatenate([np.array(b, dtype=np.int32) for b in bags]), offsets)
    rows = np.array(data.draw(st.lists(st.integers(0, len(bags) - 1), max_size=20)), dtype=np.int64)
    taken = col.take(rows)
    got = [taken.values[taken.offsets[i] : taken.offsets[i + 1]].tolist() for i in range(len(rows))]
    assert got == [bags[r] for r in rows]


cells = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "", "a|b", "b|zz", "c| a", "zz", " a", "b ", " "]))


@given(st.lists(cells, min_size=1, max_size=40), st.lists(cells, min_size=1, max_size=40))
def test_encoder_matches_naive_per_row_mapping(train_cells, new_cells):
    feats = (Feature("s"), Feature("m", multi=True))
    enc = Encoder.fit(pd.DataFrame({"s": train_cells, "m": train_cells}), feats)
    out = enc.transform(pd.DataFrame({"s": new_cells, "m": new_cells}))

    def index(vocab, token):
        token = None if token is None else token.strip()
        return vocab.categories.index(token) + 1 if token and token in vocab.categories else 0

    s_vocab, m_vocab = enc.vocabs["s"], enc.vocabs["m"]
    assert all(c == c.strip() and c for c in s_vocab.categories)  # " a" is "a", " " is missing
    assert out["s"].values.tolist() == [index(s_vocab, c) for c in new_cells]
    bags = [[index(m_vocab, t) for t in (c.split("|") if c else [None])] for c in new_cells]
    col = out["m"]
    assert [col.values[col.offsets[i] : col.offsets[i + 1]].tolist() for i in range(len(new_cells))] == bags
    train_tokens = [t.strip() for c in train_cells if c for t in c.split("|") if t.strip()]
    assert m_vocab.counts[1:].sum() == len(train_tokens)


raw_values = st.one_of(
    st.none(), st.just(np.nan), st.just(""), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True, width=64).filter(lambda v: v != v or abs(v) < 1e300),
    st.sampled_from([0.5, 2.0, -0.0, 196.0, 1e20, 2.0**63, float("inf")]),
    st.text(alphabet="ab |c1.", max_size=6),
    st.sampled_from([True, False, np.True_, np.False_, 0, 1, 1.0]),  # bools beside the ints they equal in Python
)
column_kinds = st.sampled_from(["object", "float64", "float32", "Int64", "int64", "string", "mixed"])


def _typed(values: list, kind: str) -> pd.Series:
    """``values`` as a column of dtype ``kind`` where they fit it, else as objects (what a request frame holds)."""
    try:
        if kind in ("float64", "float32"):
            return pd.Series([np.nan if v is None or v == "" else float(v) for v in values], dtype=kind)
        if kind in ("Int64", "int64"):
            return pd.Series([None if v is None else int(v) for v in values], dtype=kind)
        if kind == "string":
            return pd.Series([None if v is None or (isinstance(v, float) and v != v) else str(v) for v in values],
                             dtype="string")
    except (TypeError, ValueError, OverflowError):
        pass
    if kind == "mixed":  # one object column holding ints, floats and strings of the same numbers
        return pd.Series([v if i % 3 else (float(v) if isinstance(v, int) else str(v) if isinstance(v, float) else v)
                          for i, v in enumerate(values)], dtype=object)
    return pd.Series(values, dtype=object)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # building the test columns: int casts of odd floats
@given(st.lists(raw_values, min_size=1, max_size=30), st.lists(raw_values, min_size=1, max_size=70), column_kinds,
       column_kinds)
def test_small_frames_encode_cell_by_cell_exactly_as_the_vectorised_path(train, new, train_kind, new_kind):
    feats = (Feature("s"), Feature("m", multi=True, sep="|"))
    enc = Encoder.fit(pd.DataFrame({"s": _typed(train, train_kind), "m": _typed(train, train_kind)}), feats)
    frame = pd.DataFrame({"s": _typed(new, new_kind), "m": _typed(new, new_kind)})
    vectorised = Encoder(enc.vocabs)
    vectorised.SMALL_FRAME = -1  # force the pandas path
    one_by_one = Encoder(enc.vocabs)
    one_by_one.SMALL_FRAME = 10**9
    a, b = vectorised.transform(frame), one_by_one.transform(frame)
    for name in ("s", "m"):
        assert a[name].values.dtype == b[name].values.dtype == np.int32
        assert a[name].values.tolist() == b[name].values.tolist(), name
        assert (a[name].offsets is None) == (b[name].offsets is None)
        if a[name].offsets is not None:
            assert a[name].offsets.tolist() == b[name].offsets.tolist()
    if any(v is not None and v == v and str(v).strip() != "" for v in train):  # something was learnt (spaces: missing)
        assert enc.vocabs["s"].size > 1


def test_small_frame_path_is_taken_and_bucketed_columns_stay_vectorised(monkeypatch):
    import pipelines.encode as encode

    feats = (Feature("s"), Feature("age", buckets=(18.0, 30.0)))
    enc = Encoder.fit(pd.DataFrame({"s": ["x", "y"], "age": [20, 40]}), feats)
    seen = []
    real = encode._encode_cells
    monkeypatch.setattr(encode, "_encode_cells", lambda values, vocab: seen.append(vocab.feature.name) or real(values, vocab))
    out = enc.transform(pd.DataFrame({"s": ["y", "q"], "age": [25, None]}))
    assert seen == ["s"]  # age has buckets: pd.cut's rules, not re-implemented per cell
    assert out["s"].values.tolist() == [2, 0] and out["age"].values.tolist() == [enc.vocabs["age"].code("[18, 30)"), 0]
    seen.clear()
    enc.transform(pd.DataFrame({"s": ["y"] * (Encoder.SMALL_FRAME + 1), "age": [25] * (Encoder.SMALL_FRAME + 1)}))
    assert seen == []


@pytest.mark.parametrize("rows", [5, 600])  # cell by cell (<= SMALL_FRAME rows) and vectorised
def test_list_cells_encode_as_their_joined_text(rows):
    # a Parquet list column trained as 'a|b' text; served as lists (pyfunc frame, JSON arrays): the same bags
    tags = Feature("tags", multi=True)
    enc = Encoder.fit(pd.DataFrame({"tags": ["a|b", "b", "c|a", None] * 5}), (tags,))
    lists = pd.Series([["a", "b"], np.array(["b"]), ("c", " a"), [], None, ["a", None, "zz"]] * 100)[:rows]
    texts = pd.Series(["a|b", "b", "c|a", "", None, "a|zz"] * 100)[:rows]
    got, want = enc.transform(pd.DataFrame({"tags": lists}))["tags"], enc.transform(pd.DataFrame({"tags": texts}))["tags"]
    assert np.array_equal(got.values, want.values) and np.array_equal(got.offsets, want.offsets)
    assert got.values[:2].tolist() == [enc.vocabs["tags"].code("a"), enc.vocabs["tags"].code("b")]


@pytest.mark.parametrize("rows", [5, 600])
@pytest.mark.parametrize("cell, message", [
    (["a", "b"], r"column 'user' holds a list \(\['a', 'b'\]\), but feature 'user' takes one value per row"),
    (np.array([1, 2]), r"column 'user' holds a list \(\[1, 2\]\)"),
    ({"k": 1}, r"column 'user' holds a mapping \(\{'k': 1\}\), which is not a categorical value"),
])
def test_a_list_or_mapping_in_a_single_valued_column_is_refused(rows, cell, message):
    enc = Encoder.fit(pd.DataFrame({"user": ["a", "b", "c"]}), (Feature("user"),))
    column = pd.Series(["a"] * (rows - 1) + [cell], dtype=object)
    with pytest.raises(ValueError, match=message):
        enc.transform(pd.DataFrame({"user": column}))


@pytest.mark.parametrize("rows", [3, 600])
def test_bools_written_as_text_are_the_bools(rows):
    # a CSV's true/FALSE trains as text; a client sends JSON true/false (bools) or the text: one category each
    enc = Encoder.fit(pd.DataFrame({"active": ["true", "FALSE", "True", None]}), (Feature("active"),))
    assert enc.vocabs["active"].categories == ["False", "True"]
    served = pd.Series(([True, "true", " TRUE "] + [False, "false", np.False_] * 199)[:rows], dtype=object)
    codes = enc.transform(pd.DataFrame({"active": served}))["active"].values.tolist()
    want = [enc.vocabs["active"].code("True")] * 3 + [enc.vocabs["active"].code("False")] * (rows - 3)
    assert codes == want and UNKNOWN not in codes
