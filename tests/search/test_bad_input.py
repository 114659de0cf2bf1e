"""Bad input through the CLI: exit code 2, one line on stderr naming the problem and the fix, no traceback, and no
file left behind (no output folder, no empty mlruns/). In-process through ``main`` (the console script's code path),
plus a few in real processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from search.cli import main

from ..ports import free_port


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Input files, in their own folder (the tests check that nothing appears in the working folder)."""
    d = tmp_path_factory.mktemp("inputs")
    ok = pd.DataFrame({"user": list("abcdefgh") * 5, "item": list("pqrs") * 10, "y": [0, 1] * 20,
                       "rating": [1, 2, 3, 4, 5] * 8, "one": ["x"] * 40})
    ok.to_csv(d / "ok.csv", index=False)
    ok.to_csv(d / "semi.csv", index=False, sep=";")
    ok.assign(y=1).to_csv(d / "constant.csv", index=False)
    ok.assign(y=["click", "noclick"] * 20).to_csv(d / "click.csv", index=False)
    ok.assign(y=[0, 1, None, 1] * 10).to_csv(d / "holes.csv", index=False)
    (d / "long_row.csv").write_text(ok.to_csv(index=False) + "a,p,0,1,x,extra\n")  # pandas' usecols dropped it
    (d / "short_row.csv").write_text(ok.to_csv(index=False) + "a,p\n")
    (d / "empty.csv").write_text("")
    (d / "header.csv").write_text("user,item,y\n")
    (d / "notes.txt").write_text("hello")
    (d / "table.json").write_text("{}")
    (d / "broken.parquet").write_bytes(b"not a parquet file")
    specs = {
        "invalid.yaml": "max_dim: [1, 2\n",
        "unknown_key.yaml": "max_dims: 32\n",
        "wrong_type.yaml": "max_dim: big\n",
        "list.yaml": "- 1\n- 2\n",
        "low_zero.yaml": "features:\n  user_id: {low: 0, high: 8}\n",
        "high_over_max.yaml": "max_dim: 16\nfeatures:\n  user_id: {low: 2, high: 32}\n",
        "unknown_feature.yaml": "features:\n  nosuch: 8\n",
        "pin_and_range.yaml": "features:\n  user_id: {pin: 4, low: 2}\n",
        "lr_negative.yaml": "lr: -0.1\n",
        "huge_pin.yaml": "features:\n  user_id: {pin: 100000000}\nmax_dim: 100000000\n",
    }
    for name, text in specs.items():
        (d / name).write_text(text)
    (d / "a_file").write_text("x")
    (d / "a_dir").mkdir()
    return {p.name: str(p) for p in d.iterdir()}


SMALL = ["--rows", "2000"]  # synthetic data: loads in well under a second
CSV = ["--label", "y", "--features", "user,item"]

