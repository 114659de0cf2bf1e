"""Confirm a search's recommendation with several training seeds, so it does not rest on the luck of one.

A search trains every config once, with one seed, and picks from those single numbers; on a small validation set the
seed alone moves the AUC by about as much as the differences the rule decides on. ``confirm`` retrains the
candidates, i.e. the Pareto front, the recommendation and the heuristic baselines, with ``k`` fresh seeds (the
search's seed + 1 ... + k: the single-seed winner was selected on the search's seed, so reusing it would bias its
mean upward) on the same data, and decides again.

The decision (``decide``), for candidate c with AUCs x_c1..x_ck: mean m_c, standard deviation s_c (ddof 1),
standard error se_c = s_c / sqrt(k).

- **Re-pick.** The search's own rule (epsilon, knee or budget, with its epsilon/budget) applied to (m_c, bytes_c)
  over all candidates: the confirmed recommendation P.
- **Seed luck.** The single-seed recommendation R is flagged when some candidate C beats it on mean by more than the
  noise of the difference plus the allowance the rule gives a larger model:

      m_C - m_R > margin(C) + sqrt(se_C^2 + se_R^2)

  with margin(C) = 0 when C is no larger than R; for a larger C, epsilon under the epsilon rule (R only had to be
  within epsilon of the best), 0 under the budget rule (C must fit the budget; the rule takes the best AUC within
  it), and infinite under the knee rule (a larger, better model is what the knee trades away). A flagged R is never
  the re-pick. Verdicts: "confirmed" (P = R), "seed luck" (R flagged), "changed within noise" (P != R, not flagged:
  the means prefer P but R is not contradicted beyond noise; the confirmed recipe takes P).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import EncodedDataset
from pipelines.model import ModelConfig

from .heuristics import HEURISTICS
from .parsing import DATA_OPTIONS, load_kwargs
from .recommend import recommend

log = logging.getLogger(__name__)

CONFIRM_ARTIFACTS = "confirm"  # folder of the parent run's artifacts that holds the confirmation
# Starting a local Ray and its workers (torch import, dataset transfer) before the first retrain runs, measured on the
# 2-CPU machine: 6.7 s + 5.3 s idle, 17 s + 11 s under load. Then 2 one-thread retrains at once run 1.74x faster than
# in sequence (12 retrains of 20 epochs on 100k rows: 53.1 s -> 30.5 s with the start; 2 torch threads in one process:
# 100.5 s, these models are too small for intra-op threads). Parallel pays off once the work exceeds ~2x the start.
RAY_OVERHEAD_S = 20.0


@dataclass(frozen=True)
class Candidate:
    """One config to retrain, with what the search measured for it."""

    trial_id: str
    label: str  # "search" or the heuristic's name
    model: ModelConfig
    lr: float
    model_bytes: int
    single_auc: float  # the search's one-seed best val AUC
    run_id: str = ""  # its MLflow trial run
    on_front: bool = False
    heuristic: str = ""
    train_seconds: float = math.nan  # the search's training time for it (epochs x seconds per epoch)
    run_name: str = ""  # its MLflow trial run's name (trial-007), as the UI lists it


@dataclass(frozen=True)
class ConfirmSettings:
    seeds: int = 3  # k training seeds per candidate
    first_seed: int = 1  # seeds are first_seed ... first_seed + k - 1 (the CLI uses the search's seed + 1)
    max_epochs: int = 12  # as the search trained
    patience: int = 3
    batch_size: int = 1024
    sparse: bool = False  # as the search trained: lazy Adam learns differently, and dense is slow on large tables
    workers: int = 1  # parallel retrains: 1 = in this process; more = Ray tasks of one CPU each
    rule: str = "epsilon"  # the search's recommendation rule
    epsilon: float = 0.002
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise ValueError(f"seeds is {self.seeds}, but must be >= 2: one seed has no spread to judge luck by")
        if self.workers < 1:
            raise ValueError(f"workers is {self.workers}, but must be >= 1")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


@dataclass
class Confirmation:
    table: pd.DataFrame  # one row per candidate: label, bytes, single-seed AUC, mean, sd, se, per-seed AUCs, flags
    recommended: str  # the search's (single-seed) recommendation
    confirmed: str  # the re-pick on mean AUC
    seed_luck: bool  # the recommendation wins only by seed luck
    challengers: list[str]  # candidates that beat the recommendation beyond noise (the reason for the flag)
    verdict: str  # "confirmed" | "seed luck" | "changed within noise"
    seeds: list[int]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def row(self, trial_id: str) -> pd.Series:
        return self.table.set_index("trial_id").loc[trial_id]


def candidates(result) -> list[Candidate]:
    """The front, the recommendation and the completed heuristic baselines of a reviewed search, once each."""
    from .review import trial_setup

    picked = result.recommended["trial_id"]
    chosen = [r for r in result.trials if r["outcome"] == "completed" and
              (r.get("on_front") or r["heuristic"] or r["trial_id"] == picked)]
    out = []
    for r in chosen:
        model, overrides = trial_setup(result, r)
        out.append(Candidate(
            r["trial_id"], HEURISTICS.get(r["heuristic"], r["heuristic"]) if r["heuristic"] else "search", model,
            overrides["lr"], int(r["model_bytes"]), float(r["best_val_auc"]), r["run_id"], bool(r.get("on_front")),
            r["heuristic"], _train_seconds(r), r.get("run_name", ""),
        ))
    return out


def _train_seconds(record: dict) -> float:
    """The search's training time of a trial: Ray's, else (a run from before embsize logged it) its epochs times
    its last epoch's seconds."""
    seconds = float(record.get("train_seconds", math.nan))
    return seconds if math.isfinite(seconds) else record["epochs"] * record.get("epoch_seconds", math.nan)


