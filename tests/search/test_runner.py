"""A real search: Ray Tune + Optuna (journal storage) + MLflow (SQLite) on tiny synthetic data."""
from __future__ import annotations

import math
import signal

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipelines import SyntheticSpec, generate, prepare
from pipelines.recipe import Recipe, build
from search import tracking
from search.pareto import hypervolume, non_dominated
from search.runner import SearchSettings, run_search
from search.space import SearchSpec, build_space
from pipelines.synthetic import PlantedFeature

pytestmark = pytest.mark.slow

FEATURES = (PlantedFeature("user", 300, 6), PlantedFeature("item", 400, 4), PlantedFeature("tag", 40, 2, multi=True))


@pytest.fixture(scope="module")
def data():
    return prepare(generate(SyntheticSpec(features=FEATURES, rows=12_000, seed=1)))


@pytest.fixture(scope="module")
def searched(data, ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    space = build_space(data.features, SearchSpec(max_dim=32))
    settings = SearchSettings(name="t", trials=10, max_epochs=4, patience=0, grace_period=1, reduction_factor=2,
                              scheduler="asha", tracking_uri=uri, output_dir=str(tmp / "out"))
    results = []
    on_event = lambda kind, trial, result: results.append(dict(result)) if kind == "result" else None  # noqa: E731
    return run_search(data, space, settings, {"source": "synthetic"}, on_event=on_event), uri, space, results


def test_search_checkpoints_only_last_epochs_within_the_interval(searched):
    *_, results = searched
    assert SearchSettings.checkpoint_seconds >= 10  # trials here last ~1 s: well inside the default interval
    assert len(results) > 15 and any(r["final"] for r in results) and not all(r["final"] for r in results)
    # Ray names the checkpoint a result carried (None without one): a trial's last epoch only
    assert all((r["checkpoint_dir_name"] is not None) == r["final"] for r in results)


def test_search_writes_parent_and_child_runs(searched, data):
    result, uri, *_ = searched
    c = MlflowClient(uri)
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["dataset.fingerprint"]
    (used,) = parent.inputs.dataset_inputs  # the MLflow UI's "Datasets used": metadata, no rows
    assert (used.dataset.name, used.dataset.digest, used.dataset.source_type) == (
        data.name, data.fingerprint, "code")
    assert {t.key: t.value for t in used.tags} == {"mlflow.data.context": "search"}
    assert math.isclose(parent.data.metrics["hypervolume"], result.hypervolume)
    ref = (parent.data.metrics["hypervolume_reference_auc"], parent.data.metrics["hypervolume_reference_bytes"])
    assert ref == tuple(float(x) for x in result.reference)
    artifacts = {a.path for a in c.list_artifacts(result.parent_run_id)}
    assert {"recommended.yaml", "front.csv", "pareto.png"} <= artifacts
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == len(result.trials) == 10 + 5  # sampled trials + the five heuristic baselines
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["outcome"] in ("completed", "stopped_early")
        history = c.get_metric_history(run.info.run_id, "val_auc")
        epochs = int(run.data.metrics["epochs_trained"])
        # every epoch once and in order, though trials hand results to a reporting thread and MLflow gets them batched
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        if run.data.tags["outcome"] == "stopped_early":  # ASHA decides at its rungs (grace 1, eta 2: epochs 1 and 2)
            assert epochs in (1, 2), run.data.tags
        assert run.data.metrics["model_bytes"] > 0
        assert len(c.get_metric_history(run.info.run_id, "model_bytes")) == 1  # once: it is exact from the config
        for key in ("val_logloss", "train_loss"):
            assert len(c.get_metric_history(run.info.run_id, key)) == epochs
        # the best so far when it improves: increasing, and its latest value is the trial's best
        best = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "best_val_auc"), key=lambda m: m.step)]
        assert best == sorted(set(best)) and best[-1] == max(m.value for m in history)
        assert run.data.metrics["epoch_seconds"] > 0
        assert any(k.startswith("dim.") for k in run.data.params)
        (trained_on,) = run.inputs.dataset_inputs  # the search's dataset, for the runs table's Dataset column
        assert (trained_on.dataset.name, trained_on.dataset.digest) == (data.name, data.fingerprint)
        assert {t.key: t.value for t in trained_on.tags} == {"mlflow.data.context": "training"}
    labelled = {r.data.tags.get("heuristic") for r in children} - {None}
    assert labelled == {"sqrt", "half50", "fastai", "google", "mde"}
    # named in the order the trials started, a baseline's name ending with its heuristic
    names = [r.info.run_name for r in sorted(children, key=lambda r: r.info.start_time)]
    assert names == [f"trial-{i:03d}" + (f"-{r.data.tags['heuristic']}" if "heuristic" in r.data.tags else "")
                     for i, r in enumerate(sorted(children, key=lambda r: r.info.start_time), 1)]


