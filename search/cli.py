"""The `embsize` command. Bad input ends with one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

from .parsing import DATA_OPTIONS, feature_columns, load_kwargs, parse_bytes, parse_dims, parse_ints


class UsageError(Exception):
    """Bad input found by the CLI itself."""


class SearchFailed(RuntimeError):
    """A search that ran but produced no result (every trial failed): exit code 1, one line."""


class _Defaults(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, minus the defaults that say nothing (None, False) and the helps
    that state their default in words already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text or not action.option_strings:  # `is`: 0 and 0.0 == False, and they say something
            return text
        return f"{text} (default %(default)s)" if text else "default %(default)s"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Defaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (default, planted dims), a MovieLens folder/zip, 'movielens-100k' (download), "
                        "or a CSV/Parquet file")
    g.add_argument("--label", help="label column of a CSV/Parquet file")
    g.add_argument("--features", help="comma-separated feature columns of a CSV/Parquet file")
    g.add_argument("--multi", help="comma-separated multi-valued feature columns (cells like 'a|b'); "
                                   "added to --features when not listed there")
    g.add_argument("--sep", default="|", help="separator inside multi-valued cells (default '|')")
    g.add_argument("--positive-threshold", type=float, help="label >= this is positive (MovieLens default 4)")
    g.add_argument("--positive-label", metavar="VALUE",
                   help="a text label's positive value: rows equal to it are positive, the rest negative")
    g.add_argument("--time-column", help="timestamp column, for --split temporal")
    g.add_argument("--delimiter", help="CSV delimiter (default: detected)")
    g.add_argument("--rows", type=int, help="rows of the synthetic dataset (default 100000; train --config: the "
                                             "config's, as are its --seed, --split and --min-freq)")
    g.add_argument("--split", choices=("random", "temporal"), default="random",
                   help="train/validation/test split: random rows, or by --time-column")
    g.add_argument("--min-freq", type=int, default=1, help="values seen fewer times in training map to unknown (0)")
    g.add_argument("--seed", type=_seed, default=0, help="split, init and sampler seed, an integer >= 0")


def _seed(text: str) -> int:
    """--seed: numpy's generators take only integers >= 0; said here with the flag's name rather than by numpy."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:  # argparse prefixes "argument --seed: "
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer >= 0; give one, e.g. --seed 1")
    return value


def _raw(args):
    """The RawDataset that --data and its options name, before splitting and vocabularies."""
    from pipelines.load import load

    if args.rows is not None and args.rows < 1:
        raise UsageError(f"--rows is {args.rows}, but must be >= 1")
    return load(args.data, **load_kwargs(vars(args)), synthetic_rows=args.rows, seed=args.seed)


def data_options(args) -> dict:
    """How a table (or MovieLens) was read, as far as the user said: recorded with a search (its run's ``dataset.*``
    params, its recipe's ``dataset``), so that ``confirm`` and ``train --config`` read the same data again without
    the options typed anew. Keys are the options' dests; features and multi are comma-joined as typed."""
    features, multi = feature_columns(args.features, args.multi)
    given = {**{k: getattr(args, k) for k in DATA_OPTIONS}, "features": ",".join(features) or None,
             "multi": ",".join(multi) or None, "sep": None if args.sep == "|" else args.sep}
    return {k: v for k, v in given.items() if v is not None}


def _load(args) -> tuple[object, dict]:
    from pipelines import prepare

    raw = _raw(args)
    data = prepare(raw, split=args.split, seed=args.seed, min_freq=args.min_freq)
    info = {"source": str(raw.meta.get("source", args.data)), "split": args.split, "min_freq": args.min_freq,
            "seed": args.seed, "rows": len(raw), **data_options(args)}
    if "planted_dims" in raw.meta:
        info["planted_dims"] = raw.meta["planted_dims"]
    return data, info


