"""Load a finished search back from MLflow: the parent run and its nested trial runs -> the runner's records.

Everything is read from the tracking store, so a search run on another machine (or by a colleague) can be reviewed
from its MLflow server alone. Per trial run: the ``outcome``/``heuristic``/``trial_id``/``ended``/``error`` tags, the
``best_val_auc``, ``model_bytes`` and ``epochs_trained`` metrics, and the config params (``dim.<feature>``, searched
knobs). From the parent run: the rule and settings (``search.*`` params), the dataset (``dataset.*``), and two
artifacts the search logged, ``recommended.yaml`` (features, fixed knobs, pinned dims) and ``summary.json`` (the
hypervolume's reference point). The front, the recommendation and the hypervolume are recomputed from the trial runs
with the same functions the runner uses.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path


from pipelines.dataset import FeatureInfo
from pipelines.memory import embedding_bytes, model_bytes
from pipelines.model import ModelConfig

from .recommend import conclude
from .runner import SearchResult
from .space import DIM_PREFIX, config_from_params, hidden_layers
from .tracking import OUTCOMES

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Fixed:
    """What a trial config leaves out because the search did not vary it (read from the recommended recipe)."""

    hidden: tuple[int, ...]  # MLP layers when the width is not searched
    dropout: float
    lr: float
    pins: dict  # feature -> dim of features the search pinned


def find_parent(c, run: str, experiment: str = "embsize"):
    """The parent run named by ``run``: an MLflow run id, or a search name (tag ``embsize.name``; latest wins)."""
    if _RUN_ID.match(run):
        try:
            found = c.get_run(run)
        except Exception:  # MLflow raises its own exception type for an unknown id
            found = None
        if found is not None:
            if found.data.tags.get("embsize.kind") != "search":
                raise ValueError(f"MLflow run {run} is not an embsize search (no tag embsize.kind=search); "
                                 "give the parent run of a search")
            return found
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"MLflow experiment '{experiment}' does not exist in this store; check --experiment and "
                         "--tracking-uri")
    safe = run.replace("'", "")
    runs = c.search_runs([exp.experiment_id], f"tags.`embsize.kind` = 'search' and tags.`embsize.name` = '{safe}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"no search named '{run}' (and no run with that id) in experiment '{experiment}'; "
                         "give a parent run id or the --name of a search, and check --tracking-uri")
    return runs[0]


def load_review(run: str, tracking_uri: str | None = None, experiment: str = "embsize") -> SearchResult:
    """The finished search ``run`` as a ``SearchResult`` built from MLflow only (see the module docstring).

    ``extra`` holds: ``tracking_uri``, ``experiment_id``, ``params`` and ``metrics`` of the parent run, ``fixed``
    (a ``Fixed``), ``features`` (FeatureInfo tuple), ``recipe`` (the recommended Recipe or None), ``settings``
    (rule, epsilon, memory_budget, max_epochs, patience, batch_size, seed, lr, sparse), ``journal`` (path of the
    Optuna journal on this machine, may not exist) and ``tagged_recommendation`` (the trial id the search itself
    recommended).
    """
    from . import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)
    parent = find_parent(c, run, experiment)
    params, metrics = dict(parent.data.params), dict(parent.data.metrics)
    name = parent.data.tags.get("embsize.name") or params.get("search.name") or parent.info.run_name
    recipe = _recipe(c, parent.info.run_id)
    features = recipe.features if recipe is not None else _features(params)
    children = tracking.child_runs(c, parent.info.experiment_id, parent.info.run_id)
    if not children:
        raise ValueError(f"search '{name}' (run {parent.info.run_id}) has no trial runs; it did not get to train")
    fixed = _fixed(c, parent.info.run_id, recipe, children)
    records = [rec for rec in (_record(r, features, fixed) for r in children) if rec is not None]
    if not records:
        raise ValueError(f"no trial run of search '{name}' has its dims as params and the search's recipe does not "
                         "pin them; was the search run with an older embsize?")
    if len(records) < len(children):  # a driver killed between a run's creation and its params write
        log.warning("%d trial runs of search '%s' have no dims as params and are left out",
                    len(children) - len(records), name)
    settings = _settings(params)
    ref = _reference(c, parent.info.run_id)
    concluded = conclude(records, settings["rule"], settings["epsilon"], settings["memory_budget"], ref)
    if concluded is None:
        raise ValueError(f"no trial of search '{name}' completed; nothing to review")
    done, front, pick, hv = concluded
    tagged = parent.data.tags.get("recommended_trial", "")
    if tagged and tagged != pick["trial_id"]:
        log.warning("recomputed recommendation %s differs from the search's tag %s", pick["trial_id"], tagged)
    if math.isnan(hv):  # no reference bytes recorded: the search's own figure
        hv = float(metrics.get("hypervolume", math.nan))
    out_dir = Path(params.get("search.output_dir", "embsize-out")) / name
    extra = {
        "tracking_uri": uri, "experiment_id": parent.info.experiment_id, "params": params, "metrics": metrics,
        "fixed": fixed, "features": features, "recipe": recipe, "settings": settings,
        "journal": out_dir / "optuna.journal", "tagged_recommendation": tagged, "status": parent.info.status,
    }
    recipe_path = out_dir / "recommended.yaml"
    return SearchResult(name, out_dir, records, front, pick, recipe_path, hv, ref, parent.info.run_id, name,
                        float(metrics.get("wall_seconds", 0.0)), extra)


def unfinished_note(result: SearchResult) -> str | None:
    """What a review of a search that has not finished covers, or None for a finished one. A parent run still
    RUNNING is a search running now, or one whose driver was killed (``--resume`` continues both cases' trials)."""
    status = result.extra.get("status", "FINISHED")
    if status == "FINISHED":
        return None
    done = sum(r["outcome"] in OUTCOMES for r in result.trials)
    asked = result.extra["params"].get("search.trials", "?")
    what = {"RUNNING": "is still running (or its driver was killed)", "KILLED": "was interrupted",
            "FAILED": "ended with an error"}.get(status, f"is {status}")
    return (f"search '{result.name}' {what}: this covers the {done} trials that ended ({asked} sampled trials were "
            f"asked for); `embsize search --resume {result.name}` continues it")


def running_here(result: SearchResult) -> bool:
    """Whether a driver on this machine is running the search now (it holds OUT/NAME's lock, see resume.claimed)."""
    from .resume import SearchRunning, check_not_running

    try:
        check_not_running(result.out, result.name)
    except SearchRunning:
        return True
    return False


def trial_setup(result: SearchResult, record: dict) -> tuple[ModelConfig, dict]:
    """(ModelConfig, TrainConfig overrides) of a reviewed trial: its params, completed by the fixed values."""
    fixed: Fixed = result.extra["fixed"]
    config = record["config"]
    hidden = hidden_layers(int(config["hidden"])) if "hidden" in config else fixed.hidden
    dropout = float(config.get("dropout", fixed.dropout))
    return ModelConfig(dict(record["dims"]), hidden, dropout), {"lr": float(config.get("lr", fixed.lr))}


def metric_histories(result: SearchResult, records: list[dict], metric: str = "val_auc") -> dict[str, list]:
    """Per trial id, the (step, value) history of ``metric`` (per-epoch val AUC by default) from MLflow."""
    from . import tracking

    c = tracking.client(result.extra["tracking_uri"])
    return {
        r["trial_id"]: [(m.step, m.value) for m in sorted(c.get_metric_history(r["run_id"], metric), key=lambda m: m.step)]
        for r in records
    }


def _record(run, features: tuple[FeatureInfo, ...], fixed: Fixed) -> dict | None:
    """The trial run as a record, or None for a run without params (its params write never landed: every trial
    has some, at least the knobs the search varies) or whose dims are neither params nor pinned."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    config = config_from_params(params)
    dims = {f.name: config.get(DIM_PREFIX + f.name, fixed.pins.get(f.name)) for f in features}
    if not params or any(d is None for d in dims.values()):
        return None
    outcome = tags.get("outcome") or ("failed" if run.info.status == "FAILED" else "unfinished")
    return {
        "trial_id": tags.get("trial_id", run.info.run_name),
        "heuristic": tags.get("heuristic", ""),
        "outcome": outcome,
        "best_val_auc": float(metrics.get("best_val_auc", math.nan)),
        # exact from the config (as the trial computed it) when the run lacks the metric: a write that never landed
        "model_bytes": int(metrics["model_bytes"]) if "model_bytes" in metrics else model_bytes(
            features, dims, hidden_layers(config["hidden"]) if "hidden" in config else fixed.hidden),
        "embedding_bytes": int(sum(embedding_bytes(features, dims).values())),
        "epochs": int(metrics.get("epochs_trained", 0)),
        "train_seconds": float(metrics.get("train_seconds", math.nan)),  # Ray's training time of the trial
        "ended": tags.get("ended", ""),
        "dims": dims,
        "config": config,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "error": tags.get("error", ""),
        "on_front": False,
        "epoch_seconds": float(metrics.get("epoch_seconds", math.nan)),  # the last epoch's training time
    }


def _settings(params: dict) -> dict:
    def num(key: str, cast, default):
        v = params.get(f"search.{key}", "None")
        return default if v in ("None", "") else cast(float(v))

    return {
        "rule": params.get("search.rule", "epsilon"),
        "epsilon": num("epsilon", float, 0.002),
        "memory_budget": num("memory_budget", int, None),
        "max_epochs": num("max_epochs", int, 12),
        "patience": num("patience", int, 3),
        "batch_size": num("batch_size", int, 1024),
        "seed": num("seed", int, 0),
        "lr": num("lr", float, 3e-3),
        "sparse": params.get("search.sparse") == "True",
    }


def _features(params: dict) -> tuple[FeatureInfo, ...]:
    """Fallback when the recipe artifact is missing: names and cardinalities from the parent's params (kind unknown:
    only the byte counts use them, and those do not depend on it)."""
    prefix = "dataset.cardinality."
    return tuple(FeatureInfo(k[len(prefix):], False, int(v)) for k, v in params.items() if k.startswith(prefix))


def _recipe(c, run_id: str):
    from pipelines.recipe import Recipe

    return _read(c, run_id, "recommended.yaml", Recipe.load)


def _fixed(c, run_id: str, recipe, children: list) -> Fixed:
    if recipe is None:
        from pipelines.train import TrainConfig

        return Fixed(ModelConfig.hidden, ModelConfig.dropout, TrainConfig.lr, {})
    # A trial config lacks exactly the values the search did not vary, so the recommended trial's recipe holds them.
    # Pinned dims too, unless the recommendation is a heuristic baseline: then the pins come from a sampled trial's row
    # of the trials.csv artifact (searches before 2026-12-04 gave the baselines the rule's dim for a pinned feature).
    by_id = {r.data.tags.get("trial_id"): r for r in children}
    picked = by_id.get(recipe.provenance.get("trial_id"))
    pins = dict(recipe.model.dims)
    if picked is not None and picked.data.tags.get("heuristic"):
        pins = _sampled_dims(c, run_id)
    return Fixed(tuple(recipe.model.hidden), float(recipe.model.dropout), float(recipe.train.lr), pins)


def _sampled_dims(c, run_id: str) -> dict:
    import pandas as pd

    frame = _read(c, run_id, "trials.csv", pd.read_csv)
    if frame is None:
        return {}
    sampled = frame[frame["heuristic"].isna() | (frame["heuristic"].astype(str) == "")]
    if sampled.empty:
        return {}
    row = sampled.iloc[0]
    return {k[len(DIM_PREFIX):]: int(row[k]) for k in frame.columns if k.startswith(DIM_PREFIX)}


def _reference(c, run_id: str) -> tuple[float, float]:
    summary = _read(c, run_id, "summary.json", lambda path: json.loads(Path(path).read_text()))
    if summary is None:
        return 0.5, math.nan
    ref = summary.get("reference", {})
    return float(ref.get("auc", 0.5)), float(ref.get("model_bytes", math.nan))


def _read(c, run_id: str, name: str, read):
    """``read(path)`` of the run's artifact ``name``, downloaded to a temporary folder removed after; None without it.
    (Each review left its downloads in the temporary folder before.)"""
    import tempfile

    if name not in {a.path for a in c.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="embsize-review-") as tmp:
        return read(c.download_artifacts(run_id, name, tmp))