def test_search_front_is_nondominated_and_fully_trained(searched):
    result, *_ = searched
    assert result.front
    assert all(r["outcome"] == "completed" for r in result.front)
    done = [r for r in result.trials if r["outcome"] == "completed"]
    auc = np.array([r["best_val_auc"] for r in done])
    size = np.array([r["model_bytes"] for r in done], dtype=float)
    front_ids = {r["trial_id"] for r in result.front}
    assert front_ids == {r["trial_id"] for r, m in zip(done, non_dominated(auc, size)) if m}
    assert any(r["outcome"] == "stopped_early" for r in result.trials), "ASHA with eta=2 should stop some trials"
    front = np.array([(r["best_val_auc"], r["model_bytes"]) for r in result.front])
    assert math.isclose(result.hypervolume, hypervolume(front[:, 0], front[:, 1], ref_bytes=result.reference[1]))


def test_search_stopped_trials_are_pruned_in_optuna(searched):
    result, *_ = searched
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(result.out / "optuna.journal")))
    study = optuna.load_study(study_name=result.study_name, storage=storage)
    by_ray = {t.user_attrs.get("ray_trial_id"): t for t in study.trials}
    for r in result.trials:
        if r["heuristic"]:
            continue
        state = by_ray[r["trial_id"]].state
        expected = {"completed": optuna.trial.TrialState.COMPLETE, "stopped_early": optuna.trial.TrialState.PRUNED}
        assert state == expected[r["outcome"]], r
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(t.values[1] == by_ray[t.user_attrs["ray_trial_id"]].values[1] for t in complete)


def test_search_recipe_rebuilds_exact_model(searched, data):
    result, _, space, _ = searched
    recipe = Recipe.load(result.recipe_path)
    model = build(recipe)
    assert dict(recipe.model.dims) == result.recommended["dims"]
    assert sum(p.numel() for p in model.parameters()) * 4 == recipe.model_bytes() == result.recommended["model_bytes"]
    assert recipe.dataset["fingerprint"] == data.fingerprint
    assert recipe.provenance["mlflow"]["parent_run_id"] == result.parent_run_id


