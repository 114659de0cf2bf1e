"""The MLflow store: a new SQLite store opened by several processes at once (search/tracking.py)."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time

import pytest


def _open_and_write(uri: str, barrier, i: int, results) -> None:
    try:
        from search import tracking

        barrier.wait(timeout=60)  # every process opens the store at the same moment
        c = tracking.client(uri)
        exp = tracking.ensure_experiment(c, f"e{i}", uri)
        run = c.create_run(exp)
        c.log_metric(run.info.run_id, "x", float(i))
        c.set_terminated(run.info.run_id)
        results.put((i, "ok"))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((i, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def test_a_new_sqlite_store_opened_by_four_processes_at_once(tmp_path):
    # MLflow creates and migrates a new SQLite store's tables on first open, unlocked; two searches started together
    # in a new project raced on it ("no such column" in the second) before tracking.client serialized the first open
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_and_write, args=(uri, barrier, i, results)) for i in range(4)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == {i: "ok" for i in range(4)}

    from search import tracking

    c = tracking.client(uri)
    names = {e.name for e in c.search_experiments()}
    assert {f"e{i}" for i in range(4)} <= names
    for i in range(4):
        exp = c.get_experiment_by_name(f"e{i}")
        (run,) = c.search_runs([exp.experiment_id])
        assert run.data.metrics["x"] == float(i) and run.info.status == "FINISHED"


# --- the trial-run callback, driven as Ray Tune drives it, against a real SQLite store -------------------------------


class _Trial:
    """What TrialRuns reads of a Ray Tune trial."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config, self.last_result, self.error_file = trial_id, config, None, ""


def _opened(uri: str):
    from concurrent.futures import Future

    from search import tracking

    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "embsize", uri)
    parent = c.create_run(exp, run_name="s", tags={"embsize.kind": "search", "embsize.name": "s"}).info.run_id
    opened = Future()
    opened.set_result((c, exp, parent))
    return opened


AUCS = [0.60, 0.58, 0.65, 0.66]


def _report(runs, trial: _Trial, epochs, max_epochs: int = len(AUCS), restored=()) -> None:
    """Results of ``epochs``; the first carries ``restored`` epochs' metrics, as a restored trial's first does."""
    for epoch in epochs:
        auc = AUCS[epoch - 1]
        result = {"epoch": epoch, "val_auc": auc, "val_logloss": 0.6, "train_loss": 0.5,
                  "best_val_auc": max(AUCS[:epoch]), "model_bytes": 1234, "final": epoch == max_epochs,
                  "ended": "max_epochs" if epoch == max_epochs else "", "node": "10.0.0.1", "device": "cpu"}
        if restored:
            result["restored"] = [{"epoch": e, "val_auc": AUCS[e - 1], "val_logloss": 0.6, "train_loss": 0.5,
                                   "best_val_auc": max(AUCS[:e])} for e in restored]
            restored = ()
        trial.last_result = result
        runs.on_trial_result(0, [], trial, result)


