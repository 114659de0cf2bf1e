"""Search -> recommended.yaml -> final fit -> MLflow run + registry -> pyfunc / plain export / HTTP server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines import FeatureInfo, ModelConfig, SyntheticSpec, TrainConfig, generate, load_model, prepare, score
from pipelines.recipe import Recipe
from search.cli import main
from search.production import check_data, final_epochs, fit_final, log_final
from search.runner import SearchSettings, run_search
from search.space import SearchSpec, build_space

from ..pipelines.test_recipe import BAD_EDITS, edited, written_recipe
from ..ports import free_port

ROWS = 3000  # `--data synthetic --rows 3000`: the CLI rebuilds exactly the searched data


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("production")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    raw = generate(SyntheticSpec(rows=ROWS))
    data = prepare(raw)
    settings = SearchSettings(name="prod", trials=3, max_epochs=2, patience=0, scheduler="fifo", heuristics=False,
                              tracking_uri=uri, output_dir=str(tmp / "out"))
    result = run_search(data, build_space(data.features, SearchSpec(max_dim=16)), settings,
                        {"source": "synthetic", "rows": ROWS})
    return tmp, uri, raw, data, result


@pytest.fixture(scope="module")
def shipped(searched):
    """The library path: final fit in this process, logged and registered as 'recsys' version 1."""
    tmp, uri, raw, data, result = searched
    recipe = Recipe.load(result.recipe_path)
    epochs, why = final_epochs(recipe, MlflowClient(uri))
    final = fit_final(recipe, data, epochs, why)
    out = log_final(final, raw.frame.head(5), uri, register="recsys", export_dir=tmp / "export",
                    source_recipe=result.recipe_path)
    return final, out


@pytest.mark.slow
def test_final_fit_trains_the_best_epoch_of_the_recommended_trial(searched, shipped):
    _, uri, _, data, result = searched
    final, _ = shipped
    history = MlflowClient(uri).get_metric_history(result.recommended["run_id"], "val_auc")
    best = max(history, key=lambda m: (m.value, -m.step)).step
    assert final.epochs == best and "MLflow run" in final.epochs_from
    assert final.fingerprint_match and final.recipe.dataset["fingerprint"] == data.fingerprint
    assert 0 <= final.metrics["test_auc"] <= 1
    assert dict(final.recipe.model.dims) == result.recommended["dims"]


@pytest.mark.slow
def test_final_run_links_to_the_search_and_registers_the_model(searched, shipped):
    _, uri, _, data, result = searched
    final, out = shipped
    c = MlflowClient(uri)
    run = c.get_run(out["run_id"])
    parent = c.get_run(result.parent_run_id)
    assert run.info.experiment_id == parent.info.experiment_id
    assert run.data.tags["mlflow.parentRunId"] == run.data.tags["embsize.search_run_id"] == result.parent_run_id
    assert run.data.tags["embsize.fingerprint_match"] == "true"
    assert run.data.metrics["test_auc"] == pytest.approx(final.metrics["test_auc"])
    assert "recommended.yaml" in {a.path for a in c.list_artifacts(out["run_id"])}
    version = c.get_model_version("recsys", "1")
    assert version.run_id == out["run_id"] and out["model_uri"] == "models:/recsys/1"
    assert version.tags["embsize.fingerprint"] == data.fingerprint
    assert float(version.tags["metric.test_auc"]) == pytest.approx(final.metrics["test_auc"], rel=1e-5)


@pytest.mark.slow
def test_search_still_reviews_after_a_final_run_nested_under_it(searched, shipped, capsys):
    """The production run sits under the search's parent run; review, report and confirm read trials only."""
    from search.review import load_review
    from search.tracking import child_runs

    tmp, uri, _, _, result = searched
    _, out = shipped
    c = MlflowClient(uri)
    parent = c.get_run(result.parent_run_id)
    nested = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert out["run_id"] in {r.info.run_id for r in nested}  # the production run is nested under the search
    trials = child_runs(c, parent.info.experiment_id, result.parent_run_id)
    assert sorted(r.info.run_id for r in trials) == sorted(t["run_id"] for t in result.trials)
    review = load_review(result.parent_run_id, uri)
    assert sorted(t["trial_id"] for t in review.trials) == sorted(t["trial_id"] for t in result.trials)
    assert review.recommended["trial_id"] == result.recommended["trial_id"]
    assert main(["report", result.parent_run_id, "--tracking-uri", uri, "--out", str(tmp / "report")]) == 0
    assert "could not convert" not in capsys.readouterr().err


