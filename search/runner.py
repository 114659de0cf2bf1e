"""Run one search: MLflow parent run -> Ray Tune (Optuna sampling, ASHA stopping) -> front -> recommendation.

The outputs of a search named NAME go to OUT/NAME/: recommended.yaml, front.csv, trials.csv, pareto.png,
summary.json, the Optuna study journal (optuna.journal), Ray Tune's experiment folder (ray/) and search.json, which
lets the same command (or ``embsize search --resume NAME``) continue an interrupted search (search/resume.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


from pipelines import EncodedDataset
from pipelines.recipe import Recipe, write_atomic

from .heuristics import heuristic_dims
from .recommend import conclude
from .space import SearchSpace
from .trial import TrialSettings, run_trial, train_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSettings:
    name: str  # experiment name: output folder, Ray experiment, Optuna study, MLflow parent run name
    trials: int = 24  # sampled trials (heuristic baselines run in addition)
    max_epochs: int = 12  # full training budget of a trial
    patience: int = 3  # early-stopping patience (epochs without better val AUC)
    batch_size: int = 1024
    lr: float = 3e-3  # when lr is not searched
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int | None = None  # None: as many as the cluster's CPUs allow
    scheduler: str = "pareto-asha"  # pareto-asha | asha | fifo
    grace_period: int = 2  # epochs before the scheduler may stop a trial
    reduction_factor: float = 3  # ASHA's eta: keep the top 1/eta at each rung
    memory_budget: int | None = None  # hard cap on model bytes: configs above are never trained
    rule: str = "epsilon"  # epsilon | knee | budget
    epsilon: float = 0.002  # epsilon rule: smallest model within epsilon AUC of the best
    heuristics: bool = True  # evaluate the rule-of-thumb baselines in the same search
    seed: int = 0
    tracking_uri: str = ""  # resolved MLflow URI
    experiment: str = "embsize"  # MLflow experiment
    output_dir: str = "embsize-out"
    address: str | None = None  # Ray cluster address; None starts a local Ray
    num_cpus: int | None = None  # CPUs of a local Ray (None: all)
    max_failures: int = 1  # retries of a failed trial (lost worker or error), each from its last checkpoint
    checkpoint_seconds: float = 30.0  # at least this long between two checkpoints of a trial (0: every epoch)
    sparse: bool = False
    storage_path: str | None = None  # Ray Tune storage: a folder every node sees or an s3:// URI; None: OUT/NAME/ray

    @property
    def out(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    @property
    def storage(self) -> str:
        """Ray Tune's storage_path (absolute folder or URI); the experiment goes to STORAGE/NAME."""
        from .cluster import storage_path

        return storage_path(self.storage_path, self.out / "ray")


@dataclass
class SearchResult:
    name: str
    out: Path
    trials: list[dict]  # one record per trial
    front: list[dict]  # completed, non-dominated trials by (best_val_auc, model_bytes)
    recommended: dict
    recipe_path: Path
    hypervolume: float
    reference: tuple[float, float]
    parent_run_id: str
    study_name: str
    seconds: float
    extra: dict = field(default_factory=dict)


def heuristic_configs(data: EncodedDataset, space: SearchSpace, budget: int | None) -> dict[str, dict]:
    """Each rule's config (label -> config), the rules over budget left out.

    A dim the space pins (the spec's ``pin``, or a range with one dim) holds in the baselines too: the rules set the
    other features' dims. Otherwise a pinned search could recommend a baseline with another dim for that feature.
    """
    counts = {f.name: data.counts(f.name) for f in data.features}
    configs = {}
    for rule, dims in heuristic_dims(data.features, counts).items():
        config = space.encode({**dims, **space.pins})
        if budget is not None and space.bytes(config) > budget:
            log.info("heuristic %s needs %d bytes, over the memory budget: not trained", rule, space.bytes(config))
            continue
        configs[rule] = config
    return configs


def reference_point(space: SearchSpace, heuristics: dict[str, dict]) -> tuple[float, float]:
    """Fixed per space: chance AUC, and twice the largest model the search could train."""
    largest = max([space.max_bytes(), *(space.bytes(c) for c in heuristics.values())])
    return 0.5, 2.0 * largest