def _history(c, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


def test_a_retried_trial_logs_each_epoch_once(tracking_uri, tmp_path):
    # Ray retries a failed trial (--max-failures) from its last checkpoint, by default at most one per 30 s: the
    # retry reports again the epochs after it, and MLflow got each of them twice (val_auc steps 1, 2, 1, 2, 3, 4)
    from search import tracking

    opened = _opened(tracking_uri)
    c, _, parent = opened.result()
    runs = tracking.TrialRuns(tracking_uri, opened)
    runs.GATHER_S = 0.05
    trial = _Trial("t1", {"dim.a": 4})
    runs.on_trial_start(0, [], trial)
    _report(runs, trial, [1, 2])
    runs.flush()
    trial.error_file = str(tmp_path / "error.txt")
    (tmp_path / "error.txt").write_text("Traceback...\nRuntimeError: worker lost\n")
    runs.on_trial_recover(0, [], trial)
    _report(runs, trial, [1, 2, 3, 4])  # no checkpoint yet: the retry starts over
    runs.on_trial_complete(0, [], trial)
    runs.close()

    (run,) = tracking.child_runs(c, opened.result()[1], parent)
    assert run.info.status == "FINISHED" and run.data.tags["retries"] == "1"
    assert run.data.tags["outcome"] == "completed" and run.data.metrics["epochs_trained"] == 4
    # one canonical form, a metric: runs were tagged with it too, and the UI showed two epochs_trained columns
    assert "epochs_trained" not in run.data.tags
    assert [r.info.run_id for r in c.search_runs([opened.result()[1]], "metrics.epochs_trained = 4")] == [
        run.info.run_id]
    for key in ("val_auc", "val_logloss", "train_loss"):
        assert [s for s, _ in _history(c, run.info.run_id, key)] == [1, 2, 3, 4], key
    assert _history(c, run.info.run_id, "val_auc") == list(zip([1, 2, 3, 4], AUCS))
    assert runs.errors == []


def _resumed_run(tracking_uri: str, before: list[int], after: list[int], restored=()):
    """A trial's run over two legs of a search: epochs ``before`` reported, the driver stopped (Ctrl-C: the runner
    closes the writer, then the runs left open), the callback restored as ``Tuner.restore`` does, and epochs ``after``
    reported to the trial's end, the first carrying ``restored``. Returns the client and the run."""
    import pickle

    from search import tracking

    opened = _opened(tracking_uri)
    c, exp, parent = opened.result()
    first = tracking.TrialRuns(tracking_uri, opened)
    first.GATHER_S = 0.05
    saved = pickle.dumps(first)  # Ray pickles the callbacks when the Tuner is built (tuner.pkl)
    trial = _Trial("t1", {"dim.a": 4})
    first.on_trial_start(0, [], trial)
    _report(first, trial, before)
    first.close()
    assert tracking.close_interrupted(c, exp, parent) == 1

    runs = pickle.loads(saved)  # Tuner.restore
    runs.rewire(tracking_uri, opened)
    runs.GATHER_S = 0.05
    trial = _Trial("t1", {"dim.a": 4})
    runs.on_trial_start(0, [], trial)
    _report(runs, trial, after, restored=restored)
    runs.on_trial_complete(0, [], trial)
    runs.close()
    (run,) = tracking.child_runs(c, exp, parent)
    return c, run


def test_a_resumed_trial_logs_model_bytes_once_and_best_auc_when_it_improves(tracking_uri):
    # the restored callback forgot what the run had been given: a continued trial logged model_bytes a second time
    # (steps 1 and 3) and best_val_auc again though it had not improved
    c, run = _resumed_run(tracking_uri, [1, 2], [1, 2, 3, 4])  # from its start: no checkpoint was saved before
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed"
    assert _history(c, run.info.run_id, "val_auc") == list(zip([1, 2, 3, 4], AUCS))
    assert _history(c, run.info.run_id, "model_bytes") == [(1, 1234.0)]
    assert _history(c, run.info.run_id, "best_val_auc") == [(1, 0.60), (3, 0.65), (4, 0.66)]


def test_a_restored_trial_logs_the_epochs_its_checkpoint_holds_that_a_killed_driver_had_not(tracking_uri):
    # a kill -9 after Ray saved its state naming the epoch-3 checkpoint, before the writer had logged epoch 3: the
    # trial went on from epoch 4, and its run's curves lacked step 3 (val_auc steps 1, 2, 4)
    c, run = _resumed_run(tracking_uri, [1, 2], [4], restored=[1, 2, 3])  # from the epoch-3 checkpoint
    for key in ("val_auc", "val_logloss", "train_loss"):
        assert [s for s, _ in _history(c, run.info.run_id, key)] == [1, 2, 3, 4], key
    assert _history(c, run.info.run_id, "val_auc") == list(zip([1, 2, 3, 4], AUCS))
    assert _history(c, run.info.run_id, "best_val_auc") == [(1, 0.60), (3, 0.65), (4, 0.66)]
    assert _history(c, run.info.run_id, "model_bytes") == [(1, 1234.0)]


class _FlakyClient:
    """A real MlflowClient whose first ``failures`` metric writes fail, as a tracking server's hiccup would."""

    def __init__(self, client, failures: int):
        self._client, self.failures = client, failures

    def __getattr__(self, name):
        return getattr(self._client, name)

    def log_batch(self, run_id, metrics=(), **kwargs):
        if metrics and self.failures > 0:
            self.failures -= 1
            raise ConnectionError("503 Service Unavailable")
        return self._client.log_batch(run_id, metrics=metrics, **kwargs)


def test_a_failed_metric_write_does_not_lose_model_bytes_or_other_runs_epochs(tracking_uri):
    # the writer marked model_bytes and the best AUC as sent before the write: one failed batch (the first epoch)
    # left the run without model_bytes for good, which `embsize report` read as a 0-byte model; and one run's failed
    # write dropped the epochs of every other run in the same batch
    from search import tracking

    opened = _opened(tracking_uri)
    c, exp, parent = opened.result()
    runs = tracking.TrialRuns(tracking_uri, opened)
    runs._client = _FlakyClient(c, failures=1)
    runs.experiment_id, runs.parent_run_id = exp, parent
    runs.GATHER_S = 0.5
    a, b = _Trial("a", {"dim.a": 4}), _Trial("b", {"dim.a": 8})
    for t in (a, b):
        runs.on_trial_start(0, [], t)
    runs.flush()
    _report(runs, a, [1])
    _report(runs, b, [1])  # one gathered batch: a's write fails, b's goes through
    runs.flush()
    for t in (a, b):
        _report(runs, t, [2, 3, 4])
        runs.on_trial_complete(0, [], t)
    runs.close()

    assert runs.errors == ["503 Service Unavailable"]
    by_trial = {r.data.tags["trial_id"]: r for r in tracking.child_runs(c, exp, parent)}
    a_run, b_run = by_trial["a"], by_trial["b"]
    assert [s for s, _ in _history(c, a_run.info.run_id, "val_auc")] == [2, 3, 4]  # epoch 1's write was lost
    assert [s for s, _ in _history(c, b_run.info.run_id, "val_auc")] == [1, 2, 3, 4]
    for run in (a_run, b_run):
        assert run.data.metrics["model_bytes"] == 1234 and len(_history(c, run.info.run_id, "model_bytes")) == 1
        assert run.data.metrics["best_val_auc"] == max(AUCS)
    assert a_run.data.tags["node"] == "10.0.0.1"  # the placement tags of the lost batch came with the next one


def test_trial_runs_are_named_by_start_order_uniquely_across_a_resume(tracking_uri):
    # runs were named by Ray's random trial ids (49edec6e, 47b54b54-sqrt): the UI's run list said nothing of the order
    import pickle

    from search import tracking

    opened = _opened(tracking_uri)
    c, exp, parent = opened.result()
    first = tracking.TrialRuns(tracking_uri, opened)
    first.GATHER_S = 0.05
    saved = pickle.dumps(first)
    a, b, gone = _Trial("a", {"dim.a": 4, "heuristic": "sqrt"}), _Trial("b", {"dim.a": 8}), _Trial("x", {"dim.a": 2})
    for t in (a, b, gone):  # a killed driver: x started, and Ray never saved it (its trial is not continued)
        first.on_trial_start(0, [], t)
    _report(first, a, [1, 2, 3, 4])
    first.on_trial_complete(0, [], a)
    _report(first, b, [1])
    first.close()
    tracking.close_interrupted(c, exp, parent)

    runs = pickle.loads(saved)  # the resumed search continues b and starts c
    runs.rewire(tracking_uri, opened)
    runs.GATHER_S = 0.05
    b, new = _Trial("b", {"dim.a": 8}), _Trial("c", {"dim.a": 16})
    for t in (b, new):
        runs.on_trial_start(0, [], t)
        _report(runs, t, [1, 2, 3, 4])
        runs.on_trial_complete(0, [], t)
    runs.close()
    # a search that starts its Ray experiment afresh on the same parent run (killed before Ray's first state save)
    fresh = tracking.TrialRuns(tracking_uri, opened)
    fresh.GATHER_S = 0.05
    fresh.on_trial_start(0, [], _Trial("d", {"dim.a": 4}))
    fresh.close()

    names = {r.data.tags["trial_id"]: r.info.run_name for r in tracking.child_runs(c, exp, parent)}
    assert names == {"a": "trial-001-sqrt", "b": "trial-002", "x": "trial-003", "c": "trial-004", "d": "trial-005"}


def test_a_new_searchs_trials_are_named_as_they_start_so_the_progress_shows_the_names(tracking_uri):
    """The live progress printed Ray's ids (9f78fc21) while the MLflow UI lists trial-007: a trial that ended before
    the writer thread had opened its run had no name to show. A new search's runs are named as trials start."""
    from search import tracking

    opened = _opened(tracking_uri)
    c, exp, parent = opened.result()
    events = []
    runs = tracking.TrialRuns(tracking_uri, opened, lambda kind, trial, result: events.append((kind, result)),
                              numbered=0)
    runs.GATHER_S = 0.05
    a, b = _Trial("a", {"dim.a": 4, "heuristic": "sqrt"}), _Trial("b", {"dim.a": 8})
    for t in (a, b):
        runs.on_trial_start(0, [], t)
        _report(runs, t, [1])
        runs.on_trial_complete(0, [], t)  # at once: before the writer has written anything, as a fast trial
    runs.close()
    ended = [result["run_name"] for kind, result in events if kind == "stopped_early"]
    assert ended == ["trial-001-sqrt", "trial-002"]
    names = {r.data.tags["trial_id"]: r.info.run_name for r in tracking.child_runs(c, exp, parent)}
    assert names == {"a": "trial-001-sqrt", "b": "trial-002"}


def test_trial_run_names_go_on_after_the_highest_so_a_gap_never_makes_a_duplicate(tracking_uri):
    """A name is taken before its run is written (as a trial starts, or before a write that fails): a driver killed
    in between leaves a gap. Counting the runs then gave a later trial a name already in use."""
    from search import tracking

    opened = _opened(tracking_uri)
    c, exp, parent = opened.result()
    for name, trial_id in (("trial-001", "a"), ("trial-003", "c")):  # trial-002's run was never written
        c.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent, "trial_id": trial_id})
    runs = tracking.TrialRuns(tracking_uri, opened)  # a resumed search: its names go on from the store's
    runs.GATHER_S = 0.05
    runs.on_trial_start(0, [], _Trial("d", {"dim.a": 4}))
    runs.close()
    names = sorted(r.info.run_name for r in tracking.child_runs(c, exp, parent))
    assert names == ["trial-001", "trial-003", "trial-004"]


