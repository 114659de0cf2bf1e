from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines import RawDataset, Feature, prepare
from pipelines.split import split_rows
from pipelines.synthetic import PlantedFeature, SyntheticSpec, generate


def _raw(n=400, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"u": rng.integers(0, 50, n).astype(str), "g": ["a|b", "b", "c|a", ""] * (n // 4)})
    y = (rng.random(n) < 0.4).astype(np.float32)
    return RawDataset("t", frame, (Feature("u"), Feature("g", multi=True)), y, time=rng.permutation(n))


@pytest.mark.parametrize("method", ["random", "temporal"])
def test_split_rows_disjoint_and_complete(method):
    time = np.random.default_rng(1).permutation(1000)
    tr, va, te = split_rows(1000, method, (0.7, 0.2, 0.1), seed=3, time=time)
    allrows = np.concatenate([tr, va, te])
    assert len(allrows) == 1000 and len(np.unique(allrows)) == 1000
    if method == "temporal":
        assert time[tr].max() < time[va].min() and time[va].max() < time[te].min()


def test_split_rows_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        split_rows(10, "random", (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="temporal"):
        split_rows(10, "temporal", time=None)


def test_prepare_vocab_sees_training_rows_only():
    raw = _raw()
    # a value present only in the last rows: with a temporal split on row order it must not enter the vocabulary
    raw.frame.loc[390:, "u"] = "late-only"
    raw.time = np.arange(len(raw))
    ds = prepare(raw, split="temporal")
    assert "late-only" not in ds.encoder.vocabs["u"].categories
    assert (ds.test.columns["u"].values[-10:] == 0).all()


def test_prepare_fingerprint_tracks_content():
    a, b = prepare(_raw(seed=0)), prepare(_raw(seed=0))
    c = prepare(_raw(seed=1))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_for_training_ships_train_and_val_as_they_are_and_nothing_else():
    import pickle

    ds = prepare(_raw())
    slim = ds.for_training()
    assert slim.encoder is None and len(slim.test) == 0
    assert set(slim.test.columns) == set(ds.test.columns)
    assert slim.train is ds.train and slim.val is ds.val  # the same arrays, not copies
    assert (slim.features, slim.fingerprint) == (ds.features, ds.fingerprint)
    assert len(pickle.dumps(slim)) < len(pickle.dumps(ds))


def test_prepare_refuses_empty_dataset():
    raw = _raw()
    empty = RawDataset("t", raw.frame.iloc[:0], raw.features, raw.label[:0])
    with pytest.raises(ValueError, match="no rows"):
        prepare(empty)


def test_synthetic_is_seeded_and_planted():
    spec = SyntheticSpec(features=(PlantedFeature("a", 50, 4), PlantedFeature("b", 30, 2, multi=True)), rows=2000)
    x, y = generate(spec), generate(spec)
    assert x.frame.equals(y.frame) and np.array_equal(x.label, y.label)
    assert x.meta["planted_dims"] == {"a": 4, "b": 2}
    assert 0.2 < x.label.mean() < 0.8
    assert x.frame["b"].str.contains("|", regex=False).any()
