"""From a search's answer to production: `embsize train --config recommended.yaml [--register NAME] [--export DIR]`.

The final model trains the recipe's dims and hyperparameters on train+validation for the search's best epoch count
(no validation rows are left for early stopping), is scored once on the test split, and is logged to MLflow as a run
in the search's experiment, nested under the search's parent run and tagged with it. ``--register`` registers it as a
pyfunc model (``pipelines.serving``), ``--export`` also writes the plain export (``pipelines.export``).

Dataset fingerprint policy: a different fingerprint is a warning, not an error. Retraining the recommended dims on a
newer snapshot of the same table is the normal production case (the dims are per feature, not per category), so it
must work; but it is said loudly (stderr, MLflow tag ``embsize.fingerprint_match=false``, both fingerprints recorded)
because it also happens when the data options differ from the search's by mistake. Different features (names or
kinds) are an error: the recipe's dims cannot apply. Synthetic data has no newer snapshot: without data options it is
rebuilt from the rows, seed, split and min_freq the recipe records, so the fingerprints match.
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines import EncodedDataset, Recipe

log = logging.getLogger(__name__)


@dataclass
class FinalModel:
    model: object  # the trained EmbeddingRecommender
    data: EncodedDataset
    recipe: Recipe  # the trained model's own recipe: this data's cardinalities, the epochs used, test metrics
    epochs: int
    epochs_from: str  # where the epoch count came from
    metrics: dict[str, float]  # test_auc, test_logloss, train_loss, model_bytes, embedding_bytes
    fingerprint_match: bool


def check_data(recipe: Recipe, data: EncodedDataset) -> str | None:
    """Refuse data whose features differ from the recipe's; return a warning when only the fingerprint differs."""
    want = [(f.name, f.multi) for f in recipe.features]
    have = [(f.name, f.multi) for f in data.features]
    if want != have:
        missing = [n for n, _ in want if n not in dict(have)]
        detail = (f"feature '{missing[0]}' is missing" if missing else
                  f"its features are {[n for n, _ in have]} (multi-valued: {[n for n, m in have if m]})")
        raise ValueError(
            f"the data does not fit the config: {detail}, but the config was searched on {[n for n, _ in want]} "
            f"(multi-valued: {[n for n, m in want if m]}); give the data the search used (--data, --features)"
        )
    expected = recipe.dataset.get("fingerprint")
    if expected and expected != data.fingerprint:
        opts = ", ".join(f"{k}={recipe.dataset[k]}" for k in ("source", "rows", "split", "seed", "min_freq")
                         if k in recipe.dataset)
        return (
            f"dataset fingerprint {data.fingerprint} differs from the search's {expected} ({opts}); training the "
            "recommended dims on this data anyway (expected for a newer snapshot; otherwise pass the search's data "
            "options)"
        )
    return None


def final_epochs(recipe: Recipe, client=None) -> tuple[int, str]:
    """How long the final fit trains, and why: the search's best epoch of the recommended trial.

    From the recipe's ``expected.best_epoch`` if present, else the argmax of the trial run's ``val_auc`` history in
    MLflow, else the epochs the trial ran (``expected.epochs``), else the recipe's ``max_epochs``.
    """
    expected = recipe.expected
    if int(expected.get("best_epoch") or 0) >= 1:
        return int(expected["best_epoch"]), "the recommended trial's best epoch (recipe)"
    run_id = (recipe.provenance.get("mlflow") or {}).get("trial_run_id")
    if client is not None and run_id:
        try:
            history = client.get_metric_history(run_id, "val_auc")
        except Exception as e:  # an unreachable or other store: fall back to the recipe, say so
            log.info("no val_auc history for trial run %s (%s)", run_id, e)
            history = []
        points = [m for m in history if math.isfinite(m.value) and m.step >= 1]
        if points:
            best = max(points, key=lambda m: (m.value, -m.step))
            return int(best.step), f"the recommended trial's best epoch (MLflow run {run_id})"
    if int(expected.get("epochs") or 0) >= 1:
        return int(expected["epochs"]), "the epochs the recommended trial trained (recipe)"
    return recipe.train.max_epochs, "the recipe's max_epochs"


