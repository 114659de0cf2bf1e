"""`embsize report`: a finished search read back from MLflow, its numbers, files and uploaded artifacts."""
from __future__ import annotations

import math
from html.parser import HTMLParser
from urllib.parse import urlparse

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.cli import main
from search.pareto import hypervolume, non_dominated
from search.recommend import recommend
from search.report import SEARCH_ARTIFACTS, TITLE_CHARS, curves_title, log_report, report_text, write_report
from search.review import find_parent, load_review, metric_histories
from search.sensitivity import journal_study, sensitivity

from .small_search import small_search
from .tables import read_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    return small_search(tmp_path_factory)


@pytest.fixture(scope="module")
def reviewed(searched):
    result, uri, _, _ = searched
    return load_review(result.parent_run_id, uri)


def _children(uri: str, parent_id: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_review_numbers_equal_those_computed_from_the_mlflow_runs(searched, reviewed):
    result, uri, _, _ = searched
    runs = _children(uri, result.parent_run_id)
    done = [r for r in runs if r.data.tags["outcome"] == "completed"]
    auc = np.array([r.data.metrics["best_val_auc"] for r in done])
    size = np.array([r.data.metrics["model_bytes"] for r in done])
    mask = non_dominated(auc, size)
    front = {r.data.tags["trial_id"] for r, m in zip(done, mask) if m}
    assert {r["trial_id"] for r in reviewed.front} == front
    by_id = {r.data.tags["trial_id"]: r for r in runs}
    assert len(reviewed.trials) == len(runs) == 12 + 5
    for rec in reviewed.trials:
        run = by_id[rec["trial_id"]]
        assert rec["outcome"] == run.data.tags["outcome"]
        assert rec["best_val_auc"] == run.data.metrics["best_val_auc"]
        assert rec["model_bytes"] == run.data.metrics["model_bytes"]
        assert rec["heuristic"] == run.data.tags.get("heuristic", "")
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert math.isclose(reviewed.hypervolume, parent.data.metrics["hypervolume"], rel_tol=1e-12)
    assert math.isclose(reviewed.hypervolume, hypervolume(auc[mask], size[mask], ref_bytes=reviewed.reference[1]))
    pick = done[recommend(auc, size, rule="epsilon", epsilon=0.002)].data.tags["trial_id"]
    assert reviewed.recommended["trial_id"] == pick == parent.data.tags["recommended_trial"]


def test_review_leaves_no_downloaded_artifacts_behind(searched, tmp_path, monkeypatch):
    """A review downloads the parent run's recommended.yaml, summary.json (and trials.csv) to read them; each review
    left them in a folder of its own under the temporary directory (451 on this project's test machine)."""
    import tempfile

    result, uri, _, _ = searched
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    again = load_review(result.parent_run_id, uri)
    assert again.extra["recipe"] is not None and again.reference == result.reference  # it did read the artifacts
    assert list(tmp_path.iterdir()) == []


def test_review_reproduces_the_runners_records(searched, reviewed):
    result, _, _, _ = searched
    mine = {r["trial_id"]: r for r in result.trials}
    for rec in reviewed.trials:
        ran = mine[rec["trial_id"]]
        for key in ("outcome", "heuristic", "model_bytes", "embedding_bytes", "epochs", "dims", "run_id", "run_name"):
            assert rec[key] == ran[key], key
        assert math.isclose(rec["best_val_auc"], ran["best_val_auc"])
    assert [r["trial_id"] for r in reviewed.front] == [r["trial_id"] for r in result.front]
    assert reviewed.reference == result.reference


def test_a_trial_run_whose_model_bytes_never_landed_gets_them_from_its_config(searched, reviewed):
    from search import review

    result, uri, _, _ = searched
    c = MlflowClient(uri)
    children = _children(uri, result.parent_run_id)
    recipe = review._recipe(c, result.parent_run_id)
    fixed = review._fixed(c, result.parent_run_id, recipe, children)
    for run in children:
        want = run.data.metrics["model_bytes"]
        del run.data.metrics["model_bytes"]  # as if the write of its first epoch failed for good
        assert review._record(run, recipe.features, fixed)["model_bytes"] == want  # exact, not 0


def test_report_cli_prints_the_numbers_and_uploads_the_folder(searched, reviewed, tmp_path, capsys):
    result, uri, _, _ = searched
    out = tmp_path / "report"
    assert main(["report", "small", "--tracking-uri", uri, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"hypervolume {reviewed.hypervolume:.5f}" in text
    rec = reviewed.recommended
    assert (f"recommended (epsilon=0.002): {rec['run_name']} (Ray trial {rec['trial_id']})  val AUC "
            f"{rec['best_val_auc']:.4f}  model bytes {rec['model_bytes']:,}") in text
    for r in reviewed.front:
        assert f"{round(r['best_val_auc'], 5):.5f}" in text and str(r["model_bytes"]) in text
    assert "n^0.25" in text and "MDE power-law" in text  # the baselines beside the front
    assert "Per-parameter sensitivity" in text
    written = {p.name for p in out.iterdir()}
    assert {"pareto.png", "pareto.html", "learning_curves.png", "sensitivity.png", "sensitivity.csv",
            "front.csv", "report.txt"} <= written
    front = read_table(out / "front.csv")
    on_front = front[front["on_front"]]
    assert set(on_front["trial_id"]) == {r["trial_id"] for r in reviewed.front}
    c = MlflowClient(uri)
    uploaded = {a.path for a in c.list_artifacts(result.parent_run_id, "report")}
    assert {f"report/{name}" for name in written - set(SEARCH_ARTIFACTS)} <= uploaded
    # the search logged these at the top from the same trials: no second copy under report/
    assert set(SEARCH_ARTIFACTS) <= {a.path for a in c.list_artifacts(result.parent_run_id)}
    assert not {f"report/{name}" for name in SEARCH_ARTIFACTS} & uploaded


def test_report_of_a_search_without_its_own_plot_and_tables_uploads_them(searched, reviewed, tmp_path):
    # a search interrupted before its end logged no pareto.png, front.csv or trials.csv: the report's are the only ones
    import dataclasses

    result, uri, _, _ = searched
    c = MlflowClient(uri)
    bare = c.create_run(reviewed.extra["experiment_id"], run_name="bare").info.run_id
    try:
        files = write_report(reviewed, tmp_path / "report", {})
        log_report(dataclasses.replace(reviewed, parent_run_id=bare), files)
        assert {a.path for a in c.list_artifacts(bare, "report")} == {f"report/{name}" for name in files}
    finally:  # the shared search's experiment is as other tests expect it (the MLflow UI test counts its runs)
        c.delete_run(bare)


def test_report_learning_curves_are_the_mlflow_histories(searched, reviewed):
    _, uri, _, _ = searched
    histories = metric_histories(reviewed, reviewed.front)
    c = MlflowClient(uri)
    for r in reviewed.front:
        steps = [e for e, _ in histories[r["trial_id"]]]
        assert steps == list(range(1, r["epochs"] + 1))
        assert max(v for _, v in histories[r["trial_id"]]) == pytest.approx(r["best_val_auc"])
        assert len(c.get_metric_history(r["run_id"], "val_auc")) == len(steps)


def test_report_learning_curves_title_wraps_between_features_within_the_figure():
    features = ["user_id", "item_id", "age", "gender", "occupation", "zip", "genres", "release_year"]  # MovieLens
    title = curves_title("movielens-20261202-170736", features)
    lines = title.splitlines()
    assert len(lines) >= 2 and all(len(line) <= TITLE_CHARS for line in lines)
    assert " / ".join(features) in " ".join(lines)  # every feature, whole and in order
    assert curves_title("s", ["a", "b"]) == "s: learning curves of the Pareto front (dims of a / b)"


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.scripts: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
        for key in ("src", "href", "data", "action", "poster"):
            if a.get(key):
                self.urls.append((tag, key, a[key]))


def test_report_html_is_self_contained_and_hover_shows_dims(reviewed, tmp_path):
    files = write_report(reviewed, tmp_path / "r", metric_histories(reviewed, reviewed.front))
    html = files["pareto.html"].read_text()
    links = _Links()
    links.feed(html)
    external = [(t, k, u) for t, k, u in links.urls if urlparse(u).scheme not in ("", "data")]
    assert external == [], external
    assert links.scripts and all("src" not in s for s in links.scripts)  # plotly.js is inline, not fetched
    assert len(html) > 1_000_000  # the embedded plotly.js bundle
    rec = reviewed.recommended
    dims = "<br>".join(f"&nbsp;&nbsp;{k} = {v}" for k, v in rec["dims"].items())
    assert f"trial {rec['trial_id']}" in html and dims.replace("<br>", "\\u003cbr\\u003e") in html


def test_report_text_without_sensitivity_still_has_front_and_hypervolume(reviewed):
    text = report_text(reviewed)
    assert "Per-parameter sensitivity" not in text
    assert f"hypervolume {reviewed.hypervolume:.5f}" in text


def test_optuna_journal_loads_with_optunas_api(searched):
    result, _, out, _ = searched
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "small" / "optuna.journal")))
    study = optuna.load_study(study_name="small", storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    by_ray = {t.user_attrs.get("ray_trial_id"): t for t in study.trials}
    sampled = [r for r in result.trials if not r["heuristic"]]
    assert len(sampled) == 12
    for r in sampled:
        t = by_ray[r["trial_id"]]
        expected = {"completed": optuna.trial.TrialState.COMPLETE, "stopped_early": optuna.trial.TrialState.PRUNED}
        assert t.state == expected[r["outcome"]]
        if r["outcome"] == "completed":
            assert t.values == pytest.approx([r["best_val_auc"], r["model_bytes"]])
        assert {f"dim.{k}": v for k, v in r["dims"].items() if f"dim.{k}" in t.params} == \
            {k: v for k, v in t.params.items() if k.startswith("dim.")}
    assert journal_study(out / "small" / "optuna.journal", "small") is not None
    assert journal_study(out / "small" / "optuna.journal", "no-such-study") is None


def test_sensitivity_falls_back_to_mlflow_runs_without_the_journal(reviewed, tmp_path):
    from dataclasses import replace

    moved = replace(reviewed, extra={**reviewed.extra, "journal": tmp_path / "absent.journal"})
    table, source = sensitivity(moved)
    assert source == "mlflow runs"
    assert set(table["param"]) <= {f"dim.{f}" for f in reviewed.recommended["dims"]} | {"lr"}
    assert table["importance"].sum() == pytest.approx(1.0, abs=1e-3)
    assert list(table["importance"]) == sorted(table["importance"], reverse=True)


def test_find_parent_takes_the_latest_search_of_a_name(searched):
    from search import tracking

    _, uri, _, _ = searched
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "find-parent", uri)  # apart from the search's experiment
    tags = {"embsize.kind": "search", "embsize.name": "twice"}
    first = c.create_run(exp, run_name="twice", tags=tags, start_time=1_000).info.run_id
    second = c.create_run(exp, run_name="twice", tags=tags, start_time=2_000).info.run_id
    assert find_parent(c, "twice", "find-parent").info.run_id == second
    assert find_parent(c, first).info.run_id == first
    with pytest.raises(ValueError, match="no search named 'other'"):
        find_parent(c, "other", "find-parent")
    plain = c.create_run(exp, run_name="plain").info.run_id
    with pytest.raises(ValueError, match="is not an embsize search"):
        find_parent(c, plain)
    with pytest.raises(ValueError, match="experiment 'absent' does not exist"):
        find_parent(c, "twice", "absent")


