from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import prepare
from pipelines.tabular import load_table, table_format


@pytest.fixture
def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 200
    return pd.DataFrame(
        {
            "user": [f"{u:05d}" for u in rng.integers(0, 20, n)],  # zero-padded ids must stay text
            "item": rng.integers(0, 30, n),
            "tags": rng.choice(["a|b", "b", "c|a", ""], n),
            "age": rng.integers(10, 70, n),
            "rating": rng.integers(1, 6, n),
            "ts": np.arange(n) * 10,
            "unused": rng.random(n),
        }
    )


def _load(path: Path, **kw):
    args = dict(label="rating", features=["user", "item", "tags"], multi=["tags"], threshold=4, time="ts")
    return load_table(path, **{**args, **kw})


def test_load_table_csv_features_label_time(table, tmp_path):
    path = tmp_path / "events.csv"
    table.to_csv(path, index=False)
    raw = _load(path)
    assert raw.name == "events"
    assert list(raw.frame.columns) == ["user", "item", "tags"]  # only the features, not "unused"
    assert [f.name for f in raw.features if f.multi] == ["tags"]
    assert raw.frame["user"].iloc[0] == table["user"].iloc[0] and raw.frame["user"].str.len().eq(5).all()
    assert raw.label.dtype == np.float32
    assert np.array_equal(raw.label, (table["rating"] >= 4).to_numpy(np.float32))
    assert raw.time.dtype == np.int64 and np.array_equal(raw.time, table["ts"].to_numpy())
    assert raw.meta["source"] == str(path.resolve()) and raw.meta["delimiter"] == ","


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zip"])
def test_load_table_compressed_csv_equals_plain(table, tmp_path, suffix):
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_csv(tmp_path / f"t{suffix}", index=False)
    a, b = _load(tmp_path / "t.csv"), _load(tmp_path / f"t{suffix}")
    assert a.frame.equals(b.frame) and np.array_equal(a.label, b.label)


@pytest.mark.parametrize("name,delim", [("t.tsv", "\t"), ("t.txt", ";"), ("t.csv", "|"), ("t.tsv.gz", "\t")])
def test_load_table_detects_delimiter(table, tmp_path, name, delim):
    frame = table.assign(tags=table["tags"].str.replace("|", "/")) if delim == "|" else table
    frame.to_csv(tmp_path / name, index=False, sep=delim)
    raw = _load(tmp_path / name, multi=(), sep="/")
    assert raw.meta["delimiter"] == delim and len(raw) == len(table)


def test_load_table_multi_valued_cells_do_not_fool_detection(table, tmp_path):
    table.to_csv(tmp_path / "t.csv", index=False)  # "a|b" cells in a comma-separated file
    assert _load(tmp_path / "t.csv").meta["delimiter"] == ","


def test_load_table_explicit_delimiter_accepts_backslash_t(table, tmp_path):
    table.to_csv(tmp_path / "t.txt", index=False, sep="\t")
    assert _load(tmp_path / "t.txt", delimiter="\\t").meta["delimiter"] == "\t"


def test_load_table_parquet(table, tmp_path):
    table.to_parquet(tmp_path / "t.parquet")
    raw = _load(tmp_path / "t.parquet", buckets={"item": (10, 20)})
    assert raw.meta["format"] == "parquet" and len(raw) == len(table)
    assert raw.feature("item").buckets == (10, 20)
    assert raw.frame["user"].tolist() == table["user"].tolist()


def test_load_table_datetime_time_column_becomes_unix_seconds(table, tmp_path):
    table.assign(ts=pd.date_range("2020-01-01", periods=len(table), freq="h").astype(str)).to_csv(
        tmp_path / "t.csv", index=False
    )
    raw = _load(tmp_path / "t.csv")
    assert raw.time[0] == 1577836800 and raw.time[1] - raw.time[0] == 3600