def run_search(
    data: EncodedDataset,
    space: SearchSpace,
    settings: SearchSettings,
    dataset_info: dict | None = None,
    on_event: Callable | None = None,
    baselines: dict[str, dict] | None = None,
    command: dict | None = None,
    fresh: bool = False,
) -> SearchResult:
    """Run the search, or continue it when OUT/NAME holds an interrupted (or finished) one with the same settings.

    ``baselines`` (label -> config) replaces the heuristic baselines when given; ``command`` (the CLI's options) is
    kept in search.json for ``embsize search --resume NAME``. ``fresh``: never continue a search; ``resume.NameTaken``
    if OUT/NAME holds one (the CLI's dated default names, which a search started in the same second may take).
    Before anything is written or launched, the tracking store and the Ray address must answer (search/preflight.py);
    a ``ValueError`` names what is wrong; ``resume.SearchRunning`` if another process runs this search now.
    ``on_event(kind, trial, result)``: "begin" (trial and result None) once those checks have passed, then each
    trial's "start", per-epoch "result", "retried", and how it ended ("completed", "stopped_early", "failed").
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from . import checkpoints, preflight, resume, tracking
    from .cluster import (TrialResources, alive_nodes, experiment_path, is_uri, largest_memory,
                          trial_actors_in_prestarted_workers)
    from .schedulers import decision_epochs, make_scheduler
    from .searcher import DimSearch

    started = time.perf_counter()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 below: Ray prints nothing, the CLI reports
    # Tune's default result loggers write CSV, JSON and TensorBoard files for every epoch; the CSV and TensorBoard ones
    # duplicate what MLflow records and cost driver CPU that the trials share. Only the JSON one is kept (below):
    # Tune's ResultGrid reads it. (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0 has all three again.)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    resume.check_name(settings.name)
    out = settings.out
    uri = settings.tracking_uri or tracking.resolve_tracking_uri(None)
    preflight.check(uri, settings.address)
    folders = {"output directory": (out, "--output-dir")}
    if not is_uri(settings.storage):
        folders["Ray Tune storage"] = (Path(settings.storage), "--storage-path")
    if uri.startswith("sqlite:///"):
        folders["MLflow store"] = (Path(uri[len("sqlite:///"):]).parent, "--tracking-uri")
    # configs over --memory-budget are never trained, so never checkpointed
    preflight.check_free_space(folders, min(space.max_bytes(), settings.memory_budget or space.max_bytes()))
    identity = resume.identity(settings, data, space, uri)
    previous = resume.load(out)
    if previous is not None and fresh:
        raise resume.NameTaken(f"search name '{settings.name}' is taken in '{out.parent}'")
    if previous is not None:
        resume.check_same(previous, identity, settings.name)
    # Ray Tune's experiment: a folder, or a URI string on remote storage (a Path would mangle s3://)
    storage = settings.storage
    experiment = experiment_path(storage, settings.name)
    # A Ray that runs already (a cluster, or one the caller started) is checked before anything is written, as
    # preflight's checks are: a refused search leaves no output folder and no FAILED run. A local Ray is started
    # below, while MLflow opens; it is one node, and the CLI has checked that a trial fits it.
    connected = settings.address is not None or ray.is_initialized()
    if connected:
        _connect(settings, uri)
    out.mkdir(parents=True, exist_ok=True)
    # Held until the search ends: a second driver of the same search (a resume while it runs, or the same --name
    # twice) would interleave its trials in this Ray experiment, Optuna study and MLflow run.
    with resume.claimed(out, settings.name):
        if fresh and resume.load(out) is not None:  # written between the check above and the claim
            raise resume.NameTaken(f"search name '{settings.name}' is taken in '{out.parent}'")
        if on_event is not None:  # the checks have passed and the search is this driver's: it begins
            on_event("begin", None, None)
        restoring = False
        if previous is None:
            resume.save(out, identity, command)
        else:
            for line in resume.repair(out, experiment):  # a write cut short by a full disk or a kill
                log.warning("repaired before resuming: %s", line)
            # Tuner.can_restore sees only tuner.pkl, which Ray writes before its first experiment state: a driver
            # killed in between left an experiment that restores with one sample and never reaches the trial count; it
            # starts afresh (the Optuna study and the MLflow run are continued either way)
            restoring = tune.Tuner.can_restore(str(experiment)) and (
                is_uri(storage) or any(Path(experiment).glob("experiment_state-*.json")))
            log.info("continuing search '%s' in %s (%s)", settings.name, out,
                     "Ray experiment restored" if restoring else "no Ray experiment state yet: trials start afresh")
        info = dataset_info or {}
        # MLflow's first use (import, schema migrations of a new SQLite store) takes seconds: open the parent run on a
        # thread while Ray starts and launches the first trials; the trial-run writer waits for it.
        pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-open")
        opened = pool.submit(_open_parent, uri, settings, data, info, previous is not None)
        pool.shutdown(wait=False)
        runs = None
        try:
            if not connected:
                _connect(settings, uri, warm=_warm_workers(space, settings, data.train.nbytes + data.val.nbytes))
            if baselines is not None:
                heuristics = dict(baselines)
            else:
                heuristics = heuristic_configs(data, space, settings.memory_budget) if settings.heuristics else {}
            scheduler = make_scheduler(settings.scheduler, settings.max_epochs, settings.grace_period,
                                       settings.reduction_factor, reference_point(space, heuristics))
            trial_settings = TrialSettings(
                settings.max_epochs, settings.patience, settings.batch_size, settings.lr, settings.seed,
                settings.cpus_per_trial, settings.sparse, decision_epochs(scheduler, settings.max_epochs),
                settings.checkpoint_seconds,
            )
            trainable = tune.with_parameters(run_trial, data=data.for_training(), space=space, settings=trial_settings)
            # each trial asks for its CPUs and the memory its config takes to train (cluster.TrialResources)
            resources = TrialResources(space, settings.cpus_per_trial, settings.gpus_per_trial,
                                       data.train.nbytes + data.val.nbytes, largest_memory(alive_nodes()),
                                       settings.sparse)
            trainable = tune.with_resources(trainable, resources)
            cpus = ray.cluster_resources().get("CPU", 1)
            concurrent = settings.max_concurrent or max(1, int(cpus // settings.cpus_per_trial))
            failures = tune.FailureConfig(max_failures=settings.max_failures)
            if restoring:
                tuner, runs = _restore(experiment, trainable, uri, opened, on_event, failures)
            else:
                storage = optuna.storages.JournalStorage(
                    optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))
                searcher = DimSearch(space, heuristics, settings.memory_budget, settings.seed, storage, settings.name,
                                     trials=settings.trials)
                searcher.fail_untracked()  # a study an interrupted start left behind: its running trials are orphans
                # a new search's parent run is new, so it holds no trial runs: they are named as they start
                runs = tracking.TrialRuns(uri, opened, on_event, numbered=0 if previous is None else None)
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        search_alg=searcher,
                        scheduler=scheduler,
                        num_samples=settings.trials + len(heuristics),
                        max_concurrent_trials=concurrent,
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=settings.name,
                        storage_path=settings.storage,
                        # the pruner deletes the checkpoints no saved experiment state needs any more (in a folder
                        # or a bucket; checkpoints.py says why Ray's num_to_keep does not do), and prune_all the rest
                        # once the search has finished
                        callbacks=[runs, JsonLoggerCallback(), checkpoints.Pruner(experiment)],
                        verbose=0,
                        failure_config=failures,
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                    ),
                )
            if previous is not None:  # its parent run holds trial runs already: names go on after theirs
                runs.name_from_store()
            sigint = _sigint_handler()
            try:
                with trial_actors_in_prestarted_workers(ray_started_here=not connected):
                    grid = tuner.fit()
            finally:
                runs.close()
                if sigint is not None:  # Tune leaves its Ctrl-C handler set after fit: a Ctrl-C (or SIGTERM) while
                    signal.signal(signal.SIGINT, sigint)  # the front is concluded would set a dead flag, and be lost
            c, exp_id, parent_id = opened.result()
            # Ray stops early on Ctrl-C / SIGUSR1. A resumed search may hold trials Ray never saved (counted below,
            # from MLflow); a new one's trials are all Ray's, so it says so before asking the store
            if runs.unfinished or (previous is None and len(grid) < settings.trials + len(heuristics)):
                raise SearchInterrupted.of(settings)
            # The trials are done: the result files are written whether or not MLflow answers now. A tracking server
            # that is down at the end fails the search only after them (TrackingUnavailable), and a resume records
            # the result once it is back; no MLflow write is tried again meanwhile (each waits out MLflow's retries).
            children, run_ids, names, down = [], {}, {}, None
            if runs.skip():  # the writer found the server down, and it still is: no wait for MLflow's retries
                down = runs.down
            else:
                try:
                    children = tracking.child_runs(c, exp_id, parent_id)
                    run_ids = {r.data.tags.get("trial_id"): r.info.run_id for r in children}
                    names = {r.data.tags.get("trial_id"): r.info.run_name for r in children}
                except Exception as e:  # noqa: BLE001 - any store error: the ids the writer thread saw are enough
                    down = e
            # the names of the runs the writer wrote, too: with the server down at the end they name the pick
            written = {t: runs.names[t] for t in runs.runs if t in runs.names}
            records = _records(grid, space, {**run_ids, **runs.runs}, {**written, **names})
            records += _unsaved_records(children, {r["trial_id"] for r in records}, space, data)
            # with the trials that ended after Ray's last save (the study counted them: Ray did not sample more)
            if len(records) < settings.trials + len(heuristics):
                raise SearchInterrupted.of(settings)
            ref = reference_point(space, heuristics)
            result = _conclude(records, settings, space, data, ref, parent_id, uri, exp_id, info)
            result.seconds = time.perf_counter() - started
            if down is None:
                try:
                    # the whole search's figures, over every leg (a resumed search runs in several drivers)
                    result.extra.update(_end_leg(c, parent_id, result.seconds, runs.errors))
                    result.seconds = result.extra["wall_seconds"]
                    # trials a killed driver had started and Ray never saved: their runs stay, KILLED, beside the
                    # trials.csv
                    result.extra["trials_interrupted"] = len(set(run_ids) - {r["trial_id"] for r in records})
                    _log_parent(c, parent_id, result, resumed=previous is not None)
                    tracking.close_interrupted(c, exp_id, parent_id)  # a safety net for a run nobody closed
                    c.set_terminated(parent_id, "FINISHED")
                except Exception as e:  # noqa: BLE001 - as above
                    down = e
            if down is not None:  # the checkpoints stay: the resume restores the Ray experiment to conclude it
                raise TrackingUnavailable(result, _redact(uri), down, settings)
            checkpoints.prune_all(experiment)
            return result
        except BaseException as e:
            if isinstance(e, TrackingUnavailable):
                raise
            interrupted = isinstance(e, KeyboardInterrupt)
            _close_parent(opened, runs, uri, time.perf_counter() - started, interrupted)
            if interrupted and not isinstance(e, SearchInterrupted):  # a Ctrl-C while Ray starts: search.json is
                raise SearchInterrupted.of(settings) from e  # written, so the search continues like any other
            raise


def _warm_workers(space: SearchSpace, settings: SearchSettings, data_bytes: int) -> bool:
    """Whether the local Ray's prestarted workers, one per CPU, import the trial code as they start
    (``cluster.start_local_ray``): when every CPU will hold a trial, i.e. each trial takes one CPU and no GPU, the
    concurrency is not capped, and the largest model of the space asks for the smallest memory request (1 GiB), so
    memory does not cap it either (``cluster.warm_workers_pay``). Otherwise workers left without a trial would each
    hold ~240 MB of torch."""
    from .cluster import warm_workers_pay

    if settings.cpus_per_trial != 1 or settings.gpus_per_trial or settings.max_concurrent is not None:
        return False
    return warm_workers_pay(space.max_bytes(), data_bytes, settings.sparse)


def _connect(settings: SearchSettings, uri: str, warm: bool = False) -> None:
    """Start or join Ray, then check the cluster against the search (``cluster.check_cluster``: multi-node needs a
    tracking server and shared storage, and a trial must fit a node) before any trial starts. ``warm``: a local Ray
    started here has its prestarted workers import the trial code (``_warm_workers``)."""
    import ray

    from .cluster import check_cluster, start_local_ray

    if not ray.is_initialized():
        options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                       configure_logging=True)
        if settings.address is None:
            start_local_ray(warm, num_cpus=settings.num_cpus, **options)
        else:
            ray.init(address=settings.address, **options)
    check_cluster(uri, settings.storage, settings.storage_path is not None, settings.cpus_per_trial,
                  settings.gpus_per_trial, can_grow=settings.address is not None)
    terminate_as_interrupt()


_TERMINATED: list[int] = []  # SIGTERMs this process took as a Ctrl-C (the CLI exits 143 for them, not 130)


def _on_main_thread() -> bool:
    """Signal handlers can be set from the main thread only; off it, the embedding program owns them."""
    return threading.current_thread() is threading.main_thread()


def _sigint_handler():
    """SIGINT's handler now, to set back after ``Tuner.fit``; None off the main thread (nothing to set back)."""
    return signal.getsignal(signal.SIGINT) if _on_main_thread() else None


