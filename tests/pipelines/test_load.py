from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import prepare
from pipelines.download import ARCHIVES
from pipelines.load import MOVIELENS_SOURCES, describe_sources, load
from pipelines.movielens import AGE_BUCKETS

from .test_movielens import SHARED_ML100K, write_100k, zip_folder


@pytest.fixture
def ml100k(tmp_path) -> Path:
    return write_100k(tmp_path / "ml-100k")


@pytest.fixture
def csv_file(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    n = 120
    path = tmp_path / "clicks.csv.gz"
    pd.DataFrame(
        {
            "user": rng.integers(0, 15, n),
            "ad": rng.integers(0, 25, n),
            "topics": rng.choice(["x;y", "y", "z"], n),
            "clicked": rng.integers(0, 2, n),
            "at": np.arange(n),
        }
    ).to_csv(path, index=False)
    return path


def test_load_synthetic_uses_rows_and_seed():
    a = load("synthetic", synthetic_rows=500, seed=3)
    assert len(a) == 500 and a.meta["source"] == "synthetic" and a.meta["seed"] == 3
    b = load("synthetic", synthetic_rows=500, seed=3)
    assert a.frame.equals(b.frame) and np.array_equal(a.label, b.label)


def test_load_synthetic_refuses_table_options():
    with pytest.raises(ValueError, match=r"--label does not apply to data source 'synthetic'"):
        load("synthetic", label="rating")
    with pytest.raises(ValueError, match=r"--features does not apply to data source 'synthetic'"):
        load("synthetic", features=["user_id"])


def test_load_movielens_folder_and_zip(ml100k, tmp_path):
    folder = load(str(ml100k))
    archive = load(str(zip_folder(ml100k, tmp_path / "ml-100k.zip")))
    assert folder.name == archive.name == "movielens-100k"
    assert folder.frame.equals(archive.frame)
    assert folder.label.tolist() == [1, 0, 1, 0, 0, 1]  # default threshold 4


def test_load_movielens_threshold_features_and_buckets(ml100k):
    raw = load(str(ml100k), threshold=3, features=["user_id", "item_id", "age", "genres"], buckets={"age": AGE_BUCKETS})
    assert raw.label.tolist() == [1, 1, 1, 0, 0, 1]
    assert [f.name for f in raw.features] == ["user_id", "item_id", "age", "genres"]
    assert list(raw.frame.columns) == ["user_id", "item_id", "age", "genres"]
    assert raw.feature("age").buckets == AGE_BUCKETS and raw.feature("genres").multi


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(label="rating"), r"--label does not apply to data source '.*' \(its label is rating >= "),
        (dict(multi=["genres"]), r"--multi does not apply .* genres are already multi-valued"),
        (dict(time="ts"), r"--time-column does not apply"),
        (dict(delimiter=","), r"--delimiter does not apply"),
        (dict(synthetic_rows=10), r"--rows 10 applies only to --data synthetic"),
        (dict(features=["user_id", "title"]), r"feature 'title' is not in movielens-100k; its features are: user_id, "),
        (dict(buckets={"gender": (1.0,)}), r"feature 'gender' of movielens-100k is not numeric"),
        (dict(buckets={"genres": (1.0,)}), r"feature 'genres' of movielens-100k is not numeric"),
    ],
)
def test_load_movielens_refuses_options_that_do_not_apply(ml100k, kw, message):
    with pytest.raises(ValueError, match=message):
        load(str(ml100k), **kw)


def test_load_table_file(csv_file):
    raw = load(str(csv_file), label="clicked", features=["user", "ad", "topics"], multi=["topics"], sep=";", time="at")
    assert raw.name == "clicks" and raw.feature("topics").multi and raw.feature("topics").sep == ";"
    assert raw.time.tolist()[:3] == [0, 1, 2]


def test_load_table_needs_label_and_features(csv_file):
    with pytest.raises(ValueError, match=r"'clicks\.csv\.gz' is a table, so it needs its label column and feature"):
        load(str(csv_file), features=["user"])
    with pytest.raises(ValueError, match=r"needs its label column and feature columns, e\.g\. --label"):
        load(str(csv_file), label="clicked")


def test_load_missing_path_names_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = (
        f"data path '{tmp_path / 'data' / 'x.csv'}' does not exist; give a MovieLens folder/zip, "
        "a CSV/Parquet file, or 'synthetic'"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        load("data/x.csv", label="y", features=["a"])


def test_load_unknown_movielens_name_lists_known():
    with pytest.raises(ValueError, match=r"'movielens-10m' is not known; the MovieLens sources are movielens-100k, "):
        load("movielens-10m")


def test_load_file_of_unknown_kind(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match=r"neither a MovieLens folder/zip nor a table; table formats: \.csv"):
        load(str(tmp_path / "x.json"))


def test_movielens_source_names_have_archives():
    assert set(MOVIELENS_SOURCES.values()) == set(ARCHIVES)


def test_describe_sources_mentions_every_kind():
    text = describe_sources()
    for word in ("synthetic", *MOVIELENS_SOURCES, "EMBSIZE_CACHE", ".zip", ".parquet", "--label"):
        assert word in text


@pytest.mark.parametrize("kind", ["synthetic", "movielens", "table"])
def test_prepare_after_load_end_to_end(kind, ml100k, csv_file):
    if kind == "synthetic":
        raw = load("synthetic", synthetic_rows=2000)
    elif kind == "movielens":
        raw = load(str(ml100k))
    else:
        raw = load(str(csv_file), label="clicked", features=["user", "ad", "topics"], multi=["topics"], sep=";",
                   time="at")
    data = prepare(raw, split="temporal", fractions=(0.5, 0.5, 0.0))
    assert [f.name for f in data.features] == [f.name for f in raw.features]
    assert len(data.train) + len(data.val) + len(data.test) == len(raw)
    assert all(f.cardinality >= 2 for f in data.features)


@pytest.mark.skipif(not SHARED_ML100K.exists(), reason="shared MovieLens 100K not present")
def test_load_shared_movielens_100k_end_to_end():
    raw = load(str(SHARED_ML100K / "ml-100k.zip"))  # not the official archive's checksum, and that is fine
    assert len(raw) == 100_000
    assert raw.frame["user_id"].nunique() == 943 and raw.frame["item_id"].nunique() == 1682
    data = prepare(raw, split="temporal")
    cards = {f.name: f.cardinality for f in data.features}
    assert cards["gender"] == 3 and cards["occupation"] == 22  # 2 and 21 values + unknown
    assert next(f for f in data.features if f.name == "genres").multi


def test_load_movielens_name_refuses_options_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSIZE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"--label does not apply to data source 'movielens-100k'"):
        load("movielens-100k", label="rating")
    assert not (tmp_path / "movielens").exists()  # nothing was fetched