def decide(cands: list[Candidate], aucs: dict[str, list[float]], recommended: str, rule: str = "epsilon",
           epsilon: float = 0.002, budget: int | None = None) -> Confirmation:
    """The re-pick and the seed-luck flag from per-seed AUCs (``aucs``: trial id -> one AUC per seed); see the
    module docstring for the rule."""
    ids = [c.trial_id for c in cands]
    if recommended not in ids:
        raise ValueError(f"recommended trial '{recommended}' is not among the candidates; include it")
    missing = [i for i in ids if len(aucs.get(i, ())) < 2]
    if missing:
        raise ValueError(f"candidate '{missing[0]}' has fewer than 2 seed results; give every candidate k >= 2 AUCs")
    x = {i: np.asarray(aucs[i], dtype=float) for i in ids}
    mean = np.array([x[i].mean() for i in ids])
    sd = np.array([x[i].std(ddof=1) for i in ids])
    se = sd / np.sqrt([len(x[i]) for i in ids])
    size = np.array([c.model_bytes for c in cands], dtype=float)
    pick = ids[recommend(mean, size, rule=rule, epsilon=epsilon, budget=budget)]
    r = ids.index(recommended)
    challengers = []
    for j, c in enumerate(cands):
        if j == r or (rule == "budget" and budget is not None and size[j] > budget):
            continue
        if size[j] <= size[r]:
            margin = 0.0
        else:
            margin = {"epsilon": epsilon, "budget": 0.0}.get(rule, math.inf)
        if mean[j] - mean[r] > margin + math.hypot(se[j], se[r]):
            challengers.append(c.trial_id)
    lucky = bool(challengers)
    verdict = "seed luck" if lucky else ("confirmed" if pick == recommended else "changed within noise")
    k = max(len(v) for v in x.values())
    table = pd.DataFrame({
        "trial_id": ids,
        "run": [c.run_name or c.trial_id for c in cands],
        "label": [c.label for c in cands],
        "on_front": [c.on_front for c in cands],
        "recommended": [i == recommended for i in ids],
        "confirmed": [i == pick for i in ids],
        "challenger": [i in challengers for i in ids],
        "model_bytes": [c.model_bytes for c in cands],
        "single_seed_auc": [round(c.single_auc, 5) for c in cands],
        "mean_auc": np.round(mean, 5),
        "sd_auc": np.round(sd, 5),
        "se_auc": np.round(se, 5),
        **{f"auc_seed{s}": [round(float(x[i][s]), 5) if s < len(x[i]) else math.nan for i in ids] for s in range(k)},
        **{f"dim.{f}": [c.model.dims[f] for c in cands] for f in cands[0].model.dims},
    }).sort_values("model_bytes", kind="stable").reset_index(drop=True)
    return Confirmation(table, recommended, pick, lucky, challengers, verdict, [])


def retrain(cands: list[Candidate], data: EncodedDataset, settings: ConfirmSettings) -> dict[str, list[dict]]:
    """Train every candidate with every seed; trial id -> one {seed, auc, best_epoch, epochs} per seed."""
    jobs = [(c, s) for c in cands for s in settings.seed_list]
    if settings.workers <= 1:
        results = [_train_one(c.model, c.lr, s, data, settings) for c, s in jobs]
    else:
        results = _ray_map(jobs, data, settings)
    out: dict[str, list[dict]] = {c.trial_id: [] for c in cands}
    for (c, s), res in zip(jobs, results):
        out[c.trial_id].append({"seed": s, **res})
    return out