def _check_train_flags(args) -> None:
    """Training flags, named as the user typed them, before the config or the data is read (TrainConfig's own checks
    come after the data load and name its fields; a bad --threads reached torch and ended in a traceback)."""
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--patience", args.patience, 0), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} is {value}, but must be >= {low}")
    if not args.lr > 0:  # NaN too
        raise UsageError(f"--lr is {args.lr}, but must be > 0")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout is {args.dropout}, but must be in [0, 1)")


def _note_sparse(data, sparse: bool) -> None:
    """Print the note suggesting --sparse for a large table (pipelines.train.sparse_hint), unless it is given."""
    from pipelines.train import sparse_hint

    hint = None if sparse else sparse_hint(data.features)
    if hint:
        print(hint)


def cmd_train(args) -> int:
    from pipelines import ModelConfig, TrainConfig, evaluate, model_bytes, train
    from pipelines.memory import check_fits, embedding_bytes, training_copies
    from pipelines.train import SplitTensors

    _check_train_flags(args)
    if args.config:
        from .production import train_recipe

        return train_recipe(args)
    if args.register or args.export or args.tracking_uri or args.experiment:
        raise UsageError("--register, --export, --tracking-uri and --experiment need --config (a recommended.yaml "
                         "from `embsize search`); train without it logs nothing to MLflow")
    data, _ = _load(args)
    dims = parse_dims(args.dims or "")
    unknown = sorted(set(dims) - set(data.feature_names))
    if unknown:
        raise UsageError(f"dim given for unknown feature '{unknown[0]}'; known features: {', '.join(data.feature_names)}")
    if args.default_dim < 1:
        raise UsageError(f"--default-dim is {args.default_dim}, but must be >= 1")
    dims = {f: dims.get(f, args.default_dim) for f in data.feature_names}
    model_cfg = ModelConfig(dims, parse_ints(args.hidden, "--hidden"), args.dropout)
    # before the summary is printed and the tables allocated
    check_fits(data.features, dims, model_cfg.hidden, copies=training_copies(keep_best=True))
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.epochs, patience=args.patience,
                      seed=args.seed, threads=args.threads, sparse=args.sparse)
    print(data.summary())
    _note_sparse(data, args.sparse)
    print("dims: " + ", ".join(f"{k}={v}" for k, v in dims.items()))

    def on_epoch(r, _snapshot):
        print(f"epoch {r.epoch:3d}  train loss {r.train_loss:.4f}  val AUC {r.val_auc:.4f}  "
              f"val logloss {r.val_logloss:.4f}  {r.samples_per_s:,.0f} samples/s", flush=True)

    result = train(model_cfg, cfg, data, on_epoch=on_epoch)
    test_auc, test_ll = evaluate(result.model, SplitTensors(data.test, result.model, next(result.model.parameters()).device))
    nbytes = model_bytes(data.features, dims, model_cfg.hidden)
    emb = sum(embedding_bytes(data.features, dims).values())
    print(f"ended: {result.ended} after {result.epochs} epochs (best epoch {result.best_epoch})")
    print(f"validation AUC {result.best_val_auc:.4f}  logloss {result.best_val_logloss:.4f}")
    print(f"test AUC {test_auc:.4f}  logloss {test_ll:.4f}")
    print(f"model bytes {nbytes:,} (embeddings {emb:,}) at fp32")
    return 0