def test_load_table_label_without_threshold(table, tmp_path):
    table.assign(clicked=(table["rating"] >= 3).astype(int)).to_csv(tmp_path / "t.csv", index=False)
    raw = _load(tmp_path / "t.csv", label="clicked", threshold=None)
    assert set(np.unique(raw.label)) == {0.0, 1.0}


def test_load_table_prepare_end_to_end(table, tmp_path):
    table.to_csv(tmp_path / "t.csv.gz", index=False)
    data = prepare(_load(tmp_path / "t.csv.gz", features=["user", "item", "tags", "age"], buckets={"age": (30, 50)}),
                   split="temporal")
    info = {f.name: f for f in data.features}
    assert info["tags"].multi and info["tags"].cardinality == 4  # unknown + a, b, c
    assert info["age"].cardinality == 4  # unknown + <30, [30, 50), >=50
    assert len(data.train) + len(data.val) + len(data.test) == len(table)


# --- bad inputs: each message names the value and the fix


def test_load_table_missing_file_names_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"table file '{tmp_path / 'nope.csv'}' does not exist")):
        load_table("nope.csv", "rating", ["user"])


def test_load_table_unknown_suffix_lists_supported(tmp_path):
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(ValueError, match=r"suffix '\.json', which is not a table format; supported: \.csv.*\.gz.*\.parquet"):
        load_table(tmp_path / "t.json", "rating", ["user"])


def test_load_table_missing_column_lists_available(table, tmp_path):
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'movie' is not in 't\.csv'; available columns: user, item, tags, age"):
        _load(tmp_path / "t.csv", features=["user", "movie"], multi=())


def test_load_table_corrupt_parquet_names_the_file(table, tmp_path):
    table.to_parquet(tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2] + b"PAR1")  # truncated, magic bytes kept
    with pytest.raises(ValueError, match=r"'.*t\.parquet' is not a readable Parquet file \(.*\); check the file"):
        _load(tmp_path / "t.parquet")


def test_load_table_missing_column_in_parquet(table, tmp_path):
    table.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"column 'clicked' is not in 't\.parquet'; available columns: user"):
        _load(tmp_path / "t.parquet", label="clicked")


def test_load_table_wrong_delimiter_is_diagnosed(table, tmp_path):
    table.to_csv(tmp_path / "t.csv", index=False, sep=";")
    with pytest.raises(ValueError, match=r"header parsed as one column that contains ';'.*pass --delimiter ';'"):
        _load(tmp_path / "t.csv", delimiter=",")


def test_load_table_constant_label(table, tmp_path):
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match="label column 'rating' is constant"):
        _load(tmp_path / "t.csv", threshold=10)


def test_load_table_non_binary_label_needs_threshold(table, tmp_path):
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"'rating' has 5 distinct values, not 2; give a threshold"):
        _load(tmp_path / "t.csv", threshold=None)


def test_load_table_single_valued_feature_is_refused(table, tmp_path):
    table.assign(country="NL").to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"feature 'country' has only the value 'NL', so it cannot be learned; drop it"):
        _load(tmp_path / "t.csv", features=["user", "country"], multi=())