def test_report_cli_refuses_an_unknown_search(searched, capsys):
    _, uri, _, _ = searched
    assert main(["report", "nope", "--tracking-uri", uri, "--no-log"]) == 2
    assert "no search named 'nope'" in capsys.readouterr().err


def test_review_leaves_out_a_trial_run_without_its_params(searched, caplog):
    # a driver killed between a trial run's creation and its params write left a run with no dims: `embsize report`
    # of that search failed on it ("has no dim for 'user_id' ... older embsize?") instead of covering the other trials
    result, uri, _, _ = searched
    c = MlflowClient(uri)
    exp = c.get_run(result.parent_run_id).info.experiment_id
    tags = {"mlflow.parentRunId": result.parent_run_id, "trial_id": "half"}
    half = c.create_run(exp, run_name="trial-099", tags=tags).info.run_id
    try:
        with caplog.at_level("WARNING", logger="search.review"):
            again = load_review(result.parent_run_id, uri)
    finally:
        c.delete_run(half)  # the module's other tests see the search as it was
    assert sorted(r["trial_id"] for r in again.trials) == sorted(r["trial_id"] for r in result.trials)
    assert again.recommended["trial_id"] == result.recommended["trial_id"]
    assert "1 trial runs of search" in caplog.text and "left out" in caplog.text
