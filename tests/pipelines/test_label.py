"""The binary label of a table: text pairs whose positive value is known map as before; any other text label needs
--positive-label (refused in one line, never guessed by sort order). Real files, through the loader and the CLI."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from pipelines.load import load
from pipelines.schema import LabelRule, binarize_label
from search.cli import main


@pytest.fixture(scope="module")
def click(tmp_path_factory):
    """The report's repro: 'click'/'noclick', true positive rate 0.531."""
    rng = np.random.default_rng(0)
    n = 2000
    u = rng.integers(0, 50, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-((u % 5) - 2)))).astype(int)
    path = tmp_path_factory.mktemp("lbl") / "click.csv"
    pd.DataFrame({"user": u, "y": np.where(y == 1, "click", "noclick")}).to_csv(path, index=False)
    return path, y


def _table(tmp_path, labels, name="t.csv"):
    n = len(labels)
    pd.DataFrame({"user": [f"u{i % 7}" for i in range(n)], "y": labels}).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def test_label_unknown_text_pair_refused_in_the_cli(click, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--data", str(click[0]), "--label", "y", "--features", "user", "--epochs", "1"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert lines == ["embsize: error: label column 'y' has the text values 'click' and 'noclick'; say which one is "
                     "positive with --positive-label click"]


@pytest.mark.parametrize("pair", [("spam", "ham"), ("clicked", "not_clicked"), ("a", "b")])
def test_label_unknown_text_pair_refused(pair, tmp_path):
    with pytest.raises(ValueError, match=r"has the text values .* with --positive-label"):
        load(str(_table(tmp_path, [pair[0], pair[1], pair[1]] * 10)), label="y", features=["user"])


@pytest.mark.parametrize(
    "labels, positive",
    [
        (["yes", "no"], "yes"), (["Yes", "no"], "Yes"), (["YES", "No", "yes"], None), (["True", "False"], "True"),
        (["Y", "N"], "Y"), ([" t ", "f"], " t "), (["positive", "Negative"], "positive"), (["POS", "neg"], "POS"),
    ],
)
def test_label_known_text_pairs_map_case_insensitively(labels, positive, tmp_path):
    raw = load(str(_table(tmp_path, labels * 10)), label="y", features=["user"])
    if positive is None:  # YES and yes positive, No negative
        positive_rows = [v.lower() == "yes" for v in labels * 10]
    else:
        positive_rows = [v == positive for v in labels * 10]
    assert raw.label.tolist() == [float(p) for p in positive_rows]


def test_label_numeric_and_bool_unchanged(tmp_path):
    assert binarize_label(pd.Series([True, False, True]), LabelRule("y")).tolist() == [1, 0, 1]
    assert binarize_label(pd.Series(["1", "0", "0"]), LabelRule("y")).tolist() == [1, 0, 0]
    assert binarize_label(pd.Series([-1, 1, 1]), LabelRule("y")).tolist() == [0, 1, 1]  # the larger is positive
    raw = load(str(_table(tmp_path, [True, False, False] * 10)), label="y", features=["user"])
    assert raw.label.tolist() == [1.0, 0.0, 0.0] * 10


def test_label_positive_label_rule(click):
    path, y = click
    values = pd.read_csv(path)["y"]
    assert np.array_equal(binarize_label(values, LabelRule("y", positive="click")), y.astype(np.float32))
    assert np.array_equal(binarize_label(values, LabelRule("y", positive="noclick")), 1 - y.astype(np.float32))


def test_label_multi_valued_text_needs_positive_label(tmp_path):
    values = pd.Series(["click", "view", "buy", "view", "click"] * 4)
    with pytest.raises(ValueError, match=r"^label column 'y' has 3 distinct text values, not 2; say which one is "
                                         r"positive with --positive-label VALUE"):
        binarize_label(values, LabelRule("y"))
    y = binarize_label(values, LabelRule("y", positive="click"))
    assert y.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0] * 4
    numeric = pd.Series([1, 2, 3, 4, 5] * 4)  # numbers keep the threshold advice
    with pytest.raises(ValueError, match=r"give a threshold \(e.g. --positive-threshold 4\)"):
        binarize_label(numeric, LabelRule("y"))


def test_label_positive_label_refusals(click, tmp_path):
    values = pd.Series(["click", "view", "buy"] * 4)
    with pytest.raises(ValueError, match=r"^--positive-label 'Click' is not a value of label column 'y'; its values "
                                         r"are 'buy', 'click', 'view'$"):
        binarize_label(values, LabelRule("y", positive="Click"))
    with pytest.raises(ValueError, match=r"^--positive-threshold and --positive-label both given"):
        binarize_label(values, LabelRule("y", threshold=1.0, positive="click"))
    with pytest.raises(ValueError, match=r"^--positive-threshold and --positive-label both given"):
        load(str(click[0]), label="y", features=["user"], threshold=1.0, positive_label="click")
    with pytest.raises(ValueError, match=r"^--positive-label does not apply to data source 'synthetic'"):
        load("synthetic", positive_label="click")


def test_label_positive_label_through_the_cli(click, tmp_path, monkeypatch, capsys):
    path, y = click
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--data", str(path), "--label", "y", "--features", "user", "--epochs", "1",
                 "--positive-label", "click"])
    out = capsys.readouterr().out
    assert code == 0
    raw = load(str(path), label="y", features=["user"], positive_label="click")
    assert np.array_equal(raw.label, y.astype(np.float32)) and round(float(raw.label.mean()), 3) == 0.531
    assert "positive rate" in out