def test_load_table_feature_single_valued_once_spaces_are_dropped_is_refused(table, tmp_path):
    padded = [" NL", "NL ", "NL", " NL "] * (len(table) // 4) + ["NL"] * (len(table) % 4)
    table.assign(country=padded).to_csv(tmp_path / "t.csv", index=False)  # one category to the encoder
    with pytest.raises(ValueError, match=r"feature 'country' has only the value 'NL', so it cannot be learned; drop it"):
        _load(tmp_path / "t.csv", features=["user", "country"], multi=())


def test_load_table_all_missing_feature_is_refused(table, tmp_path):
    table.assign(empty="").to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"feature 'empty' has only missing values"):
        _load(tmp_path / "t.csv", features=["user", "empty"], multi=())


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(features=[]), r"no feature columns given"),
        (dict(features=["user", "user"], multi=()), r"feature 'user' is listed twice"),
        (dict(features=["user", "rating"], multi=()), r"label column 'rating' is also listed as a feature"),
        (dict(multi=["genre"]), r"multi-valued column 'genre' is not among the features"),
        (dict(buckets={"age": (1, 2)}), r"bucketed column 'age' is not among the features"),
        (dict(buckets={"item": (5, 5)}), r"bucket edges for 'item' are \(5, 5\), but must be non-empty and increasing"),
        (dict(buckets={"user": (1,)}, features=["user", "tags"]), None),  # zero-padded digits are numbers: fine
        (dict(buckets={"tags": (1,)}), r"'tags' is multi-valued and cannot also be bucketed"),
        (dict(time="rating"), r"time column 'rating' is also the label column"),
    ],
)
def test_load_table_refuses_inconsistent_arguments(table, tmp_path, kw, message):
    table.to_csv(tmp_path / "t.csv", index=False)
    if message is None:
        assert len(_load(tmp_path / "t.csv", **kw)) == len(table)
        return
    with pytest.raises(ValueError, match=message):
        _load(tmp_path / "t.csv", **kw)


def test_load_table_non_numeric_bucketed_feature(table, tmp_path):
    table.assign(age=table["age"].astype(str).where(table.index > 0, "old")).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"bucketed feature 'age' holds non-numeric value 'old'"):
        _load(tmp_path / "t.csv", features=["user", "age"], multi=(), buckets={"age": (30,)})


def test_load_table_empty_file(tmp_path):
    (tmp_path / "t.csv").write_text("")
    with pytest.raises(ValueError, match=r"is empty; give a file with a header row"):
        load_table(tmp_path / "t.csv", "rating", ["user"])


@pytest.mark.parametrize(
    "name,fmt",
    [("a.csv", "csv"), ("a.CSV.GZ", "csv"), ("a.tsv.zst", "csv"), ("a.b.parquet", "parquet"), ("a.pq", "parquet"),
     ("a.gz", None), ("a.zip", None), ("a.json", None), ("a", None)],
)
def test_table_format_by_suffix(name, fmt):
    assert table_format(Path(name)) == fmt


