"""`embsize report` and `embsize confirm`: review a finished search from MLflow (registered by ``cli.build_parser``)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .parsing import feature_columns


def add_review_commands(sub) -> None:
    """Add the ``report`` and ``confirm`` subcommands to the CLI's subparsers."""
    r = sub.add_parser("report", help="report a finished search from MLflow: front, baselines, sensitivity, plots")
    _run_args(r)
    r.add_argument("--out", help="report folder (default: report/ in the search's output folder, if on this "
                                 "machine, else ./embsize-out/NAME/report)")
    r.add_argument("--no-log", action="store_true", help="do not upload the report to the parent run")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("confirm", help="retrain the front, the recommendation and the baselines with several seeds")
    _run_args(c)
    c.add_argument("--seeds", type=int, default=3, help="training seeds per candidate (>= 2; default 3)")
    c.add_argument("--workers", type=int,
                   help="retrains at once, one CPU each, as Ray tasks (default: one per CPU when the search's "
                        "training times say the retrains take over a minute, else 1, in this process)")
    c.add_argument("--out", help="confirmation folder (default: confirm/ in the search's output folder, if on this "
                                 "machine, else ./embsize-out/NAME/confirm)")
    c.add_argument("--refine", action="store_true",
                   help="then halve each searched dim of the confirmed pick while its mean AUC over k fresh seeds "
                        "holds, and write refined.yaml (search/refine.py)")
    c.add_argument("--refine-tolerance", type=float,
                   help="AUC the refinement may give up against the confirmed pick (default: the search's epsilon)")
    g = c.add_argument_group("data (default: rebuilt from the search's run)")
    g.add_argument("--data", help="the search's data source, when it cannot be rebuilt from the run's params")
    g.add_argument("--label", help="label column of a CSV/Parquet file")
    g.add_argument("--features", help="comma-separated feature columns (of a table, or a MovieLens subset)")
    g.add_argument("--multi", help="comma-separated multi-valued feature columns of a table; added to --features "
                                   "when not listed there")
    g.add_argument("--positive-threshold", type=float, help="the search's: label >= this is positive")
    g.add_argument("--positive-label", help="the search's: the label value that is positive")
    c.set_defaults(func=cmd_confirm)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="MLflow parent run id, or a search name (the latest search of that name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlruns SQLite)")
    p.add_argument("--experiment", default="embsize", help="MLflow experiment of a search given by name")


def _review(args):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the terminal to the report
    from .preflight import check_tracking, check_writable, resolve_tracking_uri
    from .review import load_review, running_here, unfinished_note

    if args.out:
        check_writable(Path(args.out), f"{args.command} folder", "--out")
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri, existing=True)  # an unreachable server fails in seconds, not after MLflow's minutes of retries
    result = load_review(args.run, uri, args.experiment)
    note = unfinished_note(result)
    if note and args.command == "confirm" and running_here(result):  # retrains would compete with its trials
        raise ValueError(f"search '{result.name}' is running now on this machine; confirm it when it has ended")
    if note:
        print(f"embsize: warning: {note}", file=sys.stderr)
    return result


def _default_out(result, what: str) -> Path:
    """Beside the search's own outputs (OUTPUT-DIR/NAME/report) when that folder is on this machine and writable,
    whatever the current directory; else ./embsize-out/NAME/report (a search run on another machine)."""
    if result.out.is_dir() and os.access(result.out, os.W_OK):
        return result.out / what
    return Path("embsize-out") / result.name / what


def cmd_report(args) -> int:
    from .report import log_report, report_text, write_report
    from .review import metric_histories
    from .sensitivity import sensitivity

    result = _review(args)
    out = Path(args.out) if args.out else _default_out(result, "report")
    try:
        table, source = sensitivity(result)
    except ValueError as e:  # too few trials: the rest of the report still stands
        table, source = None, ""
        print(f"sensitivity: skipped ({e})")
    files = write_report(result, out, metric_histories(result, result.front), table, source)
    print(report_text(result, table, source))
    print()
    journal = result.extra["journal"]
    if journal.is_file():
        print(f"Optuna study: optuna-dashboard {shlex.quote(str(journal))}  (pip install optuna-dashboard)")
    if not args.no_log:
        log_report(result, files)
    print(f"report: {out.resolve()}" + ("" if args.no_log else f" (also on MLflow run {result.parent_run_id}, "
                                         "artifacts report/)"))
    return 0