def confirm(result, data: EncodedDataset, settings: ConfirmSettings) -> Confirmation:
    """Retrain the reviewed search's candidates with ``settings.seeds`` seeds and decide again."""
    started = time.perf_counter()
    cands = candidates(result)
    runs = retrain(cands, data, settings)
    conf = decide(cands, {i: [r["auc"] for r in rs] for i, rs in runs.items()}, result.recommended["trial_id"],
                  settings.rule, settings.epsilon, settings.budget)
    conf.seeds = settings.seed_list
    conf.seconds = time.perf_counter() - started
    best_epochs = [r["best_epoch"] for r in runs[conf.confirmed]]
    conf.extra = {"candidates": {c.trial_id: c for c in cands}, "runs": runs,
                  "best_epoch": int(np.median(best_epochs)), "settings": settings}
    return conf


def rebuild_data(result, source: str | None = None, **load_options) -> EncodedDataset:
    """The search's dataset, rebuilt from the parent run's ``dataset.*`` params (or ``source`` and loader options
    such as ``label``/``features`` for a table), checked against the search's fingerprint."""
    from pipelines import prepare
    from pipelines.load import load, missing_path

    p = result.extra["params"]
    seed, split = int(p.get("dataset.seed", 0)), p.get("dataset.split", "random")
    min_freq = int(p.get("dataset.min_freq", 1))
    src = source or p.get("dataset.source")
    if not src:
        raise ValueError("the search's run records no dataset.source; give the data with --data")
    if source is None and missing_path(src):
        raise ValueError(f"the search's data '{src}' does not exist (moved, or the search ran on another machine); "
                         "pass where that data is now with --data")
    if src == "synthetic" and "dataset.rows" in p:
        load_options.setdefault("synthetic_rows", int(p["dataset.rows"]))
    if src != "synthetic":  # how the search read its table / MovieLens (searches since 2026-12-02 record it)
        recorded = load_kwargs({k: p[f"dataset.{k}"] for k in DATA_OPTIONS if f"dataset.{k}" in p})
        named = "features" in load_options or "multi" in load_options  # columns named now replace both
        for option, value in recorded.items():
            if value is not None and not (named and option in ("features", "multi")):
                load_options.setdefault(option, value)
    data = prepare(load(src, seed=seed, **load_options), split=split, seed=seed, min_freq=min_freq)
    expected = p.get("dataset.fingerprint")
    if expected and data.fingerprint != expected:
        raise ValueError(f"the rebuilt data '{src}' has fingerprint {data.fingerprint}, but the search trained on "
                         f"{expected}; give the search's data and options with --data (and --label/--features)")
    return data


def write_confirmation(result, conf: Confirmation, data: EncodedDataset, out: Path) -> dict[str, Path]:
    """confirm.csv (the table) and confirmed.yaml (the recipe of the re-pick, mean AUC as expected) in ``out``."""
    from pipelines.recipe import write_atomic

    cand: Candidate = conf.extra["candidates"][conf.confirmed]
    row = conf.row(conf.confirmed)
    recipe = retrained_recipe(
        result, conf.extra["settings"], data, cand, cand.model,
        expected={"val_auc": float(row["mean_auc"]), "val_auc_sd": float(row["sd_auc"]), "seeds": conf.seeds,
                  "model_bytes": cand.model_bytes, "best_epoch": conf.extra["best_epoch"],
                  "single_seed_val_auc": cand.single_auc},
        provenance={"trial_id": cand.trial_id, "confirmed": conf.verdict,
                    "search_recommendation": conf.recommended, "rule": _rule_text(conf.extra["settings"])},
    )
    out = Path(out)
    return {
        "confirm.csv": write_atomic(out / "confirm.csv", conf.table.to_csv(index=False)),
        "confirmed.yaml": recipe.save(out / "confirmed.yaml"),
    }


def retrained_recipe(result, s: ConfirmSettings, data: EncodedDataset, cand: Candidate, model: ModelConfig,
                     expected: dict, provenance: dict):
    """The Recipe of ``model`` trained as ``cand`` was (its lr; ``s``'s budget; the search's seed), with the search's
    dataset options and MLflow location; ``provenance`` adds to the search's name and MLflow ids."""
    from pipelines import TrainConfig
    from pipelines.recipe import Recipe

    searched = result.extra.get("recipe")  # the search's recipe: the dataset options and MLflow location, typed
    dataset = dict(searched.dataset) if searched is not None else {
        k[len("dataset."):]: v for k, v in result.extra["params"].items() if k.startswith("dataset.") and k.count(".") == 1}
    mlflow_info = dict((searched.provenance.get("mlflow") or {}) if searched is not None else {})
    mlflow_info.update(experiment_id=result.extra["experiment_id"], parent_run_id=result.parent_run_id,
                       trial_run_id=cand.run_id)
    return Recipe(
        data.features, model,
        TrainConfig(lr=cand.lr, batch_size=s.batch_size, max_epochs=s.max_epochs, patience=s.patience,
                    sparse=s.sparse, seed=int(result.extra["settings"]["seed"])),
        dataset={**dataset, "name": data.name, "fingerprint": data.fingerprint},
        expected=expected,
        provenance={"search": result.name, **provenance, "mlflow": mlflow_info},
    )