@pytest.mark.slow
def test_registered_pyfunc_scores_like_the_in_process_model(searched, shipped):
    _, uri, raw, _, _ = searched
    final, out = shipped
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/recsys/1")
    rows = raw.frame.sample(200, random_state=0)
    expected = score(final.model, final.data.encoder, rows)
    assert np.array_equal(model.predict(rows)["score"].to_numpy(), expected)
    exported, encoder = load_model(out["export"])
    assert np.array_equal(score(exported, encoder, rows), expected)
    unseen = pd.DataFrame({c: ["never-seen"] for c in raw.frame.columns})
    assert np.isfinite(model.predict(unseen)["score"].to_numpy()).all()


@pytest.mark.slow
def test_cli_train_config_registers_and_exports(searched, tmp_path, capsys):
    _, uri, raw, _, result = searched
    export = tmp_path / "cli-export"
    code = main(["train", "--config", str(result.recipe_path), "--rows", str(ROWS), "--register", "cli-model",
                 "--export", str(export), "--tracking-uri", uri])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "registered models:/cli-model/1" in printed.out and "warning" not in printed.err
    assert f"(val AUC {Recipe.load(result.recipe_path).expected['val_auc']:.4f}, the search's trial)" in printed.out
    mlflow.set_tracking_uri(uri)
    rows = raw.frame.head(100)
    model, encoder = load_model(export)
    served = mlflow.pyfunc.load_model("models:/cli-model/1").predict(rows)["score"].to_numpy()
    assert np.array_equal(served, score(model, encoder, rows))


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_raw_rows_with_the_same_scores(searched, shipped, tmp_path):
    _, uri, raw, _, _ = searched
    final, _ = shipped
    port = free_port()
    # mlflow runs `uvicorn` from PATH: this interpreter's bin folder first, even when its venv is not activated
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/recsys/1", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not answer /ping in 180 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        rows = pd.concat([raw.frame.head(20), pd.DataFrame({c: ["never-seen"] for c in raw.frame.columns})])
        body = b'{"dataframe_split": ' + rows.to_json(orient="split", index=False).encode() + b"}"
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", body)
        assert status == 200, answer
        served = np.array([p["score"] for p in answer["predictions"]], dtype=np.float32)
        assert np.array_equal(served, score(final.model, final.data.encoder, rows))
        bad = b'{"dataframe_split": ' + rows.drop(columns="genre").to_json(orient="split", index=False).encode() + b"}"
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", bad)
        assert status == 400 and "missing column 'genre'" in answer["message"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


FEATURES = (FeatureInfo("user_id", False, 10), FeatureInfo("item_id", False, 20))


def _recipe(**kw) -> Recipe:
    return Recipe(kw.pop("features", FEATURES), ModelConfig({"user_id": 2, "item_id": 3}, (4,)),
                  TrainConfig(max_epochs=7), **kw)


def test_final_epochs_prefers_best_epoch_then_trained_epochs_then_budget():
    assert final_epochs(_recipe(expected={"best_epoch": 3, "epochs": 6}))[0] == 3
    assert final_epochs(_recipe(expected={"epochs": 6}))[0] == 6
    assert final_epochs(_recipe()) == (7, "the recipe's max_epochs")


def test_check_data_warns_on_another_fingerprint_and_refuses_other_features():
    data = prepare(generate(SyntheticSpec(rows=500)))
    same = Recipe(data.features, ModelConfig({f.name: 2 for f in data.features}), TrainConfig(),
                  dataset={"fingerprint": data.fingerprint})
    assert check_data(same, data) is None
    other = Recipe(same.features, same.model, same.train, dataset={"fingerprint": "0123", "rows": 9})
    warning = check_data(other, data)
    assert "0123" in warning and data.fingerprint in warning and "rows=9" in warning
    with pytest.raises(ValueError, match="feature 'item_id' is missing"):
        check_data(_recipe(), data)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_cli_train_config_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("features: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in _one_error_line(capsys)
    other = _recipe().save(tmp_path / "other.yaml")
    assert main(["train", "--config", str(other), "--rows", "500"]) == 2
    assert "does not fit the config" in _one_error_line(capsys)
    assert main(["train", "--register", "x"]) == 2
    assert "need --config" in _one_error_line(capsys)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep")
    assert main(["train", "--config", str(other), "--export", str(taken)]) == 2
    assert "is not an embsize export" in _one_error_line(capsys)
    # refused before the data is loaded or a model trained: nothing is written, however long training would take
    for args, fragment in (
        (["--register", "bad/name"], "--register 'bad/name' is not a valid MLflow model name: Names cannot contain"),
        (["--tracking-uri", f"http://127.0.0.1:{free_port()}"], "does not answer"),
        (["--tracking-uri", "bogus://x"], "has scheme 'bogus'"),
        (["--export", "/proc/embsize-export"], "--export directory '/proc/embsize-export' is not writable"),
        # the config fixes the model and its training: these were silently ignored
        (["--epochs", "2"], "--epochs conflicts with --config"),
        (["--lr", "0.1", "--hidden", "8", "--sparse"], "--hidden, --lr, --sparse conflict with --config"),
    ):
        before = sorted(p.name for p in tmp_path.iterdir())
        started = time.perf_counter()
        assert main(["train", "--config", str(other), *args]) == 2
        assert fragment in _one_error_line(capsys)
        assert time.perf_counter() - started < 15 and sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_train_config_rebuilds_the_synthetic_data_the_recipe_records(tmp_path, tracking_uri, capsys):
    """Without data options, a synthetic recipe's own rows, seed, split and min_freq rebuild the searched data (the
    default 100000 rows would not); an explicit --rows still overrides, with the fingerprint warning."""
    options = {"rows": 600, "seed": 5, "split": "temporal", "min_freq": 2}
    data = prepare(generate(SyntheticSpec(rows=600, seed=5)), split="temporal", seed=5, min_freq=2)
    path = Recipe(data.features, ModelConfig({f.name: 2 for f in data.features}, (4,)), TrainConfig(),
                  dataset={"source": "synthetic", **options, "fingerprint": data.fingerprint},
                  expected={"best_epoch": 1, "val_auc": 0.61, "seeds": [4, 5, 6]}).save(tmp_path / "recommended.yaml")
    assert main(["train", "--config", str(path), "--tracking-uri", tracking_uri]) == 0
    printed = capsys.readouterr()
    assert "embsize: warning" not in printed.err and f"{len(data.train) + len(data.val)} rows" in printed.out
    assert "(val AUC 0.6100, mean over seeds 4, 5, 6)" in printed.out  # confirm's / refine's recipe: a seeds' mean
    assert main(["train", "--config", str(path), "--tracking-uri", tracking_uri, "--rows", "700"]) == 0
    assert f"differs from the search's {data.fingerprint}" in capsys.readouterr().err


def test_train_config_takes_the_recipes_data_options_not_given():
    from types import SimpleNamespace

    from search.cli import build_parser
    from search.production import _searched_data

    table = SimpleNamespace(dataset={
        "source": "/data/events.parquet", "split": "temporal", "seed": 3, "min_freq": 2, "rows": 5000,
        "label": "clicked", "features": "user_id,item_id,tags", "multi": "tags", "time_column": "ts",
        "positive_label": "yes", "fingerprint": "abc"})

    def taken(*argv: str) -> dict:
        args = build_parser().parse_args(["train", "--config", "r.yaml", *argv])
        after = vars(_searched_data(args, table))
        return {k: v for k, v in after.items() if v != vars(args)[k]}

    common = {"split": "temporal", "seed": 3, "min_freq": 2, "label": "clicked", "time_column": "ts",
              "positive_label": "yes"}
    # no --data: the searched table, read as the search read it (rows is a table's count, never --rows)
    assert taken() == {"data": "/data/events.parquet", **common, "features": "user_id,item_id,tags",
                       "multi": "tags"}
    # a newer snapshot: the search's label, columns and split
    assert taken("--data", "today.parquet") == {**common, "features": "user_id,item_id,tags", "multi": "tags"}
    # columns named now replace the recipe's features and multi both; options given now win
    assert taken("--data", "t.parquet", "--features", "user_id,item_id", "--seed", "7", "--label", "click") == {
        k: v for k, v in common.items() if k not in ("seed", "label")}
    synthetic = SimpleNamespace(dataset={"source": "synthetic", "rows": 20000, "seed": 1, "split": "random",
                                         "min_freq": 1})
    args = build_parser().parse_args(["train", "--config", "r.yaml"])
    assert (vars(_searched_data(args, synthetic))["rows"], vars(_searched_data(args, synthetic))["seed"]) == (20000, 1)


def test_cli_train_config_whose_data_moved_says_to_pass_data(tmp_path, monkeypatch, capsys):
    """The config records the searched file's absolute path; once it moved, the fix is --data, which the generic
    "give a MovieLens folder/zip, a CSV/Parquet file" did not say."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recommended.yaml"
    written_recipe(path)  # its data, tmp_path/events.csv, was never written
    assert main(["train", "--config", str(path)]) == 2
    err = _one_error_line(capsys)
    assert f"the config's data '{tmp_path / 'events.csv'}' does not exist" in err
    assert "pass where that data is now with --data" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recommended.yaml"]


@pytest.mark.parametrize("field, value, message", BAD_EDITS, ids=[f"{f}={v!r}" for f, v, _ in BAD_EDITS])
def test_cli_train_config_refuses_a_hand_edited_field_with_one_line(tmp_path, monkeypatch, capsys, field, value,
                                                                    message):
    """Each edit once ended in a traceback, a message without the field, or a model trained on something else."""
    monkeypatch.chdir(tmp_path)  # the default MLflow store would be ./mlruns: nothing may be written there either
    path = tmp_path / "recommended.yaml"
    written_recipe(path)
    edited(path, field, value)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", "--config", str(path)]) == 2
    assert message.format(src=f"config file '{path.resolve()}'") in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_train_refuses_dims_beyond_the_machines_memory_before_allocating(tmp_path, monkeypatch, capsys):
    """`--dims user_id=1000000000000` once crashed in torch's allocator (RuntimeError, exit 1), with --config too."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    csv = tmp_path / "F.csv"
    pd.DataFrame({"user_id": rng.integers(0, 20, 400), "item_id": rng.integers(0, 30, 400),
                  "clicked": rng.integers(0, 2, 400)}).to_csv(csv, index=False)
    huge = "its largest dim is user_id=1000000000000; lower it"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", "--data", str(csv), "--label", "clicked", "--features", "user_id,item_id",
                 "--dims", "user_id=1000000000000,item_id=4", "--epochs", "1"]) == 2
    err = _one_error_line(capsys)
    assert huge in err and "bytes" in err and "available" in err
    path = tmp_path / "recommended.yaml"
    written_recipe(path)
    edited(path, "model.dims.user_id", 10**12)
    before.append(path.name)
    started = time.perf_counter()
    assert main(["train", "--config", str(path)]) == 2
    assert huge in _one_error_line(capsys)
    assert time.perf_counter() - started < 5  # before the tracking store, the data and torch's allocator
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