def fit_final(recipe: Recipe, data: EncodedDataset, epochs: int, epochs_from: str = "",
              threads: int | None = None, device: str | None = None) -> FinalModel:
    """Train the recipe on train+validation for ``epochs``, then score the test split."""
    from pipelines import evaluate, model_bytes, train
    from pipelines.memory import embedding_bytes
    from pipelines.train import SplitTensors

    warning = check_data(recipe, data)
    cfg = replace(recipe.train, max_epochs=epochs, threads=threads)
    # keep_best=False: with the validation rows in training the last epoch is the model; no best-epoch copy to hold
    result = train(recipe.model, cfg, data, device=device, train_on_val=True, keep_best=False)
    model = result.model
    test_auc, test_logloss = evaluate(model, SplitTensors(data.test, model, next(model.parameters()).device))
    metrics = {
        "test_auc": test_auc,
        "test_logloss": test_logloss,
        "train_loss": result.history[-1].train_loss,
        "model_bytes": float(model_bytes(data.features, recipe.model.dims, recipe.model.hidden)),
        "embedding_bytes": float(sum(embedding_bytes(data.features, recipe.model.dims).values())),
    }
    trained = Recipe(
        data.features,
        recipe.model,
        replace(cfg, threads=None),
        dataset={**recipe.dataset, "name": data.name, "fingerprint": data.fingerprint,
                 "search_fingerprint": recipe.dataset.get("fingerprint")},
        expected={**recipe.expected, "test_auc": test_auc, "test_logloss": test_logloss, "final_epochs": epochs},
        provenance={**recipe.provenance, "final_fit": "train+validation"},
    )
    return FinalModel(model, data, trained, epochs, epochs_from, metrics, warning is None)


def log_final(
    final: FinalModel,
    example,
    uri: str,
    experiment: str | None = None,
    register: str | None = None,
    export_dir: str | Path | None = None,
    source_recipe: str | Path | None = None,
    data_source: str | None = None,
) -> dict:
    """Log ``final`` as an MLflow run linked to its search; write the export; log (and register) the pyfunc model.

    ``example``: a few raw rows (DataFrame of the source columns), logged as the model's input example;
    ``data_source``: where the training data came from, logged as the run's dataset input. Returns the
    run id, experiment id, model URI, registered version (or None) and export directory.
    """
    import mlflow

    from pipelines.export import save_model
    from pipelines.serving import log_model

    from . import tracking

    c = tracking.client(uri)
    prov = final.recipe.provenance
    ml = prov.get("mlflow") or {}
    parent = _run_or_none(c, ml.get("parent_run_id"))
    if experiment:
        exp_id = tracking.ensure_experiment(c, experiment, uri)
    elif parent is not None:
        exp_id = parent.info.experiment_id
    else:
        exp_id = tracking.ensure_experiment(c, "embsize", uri)
    if ml.get("parent_run_id") and parent is None:
        log.warning("the search's parent run %s is not in %s; the run is tagged with its id only",
                    ml["parent_run_id"], uri)
    search = str(prov.get("search", "embsize"))
    fingerprints = {"embsize.fingerprint": final.data.fingerprint,
                    "embsize.search_fingerprint": str(final.recipe.dataset.get("search_fingerprint") or ""),
                    "embsize.fingerprint_match": str(final.fingerprint_match).lower()}
    tags = {
        "embsize.kind": "train",
        "embsize.search": search,
        "embsize.search_run_id": str(ml.get("parent_run_id") or ""),
        "embsize.trial_run_id": str(ml.get("trial_run_id") or ""),
        "embsize.trial_id": str(prov.get("trial_id") or ""),
        **fingerprints,
    }
    if parent is not None and parent.info.experiment_id == exp_id:
        tags["mlflow.parentRunId"] = parent.info.run_id  # shows under the search in the MLflow UI
    metrics = {k: v for k, v in final.metrics.items() if math.isfinite(v)}
    with tracking.fluent(uri), mlflow.start_run(experiment_id=exp_id, run_name=f"{search}-final", tags=tags) as run:
        mlflow.log_params(tracking.params_of({
            "dims": dict(final.recipe.model.dims), "hidden": list(final.recipe.model.hidden),
            "dropout": final.recipe.model.dropout, "epochs": final.epochs, "epochs_from": final.epochs_from,
            "lr": final.recipe.train.lr, "batch_size": final.recipe.train.batch_size,
            "weight_decay": final.recipe.train.weight_decay, "seed": final.recipe.train.seed,
            "dataset.name": final.data.name, "dataset.fingerprint": final.data.fingerprint,
            "dataset.rows": len(final.data.train) + len(final.data.val) + len(final.data.test),
        }))
        mlflow.log_metrics(metrics)
        if data_source:
            tracking.log_dataset(c, run.info.run_id, final.data, data_source, "training")
        if source_recipe:
            mlflow.log_artifact(str(source_recipe))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(export_dir) if export_dir else Path(tmp) / "export"
            info = {"fingerprint": final.data.fingerprint, "metrics": metrics, "search": search,
                    "run_id": run.info.run_id}
            save_model(out, final.model, final.data.encoder, final.recipe, info)
            meta = {"embsize": {**info, "columns": [f.name for f in final.data.features],
                                "multi": [f.name for f in final.data.features if f.multi]}}
            model_info = log_model(out, example, registered_model_name=register, metadata=meta)
        version = model_info.registered_model_version
        if register and version is not None:
            for k, v in {**fingerprints, **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
                         "embsize.search": search, "embsize.run_id": run.info.run_id}.items():
                c.set_model_version_tag(register, str(version), k, v)
            c.update_model_version(register, str(version), description=(
                f"embsize final fit of search '{search}' (trial {prov.get('trial_id', '?')}): dims "
                + ", ".join(f"{k}={v}" for k, v in final.recipe.model.dims.items())
                + f"; test AUC {final.metrics['test_auc']:.4f}; dataset fingerprint {final.data.fingerprint}"))
    return {
        "run_id": run.info.run_id,
        "experiment_id": exp_id,
        "model_uri": f"models:/{register}/{version}" if register and version is not None else model_info.model_uri,
        "version": version,
        "export": str(Path(export_dir).resolve()) if export_dir else None,
    }


