"""MLflow: where runs go, the parent run of a search, and one nested child run per trial.

Child runs are written by a Ray Tune callback on the driver, not from inside the trials. The driver is the one place
that knows how every trial ended (finished, stopped early by the scheduler, failed, retried after a lost node), so it
can always close a run with the right status; it is also a single writer, which the embedded SQLite store needs. The
driver must reach the tracking URI, which a multi-node search requires to be a server anyway.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

from ray.tune import Callback

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlruns"  # relative to the current directory: sqlite db + artifacts, no server


def default_tracking_uri(root: Path | None = None) -> str:
    base = (root or Path.cwd()) / DEFAULT_STORE
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded store under ./mlruns."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (mlruns/artifacts); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


def client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


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


def trial_outcome(result: dict | None, error: bool) -> str:
    """How a trial ended: completed (own budget or convergence), stopped_early (by the scheduler), or failed."""
    if error:
        return "failed"
    if result and result.get("final"):
        return "completed"
    return "stopped_early"


class TrialRuns(Callback):
    """Opens a nested MLflow run per trial, streams its per-epoch metrics, and closes it with how it ended.

    ``on_event`` receives (kind, trial_id, result) for live progress in the CLI.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, on_event: Callable | None = None):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.on_event = on_event
        self.runs: dict[str, str] = {}  # trial id -> run id
        self._client = None

    @property
    def c(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def __getstate__(self) -> dict:  # Ray checkpoints callbacks; the MLflow client is rebuilt on restore
        state = self.__dict__.copy()
        state["_client"] = None
        state["on_event"] = None
        return state

    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        existing = self.c.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.trial_id = '{trial.trial_id}'",
            max_results=1,
        )
        if existing:  # a resumed search continues the trial's run instead of opening a duplicate
            run_id = existing[0].info.run_id
            self.c.update_run(run_id, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": self.parent_run_id, "trial_id": trial.trial_id}
            heuristic = trial.config.get("heuristic")
            if heuristic:
                tags["heuristic"] = heuristic
            run = self.c.create_run(self.experiment_id, tags=tags, run_name=_run_name(trial))
            run_id = run.info.run_id
            params = {k: v for k, v in trial.config.items()}
            self.c.log_batch(run_id, params=_params(params))
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)
        self._emit("start", trial, None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self._run_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(result[k]), now, step)
            for k in ("val_auc", "val_logloss", "train_loss", "best_val_auc", "model_bytes", "epoch_seconds")
            if k in result and isinstance(result[k], (int, float)) and math.isfinite(float(result[k]))
        ]
        tags = []
        if step == 1 and "node" in result:
            from mlflow.entities import RunTag

            tags.append(RunTag("node", str(result["node"])))
        self.c.log_batch(run_id, metrics=metrics, tags=tags)
        self._emit("result", trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, error=True)

    def _close(self, trial, error: bool) -> None:
        run_id = self._run_for(trial)
        result = trial.last_result or {}
        outcome = trial_outcome(result, error)
        tags = {"outcome": outcome, "epochs_trained": str(int(result.get("epoch", 0)))}
        if outcome == "completed":
            tags["ended"] = str(result.get("ended", ""))
        if error:
            tags["error"] = _error_text(trial)
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric("epochs_trained", float(result.get("epoch", 0)), now, 0)]
        self.c.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        self.c.set_terminated(run_id, status="FAILED" if error else "FINISHED")
        self._emit(outcome, trial, result)

    def _emit(self, kind: str, trial, result) -> None:
        if self.on_event is not None:
            self.on_event(kind, trial, result)


def _run_name(trial) -> str:
    h = trial.config.get("heuristic")
    return f"{trial.trial_id}-{h}" if h else trial.trial_id


def _params(config: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "trial failed (no error text recorded)"
