"""MLflow: where runs go, the parent run of a search, and one nested child run per trial.

Child runs are written by a Ray Tune callback on the driver, not from inside the trials. The driver is the one place
that knows how every trial ended (finished, stopped early by the scheduler, failed, retried after a lost node), so it
can always close a run with the right status; it is also a single writer, which the embedded SQLite store needs. The
driver must reach the tracking URI, which a multi-node search requires to be a server anyway.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Callable

from ray.tune import Callback

# where runs go is decided in preflight (light: the CLI checks the store before importing Ray); re-exported here
from .preflight import DEFAULT_STORE, default_tracking_uri, resolve_tracking_uri  # noqa: F401

log = logging.getLogger(__name__)


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (mlruns/artifacts); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


@contextlib.contextmanager
def fluent(uri: str):
    """MLflow's fluent API (``mlflow.start_run``, ``log_model``) pointed at ``uri`` inside, and set back after.

    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` for the whole process: left set, it would send a
    library caller's later MLflow calls, and the defaults of later embsize calls, to this store.
    """
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets it (and the environment variable) again


def client(uri: str):
    from mlflow.tracking import MlflowClient

    # MLflow prints a "View run" link for every run it ends on a server, with the tracking URI as given: one line per
    # trial is noise, and the URI may hold a password (the CLI prints the parent run once, credentials removed)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    if uri in _OPENED or not uri.startswith("sqlite:///") or uri[len("sqlite:///") :] in ("", ":memory:"):
        return MlflowClient(uri)
    from filelock import FileLock

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a SQLite store's tables on its first open, in place and with no lock of its own:
    # two searches started together in a new project both found no tables, and the second died on the first's
    # half-made schema ("no such column"); a driver killed during those seconds left a store nothing could open
    # again ("table _alembic_tmp_experiments already exists"). So the first open in each process is serialized
    # across processes (the lock file stays), and a new store is built under a temporary name and renamed into place.
    with FileLock(f"{db}.lock"):
        if not db.exists():
            tmp = db.with_name(f".{db.name}.{os.getpid()}.new")
            tmp.unlink(missing_ok=True)
            # MLflow says "Creating initial MLflow database tables..." and "Updating database tables" at INFO, in a
            # format of its own, in the middle of the CLI's start lines
            migrations = logging.getLogger("mlflow.store.db.utils")
            level = migrations.level
            migrations.setLevel(max(migrations.getEffectiveLevel(), logging.WARNING))
            try:
                MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)
            finally:
                migrations.setLevel(level)
            # linked, not renamed, into place: a program that does not take the lock (`mlflow ui` opened on the new
            # store meanwhile) may have created the file since, and its store is kept, not replaced under it
            try:
                os.link(tmp, db)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not db.exists():
                    os.replace(tmp, db)
            tmp.unlink(missing_ok=True)
        c = MlflowClient(uri)
        c.search_experiments(max_results=1)
    _OPENED.add(uri)
    return c


_OPENED: set[str] = set()  # SQLite stores this process has opened once (under the lock) already


def dataset(data, source: str):
    """The data as an MLflow dataset, metadata only (no rows are logged): its name, the fingerprint as digest, where it
    came from (a file or folder; synthetic data as code) and its feature columns. Logged as a run input, it fills the
    MLflow UI's "Datasets used" column and its dataset filter. None (and a warning) if MLflow cannot place the source:
    a search never fails for it."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    try:
        if source == "synthetic":
            src = CodeDatasetSource(tags={"generator": "pipelines.synthetic"})
        else:
            with warnings.catch_warnings():  # MLflow registers its local source twice and says so on every resolve
                warnings.simplefilter("ignore", UserWarning)
                src = resolve_dataset_source(source)
        schema = Schema([ColSpec(DataType.string, f.name) for f in data.features])
        return MetaDataset(src, name=data.name, digest=data.fingerprint, schema=schema)
    except Exception as e:  # noqa: BLE001 - metadata only
        log.warning("the dataset source %r is not logged as an MLflow dataset input: %s", source, e)
        return None


def log_dataset(c, run_id: str, data, source: str, context: str) -> None:
    """``dataset(data, source)`` as an input of the run, with MLflow's context tag (e.g. "training")."""
    from mlflow.entities import DatasetInput, InputTag

    ds = dataset(data, source)
    if ds is not None:  # the client API takes entities; Dataset._to_mlflow_entity is what mlflow.log_input uses
        c.log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])])


def ensure_experiment(c, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_root(uri))


def params_of(d: dict, prefix: str = "") -> dict[str, str]:
    """Flatten to MLflow params (strings of at most 6000 chars)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(params_of(v, f"{key}."))
        else:
            out[key] = str(v)[:6000]
    return out


def find_search_run(c, experiment_id: str, name: str):
    """The newest parent run of the search ``name`` in the experiment, or None."""
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`embsize.kind` = 'search' and tags.`embsize.name` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def child_runs(c, experiment_id: str, parent_run_id: str) -> list:
    """Every trial run of a search (all pages), oldest first (the order in which Ray started them).

    Only trial runs (tagged ``trial_id``): ``embsize train --config`` nests its production run under the search's
    parent run too, so that it shows beside the trials in the MLflow UI, but it is not one of them.
    """
    from mlflow.store.entities.paged_list import PagedList

    runs, token = [], None
    while True:
        page: PagedList = c.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000,
            order_by=["attributes.start_time ASC"], page_token=token,
        )
        runs.extend(r for r in page if r.data.tags.get("trial_id"))
        token = page.token
        if not token:
            return runs


def close_interrupted(c, experiment_id: str, parent_run_id: str) -> int:
    """Close the trial runs a killed driver left RUNNING as KILLED (outcome ``interrupted``); the ones Ray continues
    are set RUNNING again when their trial restarts. Returns how many were closed."""
    closed = 0
    for run in child_runs(c, experiment_id, parent_run_id):
        if run.info.status == "RUNNING":
            c.set_tag(run.info.run_id, "outcome", "interrupted")
            c.set_terminated(run.info.run_id, status="KILLED")
            closed += 1
    return closed


OUTCOMES = ("completed", "stopped_early", "failed")  # how a trial ends (``trial_outcome``); "interrupted" it did not


def trial_outcome(result: dict | None, error: bool) -> str:
    """How a trial ended: completed (own budget or convergence), stopped_early (by the scheduler), or failed."""
    if error:
        return "failed"
    if result and result.get("final"):
        return "completed"
    return "stopped_early"


class TrialRuns(Callback):
    """Opens a nested MLflow run per trial, streams its per-epoch metrics, and closes it with how it ended.

    Trials report synchronously: a slow callback holds up every trial's next epoch. So the Ray callbacks only put
    work on a queue, and one writer thread talks to the store, in order, writing the results that arrive within
    ``GATHER_S`` together. ``flush()`` waits until all is written.
    ``on_event`` receives (kind, trial, result) for live progress in the CLI.
    """

    GATHER_S = 2.0

    def __init__(self, uri: str, opened, on_event: Callable | None = None, numbered: int | None = None):
        """``opened``: a future of (client, experiment id, parent run id), so the store can finish opening while
        Ray starts the first trials. ``numbered``: how many trial runs the parent run holds, when that is known
        without asking the store (0 for a new search): each run's name is then given as its trial starts, so the live
        progress can show it; else the writer thread counts them at the first new run."""
        self.uri, self._opened = uri, opened
        self.experiment_id = self.parent_run_id = None
        self.on_event = on_event
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.names: dict[str, str] = {}  # trial id -> run name (trial-007), which the CLI shows beside Ray's id
        self.unparamed: dict[str, dict] = {}  # run id -> config, for runs whose params write has failed so far
        self.unfinished: set[str] = set()  # trials started (or restored) and not yet completed or failed
        # trial id -> last epoch logged (by this process, or before it for a resumed run): a trial Ray retries, or a
        # resumed search continues, reports again the epochs after its last checkpoint; each is logged once
        self.logged: dict[str, int] = {}
        # what a run has been given already: its best AUC so far, whether its bytes, its placement tags
        self.sent: dict[str, dict] = {}  # run id -> {"best": float, "bytes": bool, "tags": dict}
        self.restored = False  # set by ``rewire``: the trials may have runs from before
        # the number of the last run name given (trial-001, trial-002-sqrt...): for a resumed search, the highest in
        # the store at its first new run, so names go on after those of an earlier leg, a killed driver's included
        self.numbered: int | None = numbered
        # names given on Ray's thread as trials start, not by the writer; a resumed search's once the writer has read
        # the highest number from the store (``name_from_store``)
        self.name_at_start = numbered is not None
        self._naming = threading.Lock()  # Ray's thread and the writer may both take the next name
        # a remote store MLflow gave up on (its retries of one request take ~4 min): the next writes ask it first
        self.suspect = False
        self.down: Exception | None = None  # why the last such check failed; None once the store answers again
        self._datasets: list | None = None  # the parent run's dataset inputs, read at the first new trial run
        self._client = None
        self._queue: queue.Queue | None = None
        self._wake: threading.Event | None = None  # made with the writer thread, like the queue
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    @property
    def c(self):
        if self._client is None:
            # the ids before the client: the writer thread and Ray's pickling (``__getstate__``) both come here, and
            # whoever sees a client must see the ids too
            if self._opened is not None:
                c, self.experiment_id, self.parent_run_id = self._opened.result()
            else:
                c = client(self.uri)
            self._client = c
        return self._client

    def __getstate__(self) -> dict:  # Ray checkpoints callbacks; client, queue and thread are rebuilt on restore
        from .preflight import redact

        # Resolve the ids when the parent run is open already, but never wait for it: Ray pickles the callbacks when
        # the Tuner is built, while the store may still be opening (seconds for a new SQLite store); a restored
        # callback gets its ids from ``rewire`` anyway.
        if self._opened is None or self._opened.done():
            _ = self.c
        state = self.__dict__.copy()
        # the pickle is a file in the output folder: no credentials of the URI in it (``rewire`` sets it again)
        state.update(uri=redact(self.uri), suspect=False, down=None, _client=None, _opened=None, on_event=None,
                     _queue=None, _thread=None, _wake=None, _datasets=None, _naming=None)
        return state

    def rewire(self, uri: str, opened, on_event: Callable | None = None) -> None:
        """Reconnect a callback restored from a Ray experiment (``Tuner.restore``) to this run's store and CLI."""
        self.uri, self._opened, self.on_event = uri, opened, on_event
        self._client = self._queue = self._thread = None
        self.errors, self.unfinished, self.logged, self.sent, self.unparamed = [], set(), {}, {}, {}
        self.restored, self.numbered, self._datasets = True, None, None
        self.suspect, self.down = False, None
        # names of runs that exist (given at a trial's start, a name may never have been written); absent from a
        # callback an older embsize pickled
        self.names = {t: n for t, n in self.__dict__.get("names", {}).items() if t in self.runs}
        self.name_at_start, self._naming = False, threading.Lock()

    def name_from_store(self) -> None:
        """A resumed search: read the highest run number on the writer thread (first in its queue, once the store
        has opened), then name trials as they start, as a new search does. Until then the writer names them."""
        self._submit(self._number)

    def _number(self) -> None:
        if self.numbered is None:
            c = self.c
            existing = child_runs(c, self.experiment_id, self.parent_run_id)
            highest = max((int(m.group(1)) for r in existing
                           if (m := re.match(r"trial-(\d+)", r.info.run_name or ""))), default=0)
            with self._naming:
                self.numbered = highest if self.numbered is None else self.numbered
                # a restored trial keeps its run's name (Ray continues it; its run may be newer than this callback's
                # pickle): known here, it is not given a new one as it starts
                for r in existing:
                    self.names.setdefault(r.data.tags.get("trial_id"), r.info.run_name)
        self.name_at_start = True

    def _submit(self, fn: Callable, *args) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._queue, self._wake = queue.Queue(), threading.Event()
            self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
            self._thread.start()
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            items = [self._queue.get()]
            if items[0][0] == self._log_results:
                # Gather a moment's results and write them as one batch per run: each SQLite log_batch is a
                # transaction of ~15 ms of driver CPU (measured: one per epoch took 2.5 s of 160 epochs' 17 s), and
                # that CPU is taken from the trials (the driver shares their cores).
                self._wake.wait(self.GATHER_S)
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            results: list[tuple] = []
            done = False
            for fn, args in items:
                if fn == self._log_results:
                    results += args[0]
                    continue
                if results:  # in order: a run's results before its close
                    self._call(self._log_results, results)
                    results = []
                if fn is None:
                    done = True
                    break
                self._call(fn, *args)
            if results:
                self._call(self._log_results, results)
            for _ in items:
                self._queue.task_done()
            if done:
                return

    def _call(self, fn: Callable, *args) -> None:
        if self.skip():
            return
        try:
            fn(*args)
        except Exception as e:  # a tracking hiccup must not take the search down; it is reported at the end
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        line = store_error(e)
        if line not in self.errors:  # once per error: a full disk fails every write the same way
            log.warning("MLflow write failed: %s", line)
        self.errors.append(line)
        self.suspect = not is_local_store(self.uri)

    def skip(self) -> bool:
        """Whether to skip a write because the remote store is down. MLflow retries each request to a server for ~4
        minutes before it gives up; once it has given up on one, each later write first asks the store (preflight's
        5 s check) and is skipped, counted as a failure, while it does not answer. Without this a server down at a
        search's end held the end for those minutes once per queued write."""
        if not self.suspect:
            return False
        from .preflight import check_tracking

        try:
            check_tracking(self.uri)
        except ValueError as e:
            self.down = e
            log.warning("MLflow write skipped: %s", e)
            self.errors.append(str(e))
            return True
        self.suspect, self.down = False, None
        return False

    def flush(self) -> None:
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._wake.set()
            self._queue.join()
            self._wake.clear()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._wake.set()
            self._queue.put((None, ()))
            self._thread.join()
        self._thread = None

    def _run_for(self, trial_id: str, config: dict) -> str:
        if trial_id in self.runs:
            run_id = self.runs[trial_id]
            if run_id in self.unparamed:  # its params write failed: again, before anything else goes to the run
                self._write_params(run_id)
            return run_id
        c = self.c  # first: opening the store sets the parent run id the tags below need
        # only a restored search can have a run for the trial already (one store query per trial saved otherwise)
        existing = self.restored and c.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.trial_id = '{trial_id}'",
            max_results=1,
        )
        if existing:  # a resumed search continues the trial's run instead of opening a duplicate
            run_id = existing[0].info.run_id
            self.c.update_run(run_id, status="RUNNING")
            # epochs logged before the interruption are not logged twice when the trial repeats them from an
            # earlier checkpoint
            self.logged[trial_id] = max((m.step for m in self.c.get_metric_history(run_id, "val_auc")), default=0)
            # ... nor its model_bytes (logged once) and best_val_auc (when it improves) again
            metrics, tags = existing[0].data.metrics, existing[0].data.tags
            self.sent[run_id] = {"best": metrics.get("best_val_auc", -math.inf), "bytes": "model_bytes" in metrics,
                                 "tags": {k: tags[k] for k in PLACEMENT if k in tags}}
            self.runs[trial_id], self.names[trial_id] = run_id, existing[0].info.run_name
        else:
            tags = {"mlflow.parentRunId": self.parent_run_id, "trial_id": trial_id}
            if config.get("heuristic"):
                tags["heuristic"] = config["heuristic"]
            name = self.names.get(trial_id)
            if name is None:
                self._number()  # on after the highest: a name given and never written leaves a gap
                name = self.names[trial_id] = self._next_name(config)
            run_id = self.c.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
            # the run is the trial's from here: a params write that fails is tried again with its next write, not
            # with a second run for the trial
            self.runs[trial_id], self.unparamed[run_id] = run_id, config
            self._write_params(run_id)
        return run_id

    def _write_params(self, run_id: str) -> None:
        self.c.log_batch(run_id, params=_params(self.unparamed[run_id]))
        del self.unparamed[run_id]
        self._log_dataset(run_id)

    def _log_dataset(self, run_id: str) -> None:
        """The search's dataset as the trial run's input too (context "training"), so the runs table's Dataset column
        shows it on trial rows. One write per trial, ~7 ms of driver CPU on SQLite (measured: as much as one batch of
        epochs, against ~19 ms for the run and its params; 0.2 s in a default search). Only the whole dataset: MLflow
        keeps one input per dataset and run, and the splits have no digest of their own (the split is a search param).
        """
        from mlflow.entities import DatasetInput, InputTag

        try:  # the run exists already: a failure here must not make the next result open a second one
            if self._datasets is None:
                inputs = self.c.get_run(self.parent_run_id).inputs
                self._datasets = [d.dataset for d in (inputs.dataset_inputs if inputs else [])]
            if self._datasets:
                self.c.log_inputs(run_id, [DatasetInput(d, [InputTag("mlflow.data.context", "training")])
                                           for d in self._datasets])
        except Exception as e:  # noqa: BLE001 - as _call: counted, the search goes on
            self._failed(e)

    def _next_name(self, config: dict) -> str:
        """The next run name, in the order trials start (the UI's run list reads better than Ray's random ids, kept
        as the tag trial_id); taken before the write, so a write that fails and is retried never reuses a name."""
        with self._naming:
            self.numbered += 1
            number = self.numbered
        return f"trial-{number:03d}" + (f"-{config['heuristic']}" if config.get("heuristic") else "")

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.name_at_start and trial.trial_id not in self.names:
            self.names[trial.trial_id] = self._next_name(trial.config)
        self.unfinished.add(trial.trial_id)
        self._submit(self._run_for, trial.trial_id, dict(trial.config))
        self._emit("start", trial, None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._submit(self._log_results, [(trial.trial_id, dict(trial.config), dict(result))])
        self._emit("result", trial, result)

    def _log_results(self, results: list[tuple[str, dict, dict]]) -> None:
        """Per-epoch metrics (and where the trial runs, as tags) of several results, one log_batch per run.

        Each epoch logs val_auc, val_logloss and train_loss; best_val_auc only when it improves (its latest value,
        what ``review`` reads, is the best either way) and model_bytes once. The SQLite store spends ~1 ms of the
        driver's CPU per metric row and per tag, CPU taken from the trials on a laptop: a MovieLens search logged
        ~6 s of it for 32 trials x 20 epochs with every value at every epoch, as long as its trials' own overhead.
        """
        from mlflow.entities import Metric, RunTag

        batches: dict[str, tuple[list, dict]] = {}
        # what each run will have been given once its batch is written: a write that fails (a server hiccup) leaves
        # the run's record as it was, so its model_bytes, best AUC and tags are sent again with the next epoch
        pending: dict[str, dict] = {}
        now = int(time.time() * 1000)
        # a trial restored from a checkpoint sends the epochs the checkpoint holds with its first result
        # (trial.RESTORED): those a killed driver had not logged yet are logged before it
        epochs = [(trial_id, config, epoch) for trial_id, config, result in results
                  for epoch in [*result.get("restored", ()), result]]
        for trial_id, config, result in epochs:
            run_id = self._run_for(trial_id, config)
            step = int(result.get("epoch", result.get("training_iteration", 0)))
            if step <= self.logged.get(trial_id, 0):
                continue
            self.logged[trial_id] = step
            if run_id not in pending:
                was = self.sent.get(run_id, {"best": -math.inf, "bytes": False, "tags": {}})
                pending[run_id] = {**was, "tags": dict(was["tags"])}
            sent = pending[run_id]
            values = {k: result.get(k) for k in ("val_auc", "val_logloss", "train_loss")}
            best = result.get("best_val_auc")
            if isinstance(best, (int, float)) and best > sent["best"]:
                values["best_val_auc"] = sent["best"] = best
            if not sent["bytes"]:
                values["model_bytes"] = result.get("model_bytes")
                sent["bytes"] = isinstance(values["model_bytes"], (int, float))
            metrics, tags = batches.setdefault(run_id, ([], {}))
            metrics += [Metric(k, float(v), now, step) for k, v in values.items()
                        if isinstance(v, (int, float)) and math.isfinite(float(v))]
            # where the trial runs (a retried trial may move): node IP, Ray node id (unique per node), GPUs, cpu|cuda
            placed = {k: str(result[k]) for k in PLACEMENT if k in result}
            tags.update({k: v for k, v in placed.items() if sent["tags"].get(k) != v})
            sent["tags"].update(placed)
        for run_id, (metrics, tags) in batches.items():
            if self.skip():
                continue
            try:  # run by run: one run's failed write does not lose the others' epochs
                for i in range(0, max(len(metrics), 1), 1000):  # MLflow takes at most 1000 metrics per batch
                    self.c.log_batch(run_id, metrics=metrics[i : i + 1000],
                                     tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [])
            except Exception as e:  # noqa: BLE001 - as _call: reported, the search goes on
                self._failed(e)
                continue
            self.sent[run_id] = pending[run_id]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=False)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """Ray retries a failed trial (``--max-failures``) from its last checkpoint: the run stays open, counted."""
        line = error_line(error_text(trial))
        self._submit(self._retried, trial.trial_id, dict(trial.config), line)
        self._emit("retried", trial, {**(trial.last_result or {}), "error": line})

    def _retried(self, trial_id: str, config: dict, error_text: str) -> None:
        run_id = self._run_for(trial_id, config)
        retries = int(self.c.get_run(run_id).data.tags.get("retries", "0")) + 1
        self.c.set_tag(run_id, "retries", str(retries))
        self.c.set_tag(run_id, "last_retry_error", error_text[:5000])

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=True)

    def on_experiment_end(self, trials, **info):
        self.flush()

    def _finish(self, trial, error: bool) -> None:
        self.unfinished.discard(trial.trial_id)
        result = dict(trial.last_result or {})
        text = error_text(trial) if error else ""
        self._submit(self._close, trial.trial_id, dict(trial.config), result, error, text)
        self._emit(trial_outcome(result, error), trial, {**result, "error": error_line(text)} if error else result)

    def _close(self, trial_id: str, config: dict, result: dict, error: bool, error_text: str) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._run_for(trial_id, config)
        outcome = trial_outcome(result, error)
        # on_front / recommended: 'false' until the search's end marks the front and the pick (runner._log_parent)
        tags = {"outcome": outcome, "on_front": "false", "recommended": "false"}
        if outcome == "completed":
            tags["ended"] = str(result.get("ended", ""))
        if error:
            tags["error"] = error_line(error_text)
        now = int(time.time() * 1000)
        metrics = [Metric("epochs_trained", float(result.get("epoch", 0)), now, 0)]
        sent = self.sent.get(run_id, {})
        # the last chance for values whose epoch's write failed: `embsize report` reads them from the run
        if not sent.get("bytes") and isinstance(result.get("model_bytes"), (int, float)):
            metrics.append(Metric("model_bytes", float(result["model_bytes"]), now, int(result.get("epoch", 0))))
        if isinstance(result.get("best_val_auc"), (int, float)) and result["best_val_auc"] > sent.get("best", -math.inf):
            metrics.append(Metric("best_val_auc", float(result["best_val_auc"]), now, int(result.get("epoch", 0))))
        if isinstance(result.get("epoch_seconds"), (int, float)) and math.isfinite(result["epoch_seconds"]):
            metrics.append(Metric("epoch_seconds", float(result["epoch_seconds"]), now, 0))  # its last epoch's
        if isinstance(result.get("time_total_s"), (int, float)) and math.isfinite(result["time_total_s"]):
            # Ray's training time of the trial, over its retries and resumes: what the config cost to train
            metrics.append(Metric("train_seconds", float(result["time_total_s"]), now, 0))
        self.c.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        if error and error_text:  # the whole traceback, which the CLI does not print (the tag holds its last line)
            self.c.log_text(run_id, error_text, "error.txt")
        self.c.set_terminated(run_id, status="FAILED" if error else "FINISHED")

    def _emit(self, kind: str, trial, result) -> None:
        """Tell the CLI; a finished or retried trial's result carries its run's name, when given, as ``run_name``."""
        if self.on_event is None:
            return
        name = self.names.get(trial.trial_id)
        if name and kind not in ("start", "result"):
            result = {**(result or {}), "run_name": name}
        self.on_event(kind, trial, result)


PLACEMENT = ("node", "node_id", "gpu_ids", "device")  # where a trial runs: node IP, Ray node id, GPUs, cpu|cuda


def _params(config: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]


def error_text(trial) -> str:
    """The failed trial's traceback as Ray recorded it (its error file, without the terminal colour codes), or ''."""
    path = getattr(trial, "error_file", None) or ""
    try:
        return re.sub(r"\x1b\[[0-9;]*m", "", Path(path).read_text()) if path else ""
    except OSError:
        return ""


def causes(e: BaseException | None):
    """``e``, then what it was raised from or during, and a SQLAlchemy error's ``orig`` (the database driver's own
    error): MLflow raises its errors from SQLAlchemy's, and Ray and Optuna re-raise file errors inside their own."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)
        e = e.__cause__ or e.__context__ or (orig if isinstance(orig, BaseException) else None)


def store_error(e: BaseException) -> str:
    """One line for a failed store write. SQLAlchemy's errors (under MLflow's SQL stores) span lines, the statement and
    its parameters included, and may start with an autoflush note: the database's own error is the line to show."""
    db = next((c.orig for c in causes(e) if isinstance(getattr(c, "orig", None), BaseException)), None)
    if db is not None:  # e.g. sqlite3.OperationalError: database or disk is full
        return f"{type(db).__name__}: {db}".splitlines()[0]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def error_line(text: str) -> str:
    """A traceback's last line (the exception and its message)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "trial failed (no error text recorded)"