# flags of `embsize train` that the config fixes; given with --config they were silently ignored
MODEL_FLAGS = {"default_dim": "--default-dim", "hidden": "--hidden", "dropout": "--dropout", "epochs": "--epochs",
               "patience": "--patience", "lr": "--lr", "batch_size": "--batch-size", "sparse": "--sparse"}


def _refuse_model_flags(args) -> None:
    """A model or training flag that differs from its default conflicts with --config: the config's dims and
    hyperparameters, and the recommended trial's best epoch count, are what it trains."""
    from .cli import build_parser

    defaults = vars(build_parser().parse_args(["train"]))
    given = [flag for name, flag in MODEL_FLAGS.items() if getattr(args, name) != defaults[name]]
    if given:
        raise ValueError(f"{', '.join(given)} conflict{'s' if len(given) == 1 else ''} with --config (the config fixes "
                         "the model and its training: the searched hyperparameters, for the recommended trial's best "
                         "epoch count); drop them, or train without --config")


def train_recipe(args) -> int:
    """`embsize train --config FILE`: the CLI's side (prints; errors are ValueError -> one line, exit 2)."""
    from pipelines import prepare
    from pipelines.load import missing_path
    from pipelines.memory import check_fits, training_copies

    from . import preflight, tracking
    from .cli import _raw

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per step in the terminal
    recipe = Recipe.load(args.config)
    # in a moment, not after the data loads
    check_fits(recipe.features, recipe.model.dims, recipe.model.hidden, copies=training_copies())
    if args.dims:
        raise ValueError("--dims conflicts with --config (the config fixes the dims); drop one of them")
    _refuse_model_flags(args)
    if args.register is not None and not args.register.strip():
        raise ValueError("--register got an empty name; give the registered model a name, e.g. --register recsys")
    if args.register is not None:
        _check_model_name(args.register)
    if args.export:
        _check_export_dir(Path(args.export))
    uri = _tracking_uri(args.tracking_uri, recipe)
    preflight.check_tracking(uri)  # before the data and the training: an unreachable store fails in seconds
    given = args.data
    args = _searched_data(args, recipe)
    if args.data != given and missing_path(args.data):
        raise ValueError(f"the config's data '{args.data}' does not exist (moved, or the config came from another "
                         "machine); pass where that data is now with --data")
    raw = _raw(args)
    data = prepare(raw, split=args.split, seed=args.seed, min_freq=args.min_freq)
    warning = check_data(recipe, data)
    print(data.summary())
    if warning:
        print(f"embsize: warning: {warning}", file=sys.stderr)
    epochs, why = final_epochs(recipe, tracking.client(uri))
    print("dims: " + ", ".join(f"{k}={v}" for k, v in recipe.model.dims.items()))
    print(f"training on train+validation ({len(data.train) + len(data.val)} rows) for {epochs} epochs: {why}")
    final = fit_final(recipe, data, epochs, why, threads=args.threads)
    searched = ""
    if "val_auc" in recipe.expected:  # confirm's and refine's recipes hold a mean over their seeds, a search's one run
        seeds = recipe.expected.get("seeds")
        where = f"mean over seeds {', '.join(map(str, seeds))}" if isinstance(seeds, list) else "the search's trial"
        searched = f"  (val AUC {recipe.expected['val_auc']:.4f}, {where})"
    print(f"test AUC {final.metrics['test_auc']:.4f}  logloss {final.metrics['test_logloss']:.4f}{searched}")
    print(f"model bytes {int(final.metrics['model_bytes']):,} at fp32")
    out = log_final(final, raw.frame.head(5), uri, args.experiment, args.register, args.export, args.config,
                    str(raw.meta.get("source", args.data)))
    print(f"MLflow run {out['run_id']} (experiment {out['experiment_id']}) at {uri}")
    if out["version"] is not None:
        print(f"registered {out['model_uri']}; serve it with: "
              f"MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow models serve -m {out['model_uri']} --env-manager local")
    else:
        print(f"model logged as {out['model_uri']}")
    if out["export"]:
        print(f"plain export: {out['export']} (load with pipelines.load_model)")
    return 0