def cmd_confirm(args) -> int:
    from .cli import UsageError
    from .confirm import (ConfirmSettings, candidates, confirm, log_confirmation, plan_workers, rebuild_data,
                          write_confirmation)
    from .refine import searched_features

    if args.seeds < 2:
        raise UsageError(f"--seeds is {args.seeds}, but must be >= 2 (one seed has no spread)")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers is {args.workers}, but must be >= 1")
    tol = args.refine_tolerance
    if tol is not None and not (0 <= tol < 1):  # also refuses nan
        raise UsageError(f"--refine-tolerance is {tol}, but must be in [0, 1), e.g. 0.002 (an AUC difference)")
    if tol is not None and not args.refine:
        raise UsageError("--refine-tolerance is given without --refine; add --refine or drop it")
    result = _review(args)
    features, multi = feature_columns(args.features, args.multi)
    options = {k: v for k, v in (("label", args.label), ("features", features or None), ("multi", multi or None),
                                 ("threshold", args.positive_threshold), ("positive_label", args.positive_label))
               if v is not None}
    data = rebuild_data(result, args.data, **options)
    st = result.extra["settings"]
    # --refine: round 0, then about two rounds of one proposal per searched feature (search/refine.py)
    searched = searched_features(result) if args.refine else []
    extra = 1 + 2 * len(searched) if args.refine else 0
    workers, estimate = plan_workers(candidates(result), args.seeds, extra=extra)
    settings = ConfirmSettings(
        seeds=args.seeds, first_seed=st["seed"] + 1, max_epochs=st["max_epochs"], patience=st["patience"],
        batch_size=st["batch_size"], sparse=st["sparse"], workers=args.workers or workers, rule=st["rule"],
        epsilon=st["epsilon"], budget=st["memory_budget"],
    )
    print(f"confirming search '{result.name}': retraining its front, recommendation and baselines with seeds "
          f"{settings.seed_list}, {settings.workers} at once (~{estimate:.0f} s of training in sequence"
          f"{' with the refinement' if args.refine else ''}, from the search's epoch times)", flush=True)
    conf = confirm(result, data, settings)
    out = Path(args.out) if args.out else _default_out(result, "confirm")
    files = write_confirmation(result, conf, data, out)
    log_confirmation(result, conf, files)
    cols = ["label", "recommended", "confirmed", "challenger", "model_bytes", "single_seed_auc", "mean_auc", "sd_auc"]
    print(conf.table[cols + [c for c in conf.table if c.startswith("dim.")] + ["run"]].to_string(index=False))
    rec, new = conf.row(conf.recommended), conf.row(conf.confirmed)
    print()
    print(f"search's recommendation {_named(conf, conf.recommended)}: single seed {rec['single_seed_auc']:.4f}, over "
          f"{len(conf.seeds)} seeds {rec['mean_auc']:.4f} ± {rec['sd_auc']:.4f}")
    print(f"confirmed recommendation {_named(conf, conf.confirmed)}: {new['mean_auc']:.4f} ± {new['sd_auc']:.4f}, "
          f"model bytes {int(new['model_bytes']):,}  [{conf.verdict}]")
    if conf.seed_luck:
        beaten_by = ", ".join(_named(conf, i) for i in conf.challengers)
        print(f"WARNING: the search's recommendation wins only by seed luck: {beaten_by} beat(s) it on mean AUC by "
              "more than the noise")
    print(f"confirmed config: {files['confirmed.yaml'].resolve()} (also on MLflow run {result.parent_run_id}, "
          f"artifacts confirm/); took {conf.seconds:.1f} s")
    if args.refine:
        _refine(result, conf, data, settings, searched, tol, out)
    return 0


def _named(conf, trial_id: str) -> str:
    """A candidate as the search's output names it: its MLflow run's name and Ray's trial id (the id alone for a
    run with no name)."""
    run = conf.row(trial_id)["run"]
    return f"{run} (Ray trial {trial_id})" if run != trial_id else trial_id


def _refine(result, conf, data, settings, searched: list[str], tolerance, out: Path) -> None:
    from .refine import log_refinement, refine, write_refinement

    fresh = [s + settings.seeds for s in settings.seed_list]
    within = settings.epsilon if tolerance is None else tolerance
    print(f"\nrefining {_named(conf, conf.confirmed)}: halving each of {', '.join(searched) or '(no searched dims)'} "
          f"while the mean AUC over seeds {fresh} stays within {within} of the pick's on those seeds (round 0)",
          flush=True)
    ref = refine(conf, data, settings, searched, tolerance)
    files = write_refinement(result, conf, ref, data, out)
    log_refinement(result, ref, files)
    cols = ["round", "changed", "model_bytes", "mean_auc", "sd_auc", "holds", "taken"]
    if len(ref.steps):
        print(ref.steps[cols + [f"dim.{f}" for f in searched]].to_string(index=False))
    start = conf.row(conf.confirmed)
    print(f"refined dims: {', '.join(f'{k} {ref.start.model.dims[k]}->{v}' for k, v in ref.dims.items() if k in searched)}")
    print(f"refined config: mean AUC {ref.mean_auc:.4f} ± {ref.sd_auc:.4f} (floor {ref.floor:.4f}), model bytes "
          f"{ref.model_bytes:,} ({ref.model_bytes / start['model_bytes']:.2f}x the confirmed pick's); "
          f"{files['refined.yaml'].resolve()}; took {ref.seconds:.1f} s")