def test_a_resumed_searchs_trials_are_named_as_they_start_once_the_store_has_answered(tracking_uri):
    """A resumed search named its new runs only when the writer wrote them: a trial that ended within the writer's
    ~2 s printed Ray's id in the progress. It now reads the highest number first and names trials as they start."""
    import pickle

    from search import tracking

    opened = _opened(tracking_uri)
    c, exp, parent = opened.result()
    first = tracking.TrialRuns(tracking_uri, opened, numbered=0)  # the first leg: trial-001 written, trial-002 never
    first.GATHER_S = 0.05
    first.on_trial_start(0, [], _Trial("a", {"dim.a": 4}))
    first.on_trial_start(0, [], _Trial("b", {"dim.a": 4}))
    first.flush()
    c.delete_run(first.runs["b"])  # as if b's run was never written: the numbers go on after the highest anyway
    c.create_run(exp, run_name="trial-003", tags={"mlflow.parentRunId": parent, "trial_id": "c"})
    runs = pickle.loads(pickle.dumps(first))  # what Ray's experiment state holds for a resume
    # a trial whose run was written after that save, and that Ray continues
    c.create_run(exp, run_name="trial-004", tags={"mlflow.parentRunId": parent, "trial_id": "r"})
    first.close()
    events = []
    runs.rewire(tracking_uri, opened, lambda kind, trial, result: events.append((kind, result)))
    runs.GATHER_S = 0.05
    runs.name_from_store()
    runs.flush()  # the store has answered
    r, d = _Trial("r", {"dim.a": 2}), _Trial("d", {"dim.a": 8, "heuristic": "fastai"})  # Ray continues r
    for t in (r, d):
        runs.on_trial_start(0, [], t)
        _report(runs, t, [1])
        runs.on_trial_complete(0, [], t)  # at once: before the writer has written anything
    runs.close()
    assert [result["run_name"] for kind, result in events if kind == "stopped_early"] == ["trial-004",
                                                                                          "trial-005-fastai"]
    names = {r.data.tags["trial_id"]: r.info.run_name for r in tracking.child_runs(c, exp, parent)}
    assert names == {"a": "trial-001", "c": "trial-003", "r": "trial-004", "d": "trial-005-fastai"}