def terminate_as_interrupt() -> None:
    """Take SIGTERM (`kill`, `docker stop`, a job manager's stop, `timeout`) as Ctrl-C: in a search, Tune saves the
    experiment state, the running trials' MLflow runs are closed, and the CLI prints the resume command; in `embsize
    train`, MLflow's run context closes the run KILLED. Set by the CLI at its start and again after ``ray.init``, whose
    core worker installs a SIGTERM handler of its own that aborts the driver with a C++ stack dump and leaves the
    parent run RUNNING. SIGINT's current handler is Tune's during ``Tuner.fit`` (a second signal skips its last save) and
    Python's KeyboardInterrupt otherwise."""
    if not _on_main_thread():
        return

    def interrupt(signum, frame):
        _TERMINATED.append(signum)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, interrupt)


def terminated() -> bool:
    """Whether a SIGTERM interrupted this process's search."""
    return bool(_TERMINATED)


class NoTrialCompleted(RuntimeError):
    """Every trial failed or was stopped early: there is nothing to recommend."""


class TrackingUnavailable(RuntimeError):
    """Every trial ended and the result files are written, but the tracking store did not take the search's end (a
    server down): the parent run is still RUNNING and lacks the front, the pick and the artifacts. ``result`` is the
    search's result as the files hold it."""

    def __init__(self, result: SearchResult, uri: str, error: BaseException, settings: SearchSettings):
        self.result = result
        line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
        super().__init__(
            f"search '{settings.name}' finished and its results are in {result.out}, but MLflow at {uri} did not "
            f"record them ({line[:300]}); once it answers, `embsize search --resume {settings.name} --output-dir "
            f"{shlex.quote(str(settings.output_dir))}` records them without training again"
        )


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before its trials were done (Ctrl-C); its state is saved for a resume."""

    @classmethod
    def of(cls, settings: SearchSettings) -> SearchInterrupted:
        return cls(f"search '{settings.name}' was interrupted; continue it with "
                   f"`embsize search --resume {settings.name} --output-dir {shlex.quote(str(settings.output_dir))}`")


def _restore(experiment: Path, trainable, uri: str, opened, on_event, failures):
    """The interrupted experiment's Tuner (finished trials kept, running ones continued from their checkpoints,
    failed ones left failed), with its MLflow callback reconnected to this process."""
    from ray import tune

    from .tracking import TrialRuns

    tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=False)
    # Tuner.restore unpickles the original RunConfig and has no public accessor for it (ray-project/ray#41364); its
    # callbacks must be given this process's MLflow store and progress printer, and --max-failures may change.
    run_config = tuner._local_tuner.get_run_config()
    runs = next(cb for cb in run_config.callbacks if isinstance(cb, TrialRuns))
    runs.rewire(uri, opened, on_event)
    run_config.failure_config = failures
    return tuner, runs


def _open_parent(
    uri: str, settings: SearchSettings, data: EncodedDataset, info: dict, reuse: bool = False
) -> tuple[object, str, str]:
    from . import tracking

    c = tracking.client(uri)
    exp_id = tracking.ensure_experiment(c, settings.experiment, uri)
    found = tracking.find_search_run(c, exp_id, settings.name) if reuse else None
    if found is not None:  # a resumed search: the same parent run, RUNNING again; its params stay as first logged
        parent_id = found.info.run_id
        c.update_run(parent_id, status="RUNNING")
        c.set_tag(parent_id, "embsize.resumed", str(int(found.data.tags.get("embsize.resumed", "0")) + 1))
        closed = tracking.close_interrupted(c, exp_id, parent_id)
        log.info("reusing MLflow run %s of search '%s'; %d interrupted trial runs closed", parent_id, settings.name,
                 closed)
        return c, exp_id, parent_id
    parent = c.create_run(exp_id, run_name=settings.name, tags={"embsize.kind": "search", "embsize.name": settings.name})
    parent_id = parent.info.run_id
    c.log_batch(
        parent_id,
        params=[
            *_params({f"search.{k}": v for k, v in asdict(settings).items() if k != "tracking_uri"}),
            *_params({"dataset.fingerprint": data.fingerprint, "dataset.name": data.name}),
            *_params({f"dataset.cardinality.{f.name}": f.cardinality for f in data.features}),
            *_params({f"dataset.{k}": v for k, v in info.items()}),
        ],
    )
    tracking.log_dataset(c, parent_id, data, str(info.get("source", data.name)), "search")
    return c, exp_id, parent_id


def _record(space: SearchSpace, config: dict, **fields) -> dict:
    """A trial's record: ``fields`` (trial_id, heuristic, outcome, best_val_auc, embedding_bytes, epochs,
    train_seconds, ended, run_id, run_name, error) and what its config gives: the model's dims and bytes, and the
    config itself."""
    model_cfg, _ = space.decode(config)
    return {**fields, "model_bytes": int(space.bytes(config)), "dims": dict(model_cfg.dims), "config": dict(config)}


def _records(grid, space: SearchSpace, run_ids: dict[str, str], names: dict[str, str]) -> list[dict]:
    from .tracking import trial_outcome

    records = []
    for r in grid:
        error = [ln for ln in str(r.error).splitlines() if ln.strip()] if r.error is not None else []
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id", "")
        records.append(_record(
            space, r.config or {},
            trial_id=trial_id,
            heuristic=(r.config or {}).get("heuristic", ""),
            outcome=trial_outcome(metrics, r.error is not None),
            best_val_auc=float(metrics.get("best_val_auc", math.nan)),
            embedding_bytes=int(metrics.get("embedding_bytes", 0)),
            epochs=int(metrics.get("epoch", 0)),
            train_seconds=float(metrics.get("time_total_s", math.nan)),  # Ray's, over retries and resumes
            ended=metrics.get("ended", ""),
            run_id=run_ids.get(trial_id, ""),
            run_name=names.get(trial_id, ""),
            error=error[-1].strip() if error else "",  # the exception line, after Ray's traceback
        ))
    return records


def _unsaved_records(children: list, known: set[str], space: SearchSpace, data: EncodedDataset) -> list[dict]:
    """Records of trial runs that ended (their outcome is tagged) in a trial Ray's saved experiment does not hold.

    Ray saves its experiment state every ~10 s: a trial that started and ended after the last save of a driver
    killed with ``kill -9`` was trained, closed in MLflow and told to the Optuna study, and the resumed Ray never
    heard of it (the study counts it: no other is sampled in its place). It is one of the search's trials, as
    ``embsize report``, which reads MLflow, counts it: without it the search's front and pick could differ from the
    report's. (Runs of trials that never ended are closed KILLED and counted as ``trials_interrupted``.)
    """
    from pipelines.memory import embedding_bytes

    from .space import config_from_params
    from .tracking import OUTCOMES

    records = []
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        # "interrupted": a trial the killed driver left running, closed KILLED at the resume's start
        if tags.get("trial_id") in known or tags.get("outcome") not in OUTCOMES or not run.data.params:
            continue
        log.info("trial %s ended after Ray's last saved state; counted from its MLflow run %s", tags["trial_id"],
                 run.info.run_name)
        record = _record(
            space, config_from_params(run.data.params),
            trial_id=tags["trial_id"],
            heuristic=tags.get("heuristic", ""),
            outcome=tags["outcome"],
            best_val_auc=float(metrics.get("best_val_auc", math.nan)),
            epochs=int(metrics.get("epochs_trained", 0)),
            train_seconds=float(metrics.get("train_seconds", math.nan)),
            ended=tags.get("ended", ""),
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            error=tags.get("error", ""),
        )
        record["embedding_bytes"] = int(sum(embedding_bytes(data.features, record["dims"]).values()))
        records.append(record)
    return records


def _conclude(records, settings, space, data, ref, parent_id, uri, exp_id, info) -> SearchResult:
    concluded = conclude(records, settings.rule, settings.epsilon, settings.memory_budget, ref)
    if concluded is None:  # the trials' table is still written: it is where their errors are read
        from .report import trials_frame

        write_atomic(settings.out / "trials.csv", trials_frame(records).to_csv(index=False))
        outcomes = [r["outcome"] for r in records]
        errors = [str(r["error"]).strip().splitlines()[-1] for r in records if r.get("error")]
        raise NoTrialCompleted(
            f"no trial of search '{settings.name}' completed ({outcomes.count('failed')} failed, "
            f"{outcomes.count('stopped_early')} stopped early"
            + (f"; first error: {errors[0][:200]}" if errors else "")
            + f"); see {settings.out / 'trials.csv'} and the trial runs in MLflow, or raise --trials"
        )
    done, front, pick, hv = concluded
    out = settings.out
    model_cfg, overrides = space.decode(pick["config"])
    ts = TrialSettings(settings.max_epochs, settings.patience, settings.batch_size, settings.lr, settings.seed)
    recipe = Recipe(
        data.features,
        model_cfg,
        train_config(ts, overrides),
        dataset={"name": data.name, "fingerprint": data.fingerprint, **info},
        expected={
            "val_auc": pick["best_val_auc"],
            "model_bytes": pick["model_bytes"],
            "embedding_bytes": pick["embedding_bytes"],
            "epochs": pick["epochs"],
        },
        provenance={
            "search": settings.name,
            "trial_id": pick["trial_id"],
            "rule": settings.rule if settings.rule != "epsilon" else f"epsilon={settings.epsilon}",
            "mlflow": {"tracking_uri": _redact(uri), "experiment_id": exp_id, "parent_run_id": parent_id,
                       "trial_run_id": pick["run_id"]},
        },
    )
    recipe_path = recipe.save(out / "recommended.yaml")
    result = SearchResult(
        settings.name, out, records, front, pick, recipe_path, hv, ref, parent_id, settings.name, 0.0
    )
    _write_tables(result)
    return result


def _write_tables(result: SearchResult) -> None:
    from .report import front_frame, plot_front, trials_frame

    out = result.out
    write_atomic(out / "trials.csv", trials_frame(result.trials).to_csv(index=False))
    write_atomic(out / "front.csv", front_frame(result).to_csv(index=False))
    plot_front(result, out / "pareto.png")
    summary = {
        "name": result.name,
        "hypervolume": result.hypervolume,
        "reference": {"auc": result.reference[0], "model_bytes": result.reference[1]},
        "recommended": {k: result.recommended[k] for k in ("trial_id", "best_val_auc", "model_bytes", "dims")},
        "front_size": len(result.front),
        "trials": len(result.trials),
        "completed": sum(r["outcome"] == "completed" for r in result.trials),
        "stopped_early": sum(r["outcome"] == "stopped_early" for r in result.trials),
        "failed": sum(r["outcome"] == "failed" for r in result.trials),
        "epochs_trained": sum(r["epochs"] for r in result.trials),
        "parent_run_id": result.parent_run_id,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))


def _log_parent(c, parent_id: str, result: SearchResult, resumed: bool) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    s = json.loads((result.out / "summary.json").read_text())
    metrics = {
        "hypervolume": result.hypervolume,
        # the fixed reference point the hypervolume is measured from, so two searches' values can be compared
        "hypervolume_reference_auc": result.reference[0],
        "hypervolume_reference_bytes": result.reference[1],
        "front_size": len(result.front),
        "recommended_val_auc": result.recommended["best_val_auc"],
        "recommended_model_bytes": result.recommended["model_bytes"],
        "trials_completed": s["completed"],
        "trials_stopped_early": s["stopped_early"],
        "trials_failed": s["failed"],
        "epochs_trained": s["epochs_trained"],
        "trials_interrupted": result.extra.get("trials_interrupted", 0),
        # totals over the search's legs (_end_leg)
        "wall_seconds": result.seconds,
        "tracking_failures": result.extra.get("tracking_failures", 0),
    }
    c.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    c.set_tag(parent_id, "recommended_trial", result.recommended["trial_id"])
    c.set_tag(parent_id, "recommended_run_id", result.recommended["run_id"])
    # the front and the pick on the trial runs themselves, so the MLflow UI's runs table filters them
    # (tags.on_front = 'true', tags.recommended = 'true'). Every trial run was closed with both 'false'
    # (tracking.TrialRuns), so only the front's runs are written here (~10 ms a run on SQLite); a resumed search may
    # have moved the front or the pick since an earlier leg wrote them, so there every run is set.
    front, pick = {r["trial_id"] for r in result.front}, result.recommended["trial_id"]
    for r in result.trials:
        if r["run_id"] and (resumed or r["trial_id"] in front):
            c.log_batch(r["run_id"], tags=[RunTag("on_front", str(r["trial_id"] in front).lower()),
                                           RunTag("recommended", str(r["trial_id"] == pick).lower())])
    for name in ("recommended.yaml", "front.csv", "trials.csv", "pareto.png", "summary.json"):
        c.log_artifact(parent_id, str(result.out / name))


def _close_parent(opened, runs, uri: str, seconds: float, interrupted: bool) -> None:
    """The end of a search that failed or was interrupted, on its parent run: this leg's time (a resume's totals count
    it), the trial runs Ray stopped closed KILLED (reopened on resume), the parent closed KILLED or FAILED.

    Best effort: the search's own error is the one the user must see, so a failed write is a warning. A remote store
    is asked first (preflight's 5 s check; it answers the trial-run writer's doubts too) instead of being written to
    while down: each write would wait out MLflow's retries (~4 minutes by default) and then replace the search's error
    with MLflow's traceback. The parent run then stays RUNNING; ``--resume`` takes it up again.
    """
    from . import tracking
    from .preflight import check_tracking

    try:
        c, exp_id, parent_id = opened.result()
        if not tracking.is_local_store(uri):
            check_tracking(uri)
        _end_leg(c, parent_id, seconds, runs.errors if runs is not None else [])
        if interrupted:
            tracking.close_interrupted(c, exp_id, parent_id)
        c.set_terminated(parent_id, "KILLED" if interrupted else "FAILED")
    except Exception as write:  # noqa: BLE001 - any store error: the search's own error follows
        log.warning("the search's MLflow run was not closed: %s", tracking.store_error(write))


def _end_leg(c, parent_id: str, seconds: float, errors: list[str]) -> dict:
    """Record one driver's run of the search (a leg) on the parent run, and return the totals over every leg.

    An interrupted search resumed later runs in several legs on one parent run. Each leg logs ``leg_wall_seconds`` and
    ``leg_tracking_failures`` (trial-run writes that failed; the search goes on without them) at step = its number
    (0 the first start, n the n-th resume: tag ``embsize.resumed``), and the last failure as tag ``tracking_error``.
    A leg killed with ``kill -9`` records nothing, so its time is missing from the totals.
    """
    from mlflow.entities import Metric

    run = c.get_run(parent_id)
    leg = int(run.data.tags.get("embsize.resumed", "0"))
    now = int(time.time() * 1000)
    c.log_batch(parent_id, metrics=[Metric("leg_wall_seconds", float(seconds), now, leg),
                                    Metric("leg_tracking_failures", float(len(errors)), now, leg)])
    if errors:
        c.set_tag(parent_id, "tracking_error", errors[-1][:5000])
    totals = {}
    for key in ("wall_seconds", "tracking_failures"):
        by_leg = {m.step: m.value for m in sorted(c.get_metric_history(parent_id, f"leg_{key}"),
                                                  key=lambda m: m.timestamp)}  # a leg's last value
        totals[key] = sum(by_leg.values())
    return {**totals, "legs": leg + 1, "leg_seconds": float(seconds),
            "tracking_error": errors[-1] if errors else run.data.tags.get("tracking_error", "")}


def _params(d: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in d.items()]


def _redact(uri: str) -> str:
    """Drop user:password@ from a URI so credentials never land in a file."""
    from .preflight import redact

    return redact(uri)