# (argv with {file} placeholders, a fragment of the one stderr line). The fragments name the problem and, where the
# message gives one, the fix.
CASES = [
    # paths and formats
    (["search", "--data", "{missing.csv}", *CSV], "does not exist; give a MovieLens folder/zip, a CSV/Parquet"),
    (["search", "--data", "{notes.txt}", "--label", "y", "--features", "a"], "column 'a' is not in 'notes.txt'"),
    (["search", "--data", "{table.json}", *CSV], "nor a table; table formats: .csv"),
    (["search", "--data", "{empty.csv}", *CSV], "is empty; give a file with a header row"),
    (["search", "--data", "{header.csv}", *CSV], "has a header but no data rows"),
    (["search", "--data", "{broken.parquet}", *CSV], "Parquet magic bytes not found"),
    (["search", "--data", "{semi.csv}", "--delimiter", ",", *CSV], "pass --delimiter ';'"),
    (["search", "--data", "{ok.csv}", "--delimiter", ";", *CSV], "--delimiter"),
    (["search", "--data", "movielens-9m"], "is not known"),
    (["search", "--data", "{long_row.csv}", *CSV], "line 42 of '"),
    (["search", "--data", "{long_row.csv}", *CSV], "long_row.csv' has 6 fields, but the header has 5; fix the row "
                                                    "(quote a value that contains ','), or pass the right --delimiter"),
    (["train", "--data", "{short_row.csv}", *CSV], "short_row.csv' has 2 fields, but the header has 5; fix the row "
                                                   "(give each column a field, empty if missing), or pass the right"),
    # labels and features
    (["search", "--data", "{ok.csv}", "--label", "nolabel", "--features", "user"], "column 'nolabel' is not in"),
    (["search", "--data", "{constant.csv}", *CSV], "constant"),
    (["search", "--data", "{holes.csv}", *CSV], "missing values"),
    (["search", "--data", "{ok.csv}", "--label", "rating", "--features", "user"], "--positive-threshold"),
    (["train", "--data", "{click.csv}", *CSV], "label column 'y' has the text values 'click' and 'noclick'; say "
                                             "which one is positive with --positive-label click"),
    (["search", "--data", "{ok.csv}", "--label", "user", "--features", "item"],
     "8 distinct text values, not 2; say which one is positive with --positive-label"),
    (["train", "--data", "{click.csv}", *CSV, "--positive-label", "click", "--positive-threshold", "1"],
     "--positive-threshold and --positive-label both given"),
    (["search", *SMALL, "--positive-label", "1"], "--positive-label does not apply to data source 'synthetic'"),
    (["search", "--data", "{ok.csv}", "--label", "y", "--features", "user,one"], "feature 'one' has only the value"),
    (["search", "--data", "{ok.csv}", "--label", "y", "--features", "user,zzz"], "column 'zzz' is not in"),
    (["search", "--data", "{ok.csv}", "--label", "y", "--features", "user,y"], "also listed as a feature"),
    (["search", "--data", "{ok.csv}", *CSV, "--multi", "zzz"], "column 'zzz' is not in"),
    # a table has no time column until --time-column names one: say so, not only "use --split random"
    (["search", "--data", "{ok.csv}", *CSV, "--split", "temporal"], "name its time column with --time-column"),
    # budget and dims
    (["search", *SMALL, "--checkpoint-every", "-1"], "--checkpoint-every is -1.0, but must be >= 0 seconds"),
    (["search", *SMALL, "--checkpoint-every", "nan"], "--checkpoint-every is nan, but must be >= 0 seconds"),
    (["search", *SMALL, "--memory-budget", "10"], "raise the budget"),
    # `embsize search` has no --hidden: the MLP width is searched or fixed in the spec
    (["search", *SMALL, "--memory-budget", "10"], "the pinned dims or the MLP width (`hidden` in --spec)"),
    (["search", *SMALL, "--memory-budget", "lots"], "memory budget 'lots' is not a size"),
    (["search", *SMALL, "--max-dim", "0"], "max_dim is 0, but must be >= 1"),
    (["search", *SMALL, "--min-dim", "10", "--max-dim", "5"], "raise max_dim or lower min_dim"),
    (["search", *SMALL, "--spec", "{low_zero.yaml}"], "features.user_id.low is 0, but must be >= 1"),
    (["search", *SMALL, "--spec", "{high_over_max.yaml}"], "must be <= max_dim (16)"),
    (["search", *SMALL, "--spec", "{unknown_feature.yaml}"], "unknown feature 'nosuch'; known features"),
    (["search", *SMALL, "--spec", "{pin_and_range.yaml}"], "give either a pin or a range"),
    (["train", *SMALL, "--dims", "user_id=0"], "dim for 'user_id' is 0, but must be >= 1"),
    (["train", *SMALL, "--tracking-uri", "sqlite:///x.db"], "need --config"),
    (["train", "--config", "{a_dir}"], "is a folder; give the recommended.yaml"),
    (["search", *SMALL, "--sep", ";"], "--sep does not apply to data source 'synthetic'"),
    # the search spec: YAML, unknown keys, wrong types
    (["search", *SMALL, "--spec", "{invalid.yaml}"], "is not valid YAML at line"),
    (["search", *SMALL, "--spec", "{missing.yaml}"], "does not exist; check the --spec path"),
    (["search", *SMALL, "--spec", "{unknown_key.yaml}"], "unknown key 'max_dims'"),
    (["search", *SMALL, "--spec", "{wrong_type.yaml}"], "max_dim is 'big', but must be an integer"),
    (["search", *SMALL, "--spec", "{list.yaml}"], "must be a mapping"),
    (["search", *SMALL, "--spec", "{lr_negative.yaml}"], "lr is -0.1, but must be > 0"),
    # search options
    (["search", "--trials", "0"], "--trials is 0, but must be >= 1"),
    (["search", "--scheduler", "magic"], "invalid choice: 'magic'"),
    (["search", "--max-epochs", "0"], "--max-epochs is 0"),
    (["search", "--batch-size", "0"], "--batch-size is 0, but must be >= 1"),
    (["search", "--reduction-factor", "1"], "--reduction-factor is 1.0, but must be > 1"),
    (["search", "--epsilon", "1.5"], "--epsilon is 1.5"),
    (["confirm", "any", "--refine", "--refine-tolerance", "nan"], "--refine-tolerance is nan, but must be in [0, 1)"),
    (["confirm", "any", "--refine", "--refine-tolerance", "-0.01"], "--refine-tolerance is -0.01"),
    (["confirm", "any", "--refine-tolerance", "0.01"], "without --refine; add --refine or drop it"),
    (["search", "--max-concurrent", "0"], "--max-concurrent is 0"),
    (["search", "--trials", "many"], "invalid int value: 'many'"),
    (["search", "--trails", "5"], "unrecognized arguments: --trails 5 (see `embsize search --help`)"),
    (["search", "--seed", "-1"], "argument --seed: '-1' is not an integer >= 0"),
    (["train", "--seed", "x"], "argument --seed: 'x' is not an integer >= 0"),
    (["search", "--name", "../escape"], "is not a plain name"),
    (["search", "--resume", "never-ran"], "no search named 'never-ran'"),
    (["search", "--resume", "a", "--name", "b"], "name different searches"),
    # unreachable services
    (["search", *SMALL, "--tracking-uri", "http://127.0.0.1:{closed}"], "does not answer"),
    (["search", *SMALL, "--tracking-uri", "http://u:pw@no-such-host.invalid:5000"], "pass a reachable --tracking-uri"),
    (["search", *SMALL, "--tracking-uri", "sqlite:////proc/embsize/mlflow.db"], "pass a writable --tracking-uri"),
    (["search", *SMALL, "--tracking-uri", "bogus://x"], "has scheme 'bogus', for which MLflow has no store"),
    (["search", *SMALL, "--tracking-uri", "./mytrack"], "is a folder, MLflow's file store"),
    (["search", *SMALL, "--experiment", ""], "--experiment is empty"),
    (["search", "--rows", "10"], "holds one label class only, so its AUC is undefined; give more rows"),
    (["report", "any", "--tracking-uri", "http://127.0.0.1:{closed}"], "does not answer"),
    (["report", "any"], "no MLflow store at"),  # and no empty store created by asking
    (["report", "any", "--tracking-uri", "bogus://x"], "for which MLflow has no store"),
    (["report", "any", "--out", "{a_file}"], "is not writable; choose another with --out"),
    (["confirm", "any", "--tracking-uri", "http://127.0.0.1:{closed}"], "does not answer"),
    (["confirm", "any", "--out", "/proc/embsize-confirm"], "confirm folder '/proc/embsize-confirm' is not writable"),
    (["search", *SMALL, "--cpus-per-trial", "64"], "--cpus-per-trial is 64, but the largest Ray node has"),
    (["search", *SMALL, "--gpus-per-trial", "1"], "--gpus-per-trial is 1, but the largest Ray node has 0 GPUs"),
    (["search", *SMALL, "--storage-path", "s3://no-bucket/dir?endpoint_override=127.0.0.1:{closed}&scheme=http"],
     "Ray Tune storage 's3://no-bucket/dir?endpoint_override=127.0.0.1:"),
    (["search", *SMALL, "--storage-path", "/proc/embsize-ray"], "Ray Tune storage '/proc/embsize-ray' is not writable"),
    (["search", *SMALL, "--address", "127.0.0.1:{closed}"], "Ray cluster at '127.0.0.1:"),
    (["search", *SMALL, "--address", "not-an-address"], "is not HOST:PORT"),
    # output folder
    (["search", *SMALL, "--output-dir", "/proc/embsize-out"], "is not writable; choose another with --output-dir"),
    (["search", *SMALL, "--output-dir", "{a_file}/out"], "is not writable"),
    # found by a probe: each was a traceback after Ray had started and outputs were written
    (["search", *SMALL, "--memory-budget=1e400"], "memory budget '1e400' is not a finite size"),
    (["search", *SMALL, "--tracking-uri", "sqlite://"], "is an in-memory SQLite store"),
    (["search", *SMALL, "--tracking-uri", "sqlite:///:memory:"], "is an in-memory SQLite store"),
    (["search", *SMALL, "--tracking-uri", "sqlite:////tmp/p%41/mlflow.db"], "holds '%', which a SQLite URI cannot"),
    (["search", *SMALL, "--spec", "{huge_pin.yaml}"], "training the smallest model in the search space needs about"),
]