def test_trial_runs_carry_the_searchs_dataset_as_their_training_input(tracking_uri):
    # only the parent run had the dataset input: the runs table's Dataset column was empty on every trial row
    from pipelines import SyntheticSpec, generate, prepare
    from search import tracking

    data = prepare(generate(SyntheticSpec(rows=2000, seed=4)))
    opened = _opened(tracking_uri)
    c, exp, parent = opened.result()
    tracking.log_dataset(c, parent, data, "synthetic", "search")
    runs = tracking.TrialRuns(tracking_uri, opened)
    runs.GATHER_S = 0.05
    for t in (_Trial("a", {"dim.a": 4}), _Trial("b", {"dim.a": 8})):
        runs.on_trial_start(0, [], t)
        _report(runs, t, [1, 2, 3, 4])
        runs.on_trial_complete(0, [], t)
    runs.close()

    children = tracking.child_runs(c, exp, parent)
    assert len(children) == 2 and runs.errors == []
    for run in children:
        (used,) = run.inputs.dataset_inputs
        assert (used.dataset.name, used.dataset.digest) == (data.name, data.fingerprint)
        assert {t.key: t.value for t in used.tags} == {"mlflow.data.context": "training"}
    # one dataset in the store, shared by the parent and its trials
    assert {r.inputs.dataset_inputs[0].dataset.digest for r in [c.get_run(parent), *children]} == {data.fingerprint}