def _searched_data(args, recipe: Recipe):
    """``args`` with the recipe's data options in place of the ones not given (those at their default, as
    ``--resume`` takes them). Without --data: the searched data itself (the table or MovieLens folder, read as the
    search read it; synthetic data rebuilt with its rows, not the default 100000). With --data (a newer snapshot):
    the search's label, features and reading options, and its split, seed and min-freq. Columns named with
    --features/--multi replace the recipe's both."""
    import argparse

    from .cli import build_parser
    from .parsing import DATA_OPTIONS

    ds, defaults = recipe.dataset, vars(build_parser().parse_args(["train"]))
    taken = {}
    if args.data == defaults["data"] and ds.get("source") and ds["source"] != args.data:
        taken["data"] = ds["source"]
    data = taken.get("data", args.data)
    keys = ["split", "seed", "min_freq"]
    if data == "synthetic":
        keys += ["rows"] if ds.get("source") == "synthetic" else []
    else:
        named = args.features is not None or args.multi is not None
        keys += [k for k in DATA_OPTIONS if not (named and k in ("features", "multi"))]
    taken.update({k: ds[k] for k in keys if k in ds and getattr(args, k) == defaults[k]})
    if taken:
        told = ", ".join(f"{k}={v}" for k, v in taken.items() if k != "data")
        print(f"data: {data}" + (f", {told}" if told else "") + " (the config's)")
    return argparse.Namespace(**{**vars(args), **taken})


def _tracking_uri(given: str | None, recipe: Recipe) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the search's store when it is a local file that exists."""
    from . import tracking

    if given or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking.resolve_tracking_uri(given)
    searched = str((recipe.provenance.get("mlflow") or {}).get("tracking_uri") or "")
    if searched.startswith("sqlite:///") and Path(searched[len("sqlite:///"):]).is_file():
        return searched
    return tracking.resolve_tracking_uri(None)


def _check_model_name(name: str) -> None:
    """MLflow's own rule for registered model names, applied before training rather than after it."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name  # no public validator

    try:
        _validate_model_name(name)
    except MlflowException as e:
        rule = e.message.split(". ", 1)[-1].strip().rstrip(".")  # "Names cannot contain '/' or ':'"
        raise ValueError(f"--register '{name}' is not a valid MLflow model name: {rule}; choose another, "
                         "e.g. --register recsys") from None


def _check_export_dir(target: Path) -> None:
    from pipelines.export import MANIFEST

    from .preflight import check_writable

    target = target.expanduser().resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).is_file())):
        raise ValueError(f"--export directory '{target}' exists and is not an embsize export; choose a new directory")
    check_writable(target, "--export directory", "--export")  # before training, not after it


def _run_or_none(c, run_id: str | None):
    if not run_id:
        return None
    try:
        return c.get_run(run_id)
    except Exception:  # MlflowException when the run is not in this store
        return None