def _argv(args: list[str], files: dict[str, str], missing_dir: Path) -> list[str]:
    out = []
    for a in args:
        for name in ("missing.csv", "missing.yaml"):
            a = a.replace("{" + name + "}", str(missing_dir / name))
        for name, path in files.items():
            a = a.replace("{" + name + "}", path)
        out.append(a.replace("{closed}", str(free_port())))
    return out


def test_bad_input_table_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("args, fragment", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_one_line_exit_2_nothing_written(args, fragment, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(_argv(args, files, tmp_path / "nowhere"))
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("embsize: error: "), captured.err
    assert fragment in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert list(tmp_path.iterdir()) == []  # no output folder, no mlruns/


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**env, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["search", "--rows", "2000", "--tracking-uri", "http://127.0.0.1:{closed}"], "tracking server"),
        (["search", "--rows", "2000", "--address", "127.0.0.1:{closed}"], "Ray cluster"),
        (["search", "--rows", "2000", "--spec", "{invalid.yaml}"], "not valid YAML"),
        (["search", "--data", "{long_row.csv}", *CSV], "has 6 fields, but the header has 5"),
    ],
)
def test_bad_input_in_a_real_process(args, fragment, files, tmp_path):
    p = _run(_argv(args, files, tmp_path / "nowhere"), tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embsize: error: ") and fragment in lines[0], p.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_storage_bucket_that_does_not_exist_is_refused_before_anything_is_written(s3_endpoint, tmp_path,
                                                                                       monkeypatch, capsys):
    """Ray Tune creates the storage path's folders but not its bucket: a search given a missing bucket failed with
    pyarrow's traceback ("Bucket 'nobucket' not found") once the output folder existed. On a local S3 server."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"s3://no-such-bucket/ray?endpoint_override={s3_endpoint}&scheme=http"
    code = main(["search", *SMALL, "--storage-path", uri])
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, captured.err
    assert err[0] == (f"embsize: error: Ray Tune storage '{uri}' names bucket 'no-such-bucket', which does not exist; "
                      "create it (e.g. `aws s3 mb s3://no-such-bucket`) or fix --storage-path")
    assert list(tmp_path.iterdir()) == []


def test_a_disk_too_full_for_a_search_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """A search on a nearly full disk died mid-way with Optuna's or Ray's OSError traceback and left its state files
    cut short. The floor is raised here past any disk's free space; the real check (shutil.disk_usage) runs."""
    from search import preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(preflight, "FREE_FLOOR", 2**62)
    code = main(["search", "--rows", "2000"])
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, captured.err
    assert err[0].startswith(f"embsize: error: the disk of the output directory '{tmp_path / 'embsize-out'}")
    assert "MB free, and a search needs at least" in err[0] and "pass --output-dir on another disk" in err[0]
    assert list(tmp_path.iterdir()) == []  # no output folder, no mlruns/