def test_load_table_parquet_list_column_is_a_multi_valued_feature(table, tmp_path):
    frame = table.assign(tags=[["a", "b"], [], ["c"], None] * (len(table) // 4))
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    raw = _load(tmp_path / "t.parquet")
    assert list(raw.frame["tags"].iloc[:4].fillna("")) == ["a|b", "", "c", ""]
    assert raw.frame["tags"].iloc[1:2].isna().all() and raw.frame["tags"].iloc[3:4].isna().all()


def test_load_table_parquet_list_column_refusals(table, tmp_path):
    table.assign(tags=[["a", "b"], ["c"]] * (len(table) // 2)).to_parquet(tmp_path / "l.parquet", index=False)
    with pytest.raises(ValueError, match=r"^column 'tags' holds lists; declare it with --multi tags$"):
        _load(tmp_path / "l.parquet", multi=[])
    table.assign(tags=[["a|x"], ["c"]] * (len(table) // 2)).to_parquet(tmp_path / "s.parquet", index=False)
    with pytest.raises(ValueError, match=r"element 'a\|x', which contains the separator '\|'"):
        _load(tmp_path / "s.parquet")
    table.assign(tags=[{"k": 1}, {"k": 2}] * (len(table) // 2)).to_parquet(tmp_path / "d.parquet", index=False)
    with pytest.raises(ValueError, match=r"^column 'tags' holds structs \(dict values\)"):
        _load(tmp_path / "d.parquet")


def test_load_table_time_strings_must_be_iso_8601(table, tmp_path):
    iso = pd.date_range("2024-01-01", periods=len(table), freq="h").strftime("%Y-%m-%dT%H:%M:%S")
    table.assign(ts=iso).to_csv(tmp_path / "iso.csv", index=False)
    raw = _load(tmp_path / "iso.csv")
    assert raw.time[0] == pd.Timestamp("2024-01-01", tz="UTC").timestamp() and (np.diff(raw.time) == 3600).all()
    day_first = pd.date_range("2024-01-01", periods=len(table), freq="D").strftime("%d/%m/%Y")
    table.assign(ts=day_first).to_csv(tmp_path / "dmy.csv", index=False)
    with pytest.raises(ValueError) as e:
        _load(tmp_path / "dmy.csv")
    assert str(e.value) == (
        "time column 'ts' holds '01/01/2024', neither a number nor an ISO 8601 date/time; convert the column to "
        "YYYY-MM-DD[THH:MM[:SS]] or Unix seconds"
    )
    table.assign(ts=["2024-01-01"] * 5 + ["soon"] + ["2024-01-02"] * (len(table) - 6)).to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(ValueError, match=r"^time column 'ts' holds 'soon', neither[^\n]*seconds$"):
        _load(tmp_path / "bad.csv")


def test_load_table_csv_spells_categories_as_encode_does(table, tmp_path):
    n = len(table)
    item = ["196", "196.0", "00123", "7.50", "-3.00", ""] + ["5"] * (n - 6)
    user = ["NA", "None", "null", "NaN", "n/a", ""] + ["x"] * (n - 6)
    rating = ["1", "5"] * (n // 2)
    table.assign(item=item, user=user, rating=rating).to_csv(tmp_path / "t.csv", index=False)
    raw = _load(tmp_path / "t.csv", features=["user", "item"], multi=[], time=None, threshold=None)
    assert list(raw.frame["item"].iloc[:5]) == ["196", "196", "00123", "7.50", "-3"] and pd.isna(raw.frame["item"][5])
    assert list(raw.frame["user"].iloc[:5]) == ["NA", "None", "null", "NaN", "n/a"] and pd.isna(raw.frame["user"][5])
    parquet = tmp_path / "t.parquet"
    table.assign(item=item, user=user, rating=rating).to_parquet(parquet, index=False)
    assert raw.frame["user"].iloc[:5].equals(_load(parquet, features=["user", "item"], multi=[], time=None,
                                                   threshold=None).frame["user"].iloc[:5])
    table.assign(rating=["NA"] + [1, 5] * (n // 2 - 1) + [1]).to_csv(tmp_path / "y.csv", index=False)
    with pytest.raises(ValueError, match="label column 'rating' has 1 missing values"):  # the label keeps pandas' NAs
        _load(tmp_path / "y.csv", threshold=None)


@pytest.mark.parametrize("name", ["latin1.csv", "latin1.csv.gz"])
def test_load_table_non_utf8_file_is_named(table, tmp_path, name):
    path = tmp_path / name
    frame = table.assign(user=["Zoë"] + ["bob"] * (len(table) - 1))
    frame.to_csv(path, index=False, encoding="latin-1")
    offset = frame.to_csv(index=False).encode("latin-1").index(b"\xeb")
    with pytest.raises(ValueError) as e:
        _load(path)
    assert str(e.value) == f"file '{path}' is not UTF-8 text (byte 0xeb at offset {offset}); re-save it as UTF-8"


@pytest.mark.parametrize("given", ["", "ab", ",,"])
def test_load_table_delimiter_must_be_one_character(table, tmp_path, given, recwarn):
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError) as e:
        _load(tmp_path / "t.csv", delimiter=given)
    assert str(e.value) == f"--delimiter is {given!r}, but must be exactly one character, e.g. ',' or tab"
    assert not [w for w in recwarn if "Parser" in type(w.message).__name__]


def test_load_table_duplicate_header_name_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("user,user,item,y\n" + "".join(f"u{i},v{i},i{i % 3},{i % 2}\n" for i in range(10)))
    with pytest.raises(ValueError) as e:
        load_table(path, label="y", features=["user", "item"])
    assert str(e.value) == (
        "column 'user' appears 2 times in the header of 'd.csv', so which one to read is ambiguous; rename or drop "
        "the extra ones"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table([["a", "b"], ["c", "d"], [0, 1]], names=["user", "user", "y"]), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"^column 'user' appears 2 times in the header of 'd.parquet'"):
        load_table(tmp_path / "d.parquet", label="y", features=["user"])


def test_load_table_header_name_with_spaces_is_named(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("user, item ,y\n" + "".join(f"u{i},i{i % 3},{i % 2}\n" for i in range(10)))
    with pytest.raises(ValueError) as e:
        load_table(path, label="y", features=["user", "item"])
    assert str(e.value) == (
        "column 'item' is not in 's.csv', but the file's header has ' item ' with a leading and trailing space; "
        "remove the space from the header, or name the column ' item '"
    )


def test_load_table_whitespace_around_a_category_is_insignificant(tmp_path):
    path = tmp_path / "w.csv"
    item = [" 5", "5 ", "5", " 5.0 ", "   ", "", "7", " 7 "] * 10
    frame = pd.DataFrame({"item": item, "user": [f"u{i % 4}" for i in range(80)], "y": [0, 1] * 40})
    frame.to_csv(path, index=False)
    raw = load_table(path, label="y", features=["item", "user"])
    data = prepare(raw, fractions=(0.9, 0.1, 0.0))
    assert data.encoder.vocabs["item"].categories == ["5", "7"]  # one '5' however padded; '   ' is missing, as ''
    assert data.encoder.transform(raw.frame)["item"].values[:8].tolist() == [1, 1, 1, 1, 0, 0, 2, 2]
    codes = data.encoder.transform(pd.DataFrame({"item": [" 5", "5 ", "5", "   ", ""], "user": ["u0"] * 5}))
    assert codes["item"].values.tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    "name, body, line, fields, fix",
    [
        ("long.csv", "u1,a,1\nu2,b,0,extra\n", 2, 4, "quote a value that contains ','"),
        ("trailing.csv", "u1,a,1\nu2,b,0,\n", 2, 4, "quote a value that contains ','"),  # pandas' usecols dropped it
        ("short.csv", "u1,a,1\n\nu2,b\n", 3, 2, "give each column a field, empty if missing"),  # blank lines count
        ("quoted.csv", 'u1,"a\nb",1\nu2,b,0,9\n', 3, 4, "quote a value that contains ','"),  # a value's newline too
        ("long.csv.gz", "u1,a,1\nu2,b,0,extra\n", 2, 4, "quote a value that contains ','"),
    ],
)
def test_load_table_row_with_another_field_count_is_refused(tmp_path, name, body, line, fields, fix):
    """``line`` counts within ``body``: the header and 10 good rows come first."""
    path = tmp_path / name
    rows = "user,item,y\n" + "".join(f"u{i},i{i % 3},{i % 2}\n" for i in range(10)) + body
    path.write_bytes(gzip.compress(rows.encode()) if name.endswith(".gz") else rows.encode())
    with pytest.raises(ValueError) as e:
        load_table(path, label="y", features=["user", "item"])
    assert str(e.value) == (
        f"line {line + 11} of '{path}' has {fields} fields, but the header has 3; fix the row ({fix}), or pass the "
        "right --delimiter"
    )


def test_load_table_blank_lines_and_quoted_delimiters_keep_the_field_count(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('user,item,y\n"u,1",a,1\n   \n\nu2,"b\nc",0\n' + "".join(f"u{i},i{i},{i % 2}\n" for i in range(6)))
    raw = load_table(path, label="y", features=["user", "item"])
    assert raw.frame["user"].tolist()[:2] == ["u,1", "u2"] and raw.frame["item"][1] == "b\nc" and len(raw) == 8