@pytest.mark.slow
def test_writes_to_a_server_that_went_down_wait_out_mlflows_retries_once(monkeypatch):
    # MLflow retries each request to a server for ~4 minutes (7 retries) before it gives up: with the server down at a
    # search's end, the writer thread spent that once per queued write before the search could end
    from search import tracking

    from .local_cluster import LocalCluster

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # ~1 + 2 + 4 s before MLflow gives up on a request
    with LocalCluster("es-down-") as cl:
        uri = cl.mlflow()
        opened = _opened(uri)
        runs = tracking.TrialRuns(uri, opened)
        runs.GATHER_S = 0.05
        trials = [_Trial(f"t{i}", {"dim.a": 4}) for i in range(4)]
        for t in trials:
            runs.on_trial_start(0, [], t)
            _report(runs, t, [1])
        runs.flush()
        cl.kill("mlflow")
        start = time.monotonic()
        for t in trials:  # 4 result batches and 4 closes queued for a dead server
            _report(runs, t, [2, 3, 4])
            runs.on_trial_complete(0, [], t)
        runs.close()
        took = time.monotonic() - start
        assert runs.down is not None and "does not answer" in str(runs.down)
        assert len(runs.errors) >= 1 + len(trials)  # the writes lost are counted (the parent run's tracking_failures)

        cl.mlflow(port=int(uri.rsplit(":", 1)[1]))  # back: the next write asks, finds it up and goes through
        late = _Trial("t9", {"dim.a": 4})
        runs.on_trial_start(0, [], late)
        _report(runs, late, [1, 2, 3, 4])
        runs.on_trial_complete(0, [], late)
        runs.close()
        assert runs.down is None and not runs.suspect
        c, exp, parent = opened.result()
        (run,) = [r for r in tracking.child_runs(c, exp, parent) if r.data.tags["trial_id"] == "t9"]
        assert run.info.status == "FINISHED" and [s for s, _ in _history(c, run.info.run_id, "val_auc")] == [1, 2, 3, 4]
    assert took < 20, took  # one request's retries (~7 s; 6.6 s measured), not one per queued write (8 x ~7 s)


def test_a_store_another_program_creates_meanwhile_is_kept(tmp_path, monkeypatch):
    # `mlflow ui` (which takes no lock of ours) opened on a new store while a search was building it under a temporary
    # name: the search's rename replaced the file under the UI, whose writes then failed ("attempt to write a readonly
    # database") and whose experiments were gone
    import mlflow.tracking

    from search import tracking

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    real = mlflow.tracking.MlflowClient

    def building(store_uri=None, *args, **kwargs):
        if store_uri and store_uri.endswith(".new"):  # while the search builds its store, the other program makes one
            real(uri).create_experiment("other")
        return real(store_uri, *args, **kwargs)

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", building)
    tracking.client(uri)
    # read from the file itself: MLflow's cached store of this process may still hold the replaced file open
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db") as db:
        assert ("other",) in db.execute("select name from experiments").fetchall()
    assert [p.name for p in (tmp_path / "mlruns").iterdir() if p.name.endswith(".new")] == []


def test_the_process_wide_tracking_uri_is_left_as_the_caller_had_it(tmp_path, monkeypatch):
    """tracking.client called ``mlflow.set_tracking_uri``, which also sets ``MLFLOW_TRACKING_URI`` for the process: a
    library caller's later MLflow calls (and embsize's own defaults, which read it) went to the search's store, or to a
    server gone since. Only ``fluent`` (what ``log_final``'s ``mlflow.start_run`` needs) points MLflow there, and
    only inside."""
    import os

    import mlflow

    from search import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(None)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    try:
        tracking.client(uri).search_experiments()
        assert not mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ
        with tracking.fluent(uri):
            assert mlflow.get_tracking_uri() == uri
            with mlflow.start_run(experiment_id="0") as run:  # the Default experiment of the new store
                mlflow.log_metric("m", 1.0)
        assert tracking.client(uri).get_run(run.info.run_id).data.metrics == {"m": 1.0}
        assert not mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ
        mine = f"sqlite:///{tmp_path / 'mine.db'}"
        mlflow.set_tracking_uri(mine)  # a caller's own choice is set back after
        with tracking.fluent(uri):
            pass
        assert mlflow.get_tracking_uri() == mine and os.environ["MLFLOW_TRACKING_URI"] == mine
    finally:
        mlflow.set_tracking_uri(before)