def test_search_memory_budget_is_never_exceeded_and_a_pin_holds_in_every_trial(data, ray_session, tmp_path):
    from search.space import FeatureSpec

    space = build_space(data.features, SearchSpec(max_dim=32, features={"tag": FeatureSpec(pin=2)}))
    budget = (space.min_bytes() + space.max_bytes()) // 4  # n^0.25's baseline fits, the others do not
    settings = SearchSettings(name="b", trials=6, max_epochs=2, memory_budget=budget, rule="budget",
                              tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", output_dir=str(tmp_path / "out"))
    before = signal.getsignal(signal.SIGINT)
    result = run_search(data, space, settings)
    # Tune's Ctrl-C handler is not left behind: a Ctrl-C after the trials (while the front is concluded) still stops
    assert signal.getsignal(signal.SIGINT) is before
    trained = [r for r in result.trials if r["epochs"] > 0]
    assert len([r for r in trained if not r["heuristic"]]) == 6
    assert all(r["model_bytes"] <= budget for r in trained)
    assert result.recommended["model_bytes"] <= budget
    # the baseline that fits keeps the pin as well (the rules give tag, 40 categories, dims 3-20)
    assert [r["heuristic"] for r in trained if r["heuristic"]] == ["google"]
    assert {r["dims"]["tag"] for r in result.trials} == {2} and result.recommended["dims"]["tag"] == 2


def test_search_marks_the_front_and_the_pick_on_the_trial_runs(searched):
    # only the parent run named the recommended trial (tag recommended_trial): the MLflow UI's runs table could not
    # filter the front or the pick among the trial runs
    result, uri, *_ = searched
    c = MlflowClient(uri)
    parent = c.get_run(result.parent_run_id)
    exp = parent.info.experiment_id
    nested = f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    front = c.search_runs([exp], f"{nested} and tags.on_front = 'true'")
    assert {r.data.tags["trial_id"] for r in front} == {r["trial_id"] for r in result.front}
    assert all(r.data.tags["outcome"] == "completed" for r in front)
    (pick,) = c.search_runs([exp], f"{nested} and tags.recommended = 'true'")
    assert pick.data.tags["trial_id"] == result.recommended["trial_id"] == parent.data.tags["recommended_trial"]
    assert pick.info.run_id == parent.data.tags["recommended_run_id"] == result.recommended["run_id"]
    assert parent.data.metrics["tracking_failures"] == 0 and "tracking_error" not in parent.data.tags
    others = c.search_runs([exp], f"{nested} and tags.recommended = 'false'")
    assert len(others) == len(result.trials) - 1
    assert len(c.search_runs([exp], f"{nested} and tags.on_front = 'false'")) == len(result.trials) - len(front)


def _sabotaged_search(data, uri: str, out: str):
    """A small search whose first trial run is deleted in MLflow from its first epoch to its end, so the writes of its
    epochs fail for real (the store refuses a deleted run), as a tracking server that is down for a while would."""
    import logging
    import threading
    import time

    space = build_space(data.features, SearchSpec(max_dim=8))
    settings = SearchSettings(name="lossy", trials=2, max_epochs=3, patience=0, scheduler="fifo", heuristics=False,
                              tracking_uri=uri, output_dir=out)
    deleted: dict[str, str] = {}
    failed = threading.Event()  # the writer thread logged a failed write
    handler = logging.Handler()
    handler.emit = lambda record: failed.set() if "MLflow write failed" in record.getMessage() else None
    logging.getLogger("search.tracking").addHandler(handler)

    def on_event(kind, trial, result):
        # through tracking.client, which opens a new SQLite store under the search's lock: the first results can come
        # before the search's own thread has built the store, and a plain MlflowClient would then create the tables in
        # place while that thread renames its finished store over the file ("attempt to write a readonly database")
        c = tracking.client(uri)
        if kind == "result" and not deleted:
            for _ in range(300):  # the writer thread opens the trial's run
                exp = c.get_experiment_by_name("embsize")
                runs = c.search_runs([exp.experiment_id], f"tags.trial_id = '{trial.trial_id}'") if exp else []
                if runs:
                    break
                time.sleep(0.1)
            c.delete_run(runs[0].info.run_id)
            deleted[trial.trial_id] = runs[0].info.run_id
        elif kind in ("completed", "stopped_early", "failed") and trial.trial_id in deleted:
            assert failed.wait(60), "no write to the deleted run failed"
            c.restore_run(deleted[trial.trial_id])

    try:
        return run_search(data, space, settings, on_event=on_event), space, settings
    finally:
        logging.getLogger("search.tracking").removeHandler(handler)


def test_search_records_lost_trial_run_writes_on_the_parent_run(data, ray_session, tmp_path):
    # a trial run's failed writes were logged as warnings and the search went on (as designed), but the parent run
    # said nothing of them: a run missing epochs looked like a complete one
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    result, *_ = _sabotaged_search(data, uri, str(tmp_path / "out"))
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert parent.data.metrics["tracking_failures"] == result.extra["tracking_failures"] >= 1
    assert "deleted" in parent.data.tags["tracking_error"]


def test_a_resumed_searchs_parent_run_totals_every_leg(data, ray_session, tmp_path):
    # the parent run's wall_seconds was the last driver's alone: a search interrupted after 20 minutes and resumed
    # for its last 2 said 2 minutes (and tracking failures of the first leg were forgotten)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    first, space, settings = _sabotaged_search(data, uri, str(tmp_path / "out"))
    second = run_search(data, space, settings)  # the same search again: Ray's experiment is restored, a second leg
    c = MlflowClient(uri)
    assert second.parent_run_id == first.parent_run_id
    parent = c.get_run(first.parent_run_id)
    assert parent.data.tags["embsize.resumed"] == "1"
    legs = {m.step: m.value for m in c.get_metric_history(parent.info.run_id, "leg_wall_seconds")}
    assert sorted(legs) == [0, 1] and legs[0] == first.seconds and legs[1] > 0
    assert math.isclose(parent.data.metrics["wall_seconds"], legs[0] + legs[1])
    assert second.seconds == parent.data.metrics["wall_seconds"] and second.extra["legs"] == 2
    failures = {m.step: m.value for m in c.get_metric_history(parent.info.run_id, "leg_tracking_failures")}
    assert failures == {0: first.extra["tracking_failures"], 1: 0}
    assert parent.data.metrics["tracking_failures"] == first.extra["tracking_failures"] >= 1
    # the trial counts cover both legs too: the first leg's two trials, none trained again
    assert parent.data.metrics["trials_completed"] == 2 and parent.data.metrics["trials_interrupted"] == 0
    assert parent.data.metrics["epochs_trained"] == 2 * settings.max_epochs


def test_search_records_each_trials_training_seconds_in_trials_csv_and_its_run(searched):
    """What each config cost to train: Ray's training time of the trial, in trials.csv and on its MLflow run (where
    `embsize report` reads it). Per epoch, every trial's time is of the same order as the completed ones'."""
    from search.review import load_review

    from .tables import read_table

    result, uri, _, _ = searched
    table = read_table(result.out / "trials.csv").set_index("trial_id")
    assert (table["train_seconds"] > 0).all()
    assert table["train_seconds"].sum() < result.seconds * 2  # 2 CPUs: at most two trials train at once
    per_epoch = table["train_seconds"] / table["epochs"]
    full = per_epoch[table["outcome"] == "completed"]
    assert per_epoch.between(full.min() / 5, full.max() * 5).all()
    reviewed = {r["trial_id"]: r["train_seconds"] for r in load_review(result.parent_run_id, uri).trials}
    for trial_id, seconds in table["train_seconds"].items():
        assert reviewed[trial_id] == pytest.approx(seconds, abs=1e-3)