def cmd_search(args) -> int:
    from . import preflight
    from .cluster import check_gpus_per_trial
    from .resume import check_name

    if args.resume:
        args = _resumed(args)
    if args.trials < 1:
        raise UsageError(f"--trials is {args.trials}, but must be >= 1")
    if args.max_epochs < 1:
        raise UsageError(f"--max-epochs is {args.max_epochs}, but must be >= 1")
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial is {args.cpus_per_trial}, but must be > 0")
    check_gpus_per_trial(args.gpus_per_trial)  # a fraction (0.25) or a whole number; not negative, not NaN
    if args.gpu_batch_size is not None and args.gpu_batch_size < 1:
        raise UsageError(f"--gpu-batch-size is {args.gpu_batch_size}, but must be >= 1")
    if not 0 <= args.epsilon < 1:
        raise UsageError(f"--epsilon is {args.epsilon}, but must be in [0, 1)")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--patience", args.patience, 0),
                             ("--grace-period", args.grace_period, 1), ("--max-concurrent", args.max_concurrent, 1),
                             ("--num-cpus", args.num_cpus, 1), ("--max-failures", args.max_failures, -1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} is {value}, but must be >= {low}" + (" (-1: retry forever)" if low < 0 else ""))
    if not args.checkpoint_every >= 0:  # NaN too
        raise UsageError(f"--checkpoint-every is {args.checkpoint_every}, but must be >= 0 seconds (0: every epoch)")
    if not args.reduction_factor > 1:
        raise UsageError(f"--reduction-factor is {args.reduction_factor}, but must be > 1")
    if args.name:
        check_name(args.name)
    if not args.experiment.strip():
        raise UsageError("--experiment is empty; name the MLflow experiment, e.g. --experiment embsize (the default)")
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    out_dir = Path(args.output_dir).resolve()
    preflight.check_writable(out_dir)
    uri = preflight.resolve_tracking_uri(args.tracking_uri)
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    preflight.check(uri, address)  # before torch, Ray and the data load: an unreachable service fails in seconds
    if args.storage_path and "://" not in args.storage_path:
        preflight.check_writable(Path(args.storage_path), "Ray Tune storage", "--storage-path")
    elif args.storage_path:
        preflight.check_storage_uri(args.storage_path)
    if address is None:  # the local Ray's resources are known before it starts: a trial that cannot fit is refused
        import torch     # before anything is written (on a cluster, check_cluster does this once connected)

        from .cluster import check_fits

        local = {"CPU": float(args.num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        check_fits([{"Resources": local}], args.cpus_per_trial, args.gpus_per_trial)

    from . import resume
    from .runner import NoTrialCompleted, SearchSettings, TrackingUnavailable, run_search
    from .space import SearchSpec, build_space, load_spec

    rule = "knee" if args.knee else ("budget" if budget is not None and args.rule_budget else "epsilon")
    spec = load_spec(args.spec) if args.spec else SearchSpec()
    spec = _spec_overrides(spec, args)
    data, info = _load(args)
    space = build_space(data.features, spec)
    from pipelines.memory import available_bytes, training_copies

    have = available_bytes() if address is None else None  # a cluster's nodes may have more than this machine
    need = space.min_bytes() * training_copies()  # a trial keeps no best-epoch copy
    if have is not None and need > have:  # every trial would fail in its allocator, after Ray started
        raise UsageError(
            f"training the smallest model in the search space needs about {need:,} bytes ({space.min_bytes():,} "
            f"of parameters, with gradients, Adam's moments and a checkpoint), more than the {have:,} this machine "
            f"has available; lower the pinned or minimum dims (--spec, --min-dim)"
        )
    if budget is not None and space.min_bytes() > budget:
        raise UsageError(
            f"--memory-budget {budget:,} bytes is below the smallest model in the search space "
            f"({space.min_bytes():,} bytes); raise the budget, or lower --min-dim, the pinned dims or the MLP width "
            f"(`hidden` in --spec)"
        )
    dated = re.sub(r"[^A-Za-z0-9._-]", "_", f"{data.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    name = args.name or _fresh_name(out_dir, dated)
    settings = SearchSettings(
        name=name, trials=args.trials, max_epochs=args.max_epochs, patience=args.patience,
        batch_size=(args.gpu_batch_size or args.batch_size) if args.gpus_per_trial else args.batch_size,
        cpus_per_trial=args.cpus_per_trial, storage_path=args.storage_path,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, scheduler=args.scheduler,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor, memory_budget=budget, rule=rule,
        epsilon=args.epsilon, heuristics=not args.no_heuristics, seed=args.seed,
        tracking_uri=uri, experiment=args.experiment,
        output_dir=str(out_dir), address=address,
        num_cpus=args.num_cpus, max_failures=args.max_failures, sparse=args.sparse,
        checkpoint_seconds=args.checkpoint_every,
    )
    previous = resume.load(settings.out)
    if previous is not None:  # run_search checks again; here it is refused before anything is printed
        resume.check_same(previous, resume.identity(settings, data, space, uri), name)
        resume.check_not_running(settings.out, name)
    print(f"data: {info['source']}")
    print(data.summary())
    _note_sparse(data, settings.sparse)
    for line in _pin_notes(data, space):
        print(f"embsize: warning: {line}", file=sys.stderr)
    if previous is not None:
        if (settings.out / "summary.json").is_file():  # written when its last trial had ended
            print(f"search '{name}' in {settings.out} has ended; running it again trains only what it left unfinished "
                  "(nothing, if every trial ended) and prints its result; a new --name starts a new search")
        else:
            print(f"continuing search '{name}' from {settings.out} (finished trials are kept)")
    note = _budget_note(data, space, budget) if budget is not None and not args.no_heuristics else None
    if not args.verbose:
        _quiet_trial_tracebacks()
    while True:
        # said once run_search's checks (tracking store, Ray cluster, storage, free space) have passed: a refused
        # search names no outputs, and a dated name taken at the last moment is said as the one used
        header = [f"search '{name}': {args.trials} trial{'s' if args.trials != 1 else ''}"
                  f"{'' if args.no_heuristics else ' + baselines'}, <= {args.max_epochs} epochs each, scheduler "
                  f"{args.scheduler}; outputs -> {settings.out}"] + ([note] if note else [])
        progress = _Progress(args.trials, header)
        command = _command(args, name, out_dir, uri)
        try:
            result = run_search(data, space, settings, info, on_event=progress, command=command, fresh=not args.name)
            break
        except NoTrialCompleted as e:
            raise SearchFailed(str(e)) from None
        except TrackingUnavailable as e:  # the result is in the files: shown, then the search fails for MLflow
            _print_result(e.result)
            raise SearchFailed(str(e)) from None
        except (resume.SearchRunning, resume.NameTaken):
            if args.name:
                raise
            # a search started in the same second took this dated name first (between _fresh_name and its claim)
            taken, name = name, _fresh_name(out_dir, dated)
            settings = dataclasses.replace(settings, name=name)
            print(f"search name '{taken}' was taken by a search started at the same moment; this one is '{name}'")
        except Exception as e:  # after the clauses above: a full disk, found behind whatever Ray raised
            full = _disk_full(e)
            if full is None:
                raise
            raise SearchFailed(
                f"a disk filled up during search '{name}' ({type(full).__name__}: {str(full).splitlines()[0]}); free "
                f"some space, then `embsize search --resume {name} --output-dir {shlex.quote(str(out_dir))}` "
                "continues it") from None
    _print_result(result)
    return 0


def _disk_full(e: BaseException | None) -> BaseException | None:
    """The "no space left" error behind ``e``, or None: an OSError ENOSPC/EDQUOT (Ray's and Optuna's file writes) or
    SQLite's "database or disk is full" (MLflow's store)."""
    import errno

    from .tracking import causes

    return next((c for c in causes(e) if (isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT))
                 or "database or disk is full" in str(c)), None)


def _quiet_trial_tracebacks() -> None:
    """Ray Tune logs a failed trial's whole traceback (twice when the trial is retried); the progress line names the
    error, and the traceback is the trial run's error.txt in MLflow (and error.txt in Ray's trial folder). After a
    Ctrl-C it tells the user to resume with `Tuner.restore(path=..., trainable=...)` (Python, not the CLI; embsize
    prints its own `--resume` line) and, then and on resume, warns that it found no metrics for the trials stopped
    before their first report (their epochs are in MLflow and the table once they run). -v keeps Ray's log."""
    for logger, text in (("ray.tune.execution.tune_controller", "Trial task failed"),
                         ("ray.tune.tune", "Resume experiment with:"),
                         ("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics for"),
                         # a failed SQLite write, with its whole traceback, where embsize warns in one line
                         ("mlflow.store.db.utils", "SQLAlchemy database error")):
        logging.getLogger(logger).addFilter(lambda record, text=text: text not in str(record.msg))


def _budget_note(data, space, budget: int) -> str | None:
    """The heuristic baselines that --memory-budget keeps from training (the result table shows none of them)."""
    from .heuristics import HEURISTICS
    from .runner import heuristic_configs

    sizes = {rule: space.bytes(c) for rule, c in heuristic_configs(data, space, None).items()}
    over = {rule: size for rule, size in sizes.items() if size > budget}
    if not over:
        return None
    return (f"heuristic baselines over --memory-budget {budget:,} bytes, not trained: "
            + ", ".join(f"{HEURISTICS[rule]} ({size:,} bytes)" for rule, size in over.items()))


def _pin_notes(data, space) -> list[str]:
    """A dim pinned above the feature's number of categories, where the search caps a searched dim: taken as given
    (a pin may match a model already in production), but said, since the extra columns cost bytes and learn nothing
    a dim of that size could not."""
    return [f"--spec pins {f.name} at dim {space.pins[f.name]}, above its {f.cardinality - 1} categories (the cap on "
            f"a searched dim); the extra dims cost bytes and learn nothing, so {f.cardinality - 1} would do"
            for f in data.features if space.pins.get(f.name, 0) > max(1, f.cardinality - 1)]


def _fresh_name(out_dir: Path, base: str) -> str:
    """The dated default name, or BASE-2, BASE-3, ... when a search in OUT has it already (searches a script starts
    within the same second): an existing name would continue that search, which only --name and --resume ask for."""
    name, k = base, 2
    while (out_dir / name).exists():
        name, k = f"{base}-{k}", k + 1
    return name


def _command(args, name: str, out_dir: Path, uri: str) -> dict:
    """The options of this search as ``--resume`` will repeat them: paths resolved (a resume may run elsewhere), the
    tracking URI resolved unless it holds credentials (those stay out of files: give it again when resuming)."""
    from .preflight import redact

    command = {k: v for k, v in vars(args).items() if k not in ("func", "resume")}
    command.update(name=name, output_dir=str(out_dir), tracking_uri=uri if redact(uri) == uri else None)
    for key in ("data", "spec"):
        if command.get(key) and Path(command[key]).exists():
            command[key] = str(Path(command[key]).resolve())
    if command.get("storage_path") and "://" not in command["storage_path"]:
        command["storage_path"] = str(Path(command["storage_path"]).resolve())
    return command


def _resumed(args) -> argparse.Namespace:
    """The options that started the search ``--resume`` names, with the ones given now (those not at their default)
    on top; a changed setting that defines the search is then refused by ``run_search``, naming it."""
    from .resume import check_name, stored_command

    if args.name and args.name != args.resume:
        raise UsageError(f"--resume {args.resume} and --name {args.name} name different searches; give one of them")
    out_dir = Path(args.output_dir).resolve()
    stored = stored_command(out_dir / check_name(args.resume), args.resume)
    defaults = vars(build_parser().parse_args(["search"]))
    merged = {**defaults, **{k: v for k, v in stored.items() if k in defaults}}
    merged.update({k: v for k, v in vars(args).items() if k in defaults and v != defaults[k]})
    merged.update(name=args.resume, output_dir=str(out_dir), func=args.func)
    return argparse.Namespace(**merged)


def _spec_overrides(spec, args):
    from dataclasses import replace

    changes = {}
    if args.max_dim is not None:
        changes["max_dim"] = args.max_dim
    if args.min_dim is not None:
        changes["min_dim"] = args.min_dim
    if args.grid is not None:
        changes["grid"] = args.grid
    if args.lr is not None:
        changes["lr"] = args.lr
    try:
        return replace(spec, **changes) if changes else spec
    except ValueError as e:
        raise UsageError(str(e)) from None


class _Progress:
    """Live progress line per finished trial: counts, best AUC so far, front size."""

    def __init__(self, trials: int, header: list[str] = ()):
        self.trials, self.header = trials, list(header)
        self.counts = {"completed": 0, "stopped_early": 0, "failed": 0}
        self.running: set[str] = set()
        self.points: list[tuple[float, int]] = []

    def __call__(self, kind: str, trial, result) -> None:
        if kind == "begin":  # run_search's checks have passed
            print("\n".join(self.header), flush=True)
            return
        if kind == "start":
            self.running.add(trial.trial_id)
            return
        if kind == "result":
            return
        if kind == "retried":
            print(f"  {_who(trial, result)} failed ({result['error']}); retrying it from its last checkpoint "
                  "(--max-failures)", flush=True)
            return
        self.running.discard(trial.trial_id)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "completed" and result:
            self.points.append((float(result["best_val_auc"]), int(result["model_bytes"])))
        best = max((a for a, _ in self.points), default=math.nan)
        front = sum(
            1 for a, b in self.points if not any((a2 >= a and b2 <= b) and (a2 > a or b2 < b) for a2, b2 in self.points)
        )
        # a baseline's run name carries its rule (trial-003-sqrt); Ray's id alone does not
        label = "" if (result or {}).get("run_name") else trial.config.get("heuristic") or ""
        done = sum(self.counts.values())
        print(f"[{done:3d} finished] completed {self.counts['completed']}  stopped early {self.counts['stopped_early']}"
              f"  failed {self.counts['failed']}  running {len(self.running)}  best AUC {best:.4f}  front {front}"
              f"   <- {_who(trial, result)} {kind}{' (' + label + ')' if label else ''}"
              f"{': ' + result['error'] if kind == 'failed' else ''}", flush=True)


def _who(trial, result) -> str:
    """The trial as the MLflow UI lists its run (trial-007) with Ray's id, or Ray's id alone (a resumed search's run
    is named when written)."""
    name = (result or {}).get("run_name")
    return f"{name} ({trial.trial_id})" if name else trial.trial_id


def _print_result(result) -> None:
    from .report import front_table, trial_label

    print()
    print("Pareto front and heuristic baselines (validation AUC, fp32 model bytes):")
    print(front_table(result).to_string(index=False))
    print()
    rec = result.recommended
    print(f"recommended: {trial_label(rec)}  val AUC {rec['best_val_auc']:.4f}  model bytes {rec['model_bytes']:,}")
    print("  dims: " + ", ".join(f"{k}={v}" for k, v in rec["dims"].items()))
    print(f"hypervolume {result.hypervolume:.5f} (reference AUC {result.reference[0]}, bytes {result.reference[1]:,.0f})")
    legs = result.extra.get("legs", 1)
    took = f" over {legs} runs of the search (this one {result.extra['leg_seconds']:.1f} s)" if legs > 1 else ""
    print(f"wall time {result.seconds:.1f} s{took}; MLflow parent run {result.parent_run_id}")
    if result.extra.get("tracking_failures"):
        print(f"embsize: warning: {result.extra['tracking_failures']} MLflow writes of trial runs failed (last: "
              f"{result.extra['tracking_error']}); those runs may lack epochs or tags, which `embsize report` reads; "
              f"the files in {result.out} are complete", file=sys.stderr)
    print(f"recommended config: {result.recipe_path}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="embsize", description="Measure how big each categorical feature's embedding should be.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    s = sub.add_parser("search", help="search per-feature embedding dims (Ray Tune + Optuna + MLflow)")
    _data_args(s)
    g = s.add_argument_group("search")
    g.add_argument("--trials", type=int, default=24, help="sampled trials (heuristic baselines run in addition)")
    g.add_argument("--max-epochs", type=int, default=10, help="full training budget per trial")
    g.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (0 = off)")
    g.add_argument("--batch-size", type=int, default=1024, help="training batch size of every trial")
    g.add_argument("--lr", type=float, help="fix the learning rate (default: searched 1e-3..1e-2, see --spec)")
    g.add_argument("--scheduler", default="pareto-asha", choices=("pareto-asha", "asha", "fifo"),
                   help="early stopping of weak trials: by Pareto rank on (AUC, bytes) (default), by AUC, or none")
    g.add_argument("--grace-period", type=int, default=2, help="epochs before a trial may be stopped")
    g.add_argument("--reduction-factor", type=float, default=3, help="ASHA's eta")
    g.add_argument("--spec", help="YAML search spec: pin/narrow features, drop knobs")
    g.add_argument("--min-dim", type=int, help="smallest dim searched (default 1)")
    g.add_argument("--max-dim", type=int, help="global cap on any dim (default 64)")
    g.add_argument("--grid", choices=("log", "pow2"), help="dims on a log scale (default) or powers of two")
    g.add_argument("--memory-budget", help="hard cap on model bytes (e.g. 2MB); also picks the best model under it")
    g.add_argument("--knee", action="store_true", help="recommend the knee of the front")
    g.add_argument("--epsilon", type=float, default=0.002,
                   help="recommend the smallest model within this AUC of the best; with --knee, the rule a front "
                        "without a knee (under 3 points, or none above the line joining its ends) falls back to; "
                        "under any rule, the default --refine-tolerance of `embsize confirm --refine`")
    g.add_argument("--no-heuristics", action="store_true", help="skip the rule-of-thumb baselines")
    g.add_argument("--sparse", action="store_true",
                   help="sparse embedding gradients (lazy Adam on the rows a batch touches): for ~1M-row tables")
    g.add_argument("--name", help="search name (output folder, Ray experiment, Optuna study, MLflow run); "
                                  "an existing search of that name is continued")
    g.add_argument("--resume", metavar="NAME",
                   help="continue the interrupted search NAME in --output-dir with the options it was started with")
    g.add_argument("--output-dir", default="embsize-out", help="where search outputs go (default ./embsize-out)")
    r = s.add_argument_group("resources and tracking")
    r.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs (torch threads) per trial")
    r.add_argument("--gpus-per-trial", type=float, default=0, help="fraction or whole number of GPUs per trial")
    r.add_argument("--max-concurrent", type=int, help="trials at once (default: CPUs / cpus-per-trial)")
    r.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    r.add_argument("--address", help="Ray cluster address (auto | HOST:PORT); default $RAY_ADDRESS or a local Ray")
    r.add_argument("--storage-path", help="Ray Tune storage: a folder every node sees or an S3-compatible URI "
                   "(s3://bucket/dir); required on a multi-node cluster (default OUTPUT-DIR/NAME/ray)")
    r.add_argument("--gpu-batch-size", type=int, help="batch size of every trial when --gpus-per-trial > 0 "
                   "(default --batch-size): a GPU needs larger batches to keep busy")
    r.add_argument("--max-failures", type=int, default=1,
                   help="retries of a failed trial (lost worker, error), each from its last checkpoint")
    r.add_argument("--checkpoint-every", type=float, default=30.0, metavar="SECONDS",
                   help="at least this long between two checkpoints of a trial, and always its last epoch "
                   "(default %(default)g; 0: every epoch). A retried or resumed trial goes on from its last one")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlruns SQLite)")
    r.add_argument("--experiment", default="embsize", help="MLflow experiment name")
    s.set_defaults(func=cmd_search, rule_budget=True)

    t = sub.add_parser("train", help="train one config and print validation/test AUC and bytes")
    _data_args(t)
    g = t.add_argument_group("model and training")
    g.add_argument("--config", help="a recommended.yaml from `embsize search` (dims and hyperparameters)")
    g.add_argument("--dims", help="per-feature dims, e.g. user_id=16,item_id=16")
    g.add_argument("--default-dim", type=int, default=16, help="dim of features not in --dims")
    g.add_argument("--hidden", default="64,32", help="MLP widths")
    g.add_argument("--dropout", type=float, default=0.0, help="MLP dropout")
    g.add_argument("--epochs", type=int, default=10, help="most epochs to train")
    g.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (0 = off)")
    g.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    g.add_argument("--batch-size", type=int, default=1024, help="training batch size")
    g.add_argument("--threads", type=int, help="torch threads")
    g.add_argument("--sparse", action="store_true", help="sparse embedding gradients (large tables)")
    g = t.add_argument_group("production (with --config)")
    g.add_argument("--register", metavar="NAME", help="register the trained model in the MLflow Model Registry as NAME")
    g.add_argument("--export", metavar="DIR", help="also write a plain export (weights, vocabularies, config) to DIR")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else the search's store)")
    g.add_argument("--experiment", help="MLflow experiment (default: the search's)")
    t.set_defaults(func=cmd_train)

    from .cli_review import add_review_commands  # `report` and `confirm`

    add_review_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse names the top-level help; the misspelt flag belongs to the subcommand's
            where = f"embsize {args.command}" if getattr(args, "command", None) else "embsize"
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see `{where} --help`)")
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        from .runner import terminate_as_interrupt

        terminate_as_interrupt()
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, PermissionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"embsize: error: {msg}", file=sys.stderr)
        return 2
    except SearchFailed as e:
        print(f"embsize: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"embsize: {e}" if str(e) else "embsize: interrupted", file=sys.stderr)
        # not imported here: a Ctrl-C in the first seconds lands inside `import torch`, and importing a half-imported
        # torch again fails (or crashes the interpreter); a search that never imported the runner was not terminated
        runner = sys.modules.get(f"{__package__}.runner")
        return 143 if runner is not None and runner.terminated() else 130  # 128 + the signal, as a shell reports it


def entry() -> None:
    """The `embsize` command: ``main``, then an exit a Ctrl-C does not break into."""
    sys.stdout, sys.stderr = _OutlivesReader(sys.stdout), _OutlivesReader(sys.stderr)
    code = main()
    # The command's work is done when main returns: its files are written and its MLflow runs closed. What remains is
    # Ray's atexit shutdown of the local Ray it started (~1.3 s), where a Ctrl-C printed "Exception ignored in atexit
    # callback" with a traceback, or ended a finished search with status 130. SIGTERM ends the process at once again
    # (Ray's processes share its fate), so a shutdown that hangs can still be stopped with `kill`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_now(code)


class _OutlivesReader:
    """A standard stream whose reader may leave first (`embsize search | head`, a pager quit early): once a write
    finds the pipe closed, the stream goes to /dev/null and the command carries on, its files and MLflow runs
    written, instead of a search ending in a BrokenPipeError traceback at its next progress line. (Python's own
    advice, catching the error around ``main``, would end the search there.)"""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._past_a_closed_pipe(self._stream.write, text)

    def flush(self) -> None:
        self._past_a_closed_pipe(self._stream.flush)

    def _past_a_closed_pipe(self, op, *args):
        try:
            return op(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # the buffered text, written again, goes there too
            os.close(devnull)
            return op(*args)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def exit_now(code: int) -> None:
    """Exit as Python would, less its teardown of every module: wait for the threads that are not daemons, run the
    atexit handlers (Ray's shutdown of the local Ray it started, MLflow's, logging's flush, temporary folders'
    cleanup), flush the output, then ``os._exit``. The teardown that is skipped writes nothing, but freeing torch,
    MLflow's SQLAlchemy and Ray's core worker took 1.2-1.5 s after a search's last line on a 2-core machine."""
    import atexit
    import threading

    # CPython's own first step at exit (no public name): threading's exit hooks, which tell idle executor workers to
    # stop (MLflow's artifact repositories keep a ThreadPoolExecutor), then a join of the threads that are not daemons.
    # Joining those threads without the hooks first waited forever on such a worker (`embsize confirm` never exited).
    threading._shutdown()
    atexit._run_exitfuncs()  # CPython's own call at exit (no public name); handlers that raise are reported, as at exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`embsize report | head`) or stream: nothing left to say there
            pass
    os._exit(code)


if __name__ == "__main__":
    # `python -m search.cli` runs this file as __main__, a second copy beside the search.cli that the other modules
    # import: main() here would not catch their search.cli.UsageError (a bad value gave a traceback, exit 1)
    from search.cli import entry as _entry

    _entry()