def log_to_parent(result, metrics: dict, tags: dict, files: dict[str, Path]) -> None:
    """Metrics, tags and the files (under ``confirm/``) on the search's parent run."""
    from mlflow.entities import Metric, RunTag

    from . import tracking

    c = tracking.client(result.extra["tracking_uri"])
    now = int(time.time() * 1000)
    c.log_batch(result.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                tags=[RunTag(k, v) for k, v in tags.items()])
    for path in files.values():
        c.log_artifact(result.parent_run_id, str(path), CONFIRM_ARTIFACTS)


def log_confirmation(result, conf: Confirmation, files: dict[str, Path]) -> None:
    """Metrics and tags of the confirmation on the parent run, its files under ``confirm/``."""
    row, rec = conf.row(conf.confirmed), conf.row(conf.recommended)
    metrics = {
        "confirm_seeds": len(conf.seeds),
        "confirmed_val_auc_mean": row["mean_auc"],
        "confirmed_val_auc_sd": row["sd_auc"],
        "confirmed_model_bytes": row["model_bytes"],
        "recommended_val_auc_mean": rec["mean_auc"],
        "recommended_val_auc_sd": rec["sd_auc"],
        "confirm_seed_luck": float(conf.seed_luck),
        "confirm_seconds": conf.seconds,
    }
    tags = {"confirmed_trial": conf.confirmed, "confirm_verdict": conf.verdict,
            "confirm_challengers": ",".join(conf.challengers) or "none"}
    log_to_parent(result, metrics, tags, files)


def plan_workers(cands: list[Candidate], seeds: int, cpus: int | None = None, extra: int = 0) -> tuple[int, float]:
    """(retrains at once, estimated sequential seconds): one per CPU as Ray tasks when the retrains, estimated from
    the search's own training times, take long enough to repay starting Ray (``RAY_OVERHEAD_S``); else 1. ``extra``:
    configs trained after the candidates with the same seeds (``--refine``'s expected proposals)."""
    cpus = cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    known = [c.train_seconds for c in cands if math.isfinite(c.train_seconds)]
    per_job = float(np.mean(known)) if known else math.inf  # unknown: assume long
    estimate = per_job * (len(cands) + extra) * seeds
    workers = min(cpus, (len(cands) + extra) * seeds)
    # parallel: overhead + estimate / workers; worth it when that beats the estimate
    if workers > 1 and estimate > RAY_OVERHEAD_S * workers / (workers - 1):
        return workers, estimate
    return 1, estimate


def _rule_text(s: ConfirmSettings) -> str:
    return f"epsilon={s.epsilon}" if s.rule == "epsilon" else (f"budget={s.budget}" if s.rule == "budget" else s.rule)


def _train_one(model: ModelConfig, lr: float, seed: int, data: EncodedDataset, s: ConfirmSettings) -> dict:
    from pipelines import TrainConfig, train

    cfg = TrainConfig(lr=lr, batch_size=s.batch_size, max_epochs=s.max_epochs, patience=s.patience, seed=seed,
                      sparse=s.sparse, threads=1)
    r = train(model, cfg, data)
    return {"auc": float(r.best_val_auc), "best_epoch": int(r.best_epoch), "epochs": int(r.epochs)}


def _ray_map(jobs: list, data: EncodedDataset, s: ConfirmSettings) -> list[dict]:
    """The retrains as Ray tasks of one CPU each, on a running Ray or a local one of ``s.workers`` CPUs."""
    import ray

    from .cluster import alive_nodes, largest_memory, memory_request, training_memory, warm_workers_pay

    # each asks for the memory it takes to train, as a search's trials do (cluster.TrialResources)
    rows = data.train.nbytes + data.val.nbytes
    needs = [training_memory(c.model_bytes, rows, keep_best=True, sparse=s.sparse) for c, _ in jobs]
    with local_ray(s.workers, warm_workers_pay(max(c.model_bytes for c, _ in jobs), rows, s.sparse, keep_best=True)):
        task = ray.remote(num_cpus=1, max_retries=1)(_train_one)
        ref = ray.put(data)  # once in the object store, not once per task
        node, warned = largest_memory(alive_nodes()), set()
        return ray.get([task.options(memory=memory_request(need, node, warned)).remote(c.model, c.lr, seed, ref, s)
                        for (c, seed), need in zip(jobs, needs)])


@contextlib.contextmanager
def local_ray(workers: int, warm: bool = False):
    """Start (and at the end stop) a local Ray of ``workers`` CPUs, unless one is running: then use it. ``warm``: its
    prestarted workers import the trainer as they start (``cluster.start_local_ray``)."""
    import ray

    from .cluster import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(warm, num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING,
                        log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
