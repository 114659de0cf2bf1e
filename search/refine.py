"""Refine a confirmed recommendation feature by feature: halve each dim while the mean AUC holds.

A search decides on whole models. Its bytes objective presses hardest on the largest tables, so a feature with few
categories keeps whatever dim the winning trial happened to sample: going from 16 to 2 on a 60-category feature saves
3.4 KB of a 100 KB model, below what separates two points on the front. The recommended config is then right in total
bytes and AUC but says little about what each feature needs, which is the question embsize answers.

``refine`` starts from ``embsize confirm``'s pick and asks the question directly, on k fresh seeds (the k after the
confirmation's), the same for every config it trains, so that a proposal and the config it would replace differ by
the dims, not by the shuffle or the init of the other features:

- round 0 retrains the pick itself on the fresh seeds. Its confirmation mean is no reference: the pick was chosen
  as (about) the best of a dozen means of k seeds each, so that mean is biased upward by about a standard error
  (~0.003 AUC on the planted synthetic set at k = 3), and every halving measured on other seeds would look worse by
  as much;
- a round proposes, for every feature still open, the current config with that feature's dim halved (rounded down,
  at least 1), and retrains each proposal with the k seeds, all of them at once;
- a proposal holds when its mean AUC is >= the floor: the pick's round-0 mean minus a tolerance
  (``--refine-tolerance``, by default the search's epsilon). The floor is fixed for the whole refinement, so the
  losses of successive halvings add up to at most the tolerance, never to the tolerance per step;
- a feature whose proposal fails is closed at its current dim; if several proposals hold, their union is retrained
  too and taken when it holds; otherwise the one that saves the most bytes is taken and the others are proposed again
  in the next round (their halvings were each judged alone);
- it ends when every feature is closed or at dim 1, or after ``max_rounds``.

Only dims the search sampled are refined (pinned features stay pinned); the MLP, learning rate and training budget are
the confirmed config's. The refined AUC is measured on the seeds it was selected on, so it is a little optimistic; the
refinement table keeps every proposal (round 0 is the pick) so the steps can be checked.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import EncodedDataset
from pipelines.memory import model_bytes
from pipelines.model import ModelConfig

from .cluster import warm_workers_pay
from .confirm import Candidate, Confirmation, ConfirmSettings, local_ray, log_to_parent, retrain, retrained_recipe

log = logging.getLogger(__name__)


@dataclass
class Refinement:
    start: Candidate  # the confirmed pick
    dims: dict  # the refined dims
    mean_auc: float  # the refined config's mean AUC over the seeds
    sd_auc: float
    model_bytes: int
    floor: float  # the AUC every accepted step kept
    steps: pd.DataFrame  # one row per retrained proposal: round, feature(s), dims, bytes, mean/sd AUC, outcome
    seconds: float = 0.0
    best_epoch: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def model(self) -> ModelConfig:
        return replace(self.start.model, dims=dict(self.dims))


def refine(conf: Confirmation, data: EncodedDataset, settings: ConfirmSettings, searched: list[str],
           tolerance: float | None = None, max_rounds: int = 12, retrain_fn=retrain) -> Refinement:
    """Halve the confirmed pick's ``searched`` dims while the mean AUC over k fresh seeds stays within ``tolerance``
    (default: the search's epsilon) of the pick's on those seeds (module docstring). ``conf`` is ``confirm``'s
    result; its retrain settings (k, epochs, workers) are reused. ``retrain_fn`` is ``confirm.retrain``'s
    signature (tests give it a known AUC surface to check the walk on)."""
    started = time.perf_counter()
    start: Candidate = conf.extra["candidates"][conf.confirmed]
    settings = replace(settings, first_seed=settings.first_seed + settings.seeds)  # fresh seeds (module docstring)
    tolerance = settings.epsilon if tolerance is None else tolerance
    dims = dict(start.model.dims)
    open_ = [f for f in searched if dims.get(f, 1) > 1]
    rows: list[dict] = []
    floor = -math.inf

    def evaluate(round_: int, tried: dict[str, dict]) -> dict[str, tuple[float, list]]:
        """Retrain each named proposal (label -> dims) with the seeds; label -> (mean AUC, runs)."""
        cands = [replace(start, trial_id=label, model=replace(start.model, dims=d),
                         model_bytes=_bytes(data, replace(start.model, dims=d)))
                 for label, d in tried.items()]
        runs = retrain_fn(cands, data, settings)
        out = {}
        for c in cands:
            a = [r["auc"] for r in runs[c.trial_id]]
            out[c.trial_id] = (float(np.mean(a)), runs[c.trial_id])
            rows.append({"round": round_, "changed": c.trial_id, "model_bytes": c.model_bytes,
                         "mean_auc": round(float(np.mean(a)), 5), "sd_auc": round(float(np.std(a, ddof=1)), 5),
                         "holds": bool(np.mean(a) >= floor), "taken": False,
                         **{f"dim.{f}": d for f, d in c.model.dims.items()}})
        return out

    # one Ray for all rounds (``retrain`` would start and stop one per round, ~7 s each)
    parallel = retrain_fn is retrain and settings.workers > 1
    warm = warm_workers_pay(start.model_bytes, data.train.nbytes + data.val.nbytes, settings.sparse, keep_best=True)
    with local_ray(settings.workers, warm) if parallel else contextlib.nullcontext():
        mean, runs = evaluate(0, {"start": dims})["start"]
        floor = mean - tolerance
        rows[0].update(holds=True, taken=True)
        aucs, best_epochs = [r["auc"] for r in runs], [r["best_epoch"] for r in runs]
        for round_ in range(1, max_rounds + 1):
            if not open_:
                break
            proposals = {f: {**dims, f: max(1, dims[f] // 2)} for f in open_}
            results = evaluate(round_, proposals)
            holding = [f for f in open_ if results[f][0] >= floor]
            open_ = [f for f in open_ if f in holding]  # a failed halving closes its feature
            if not holding:
                break
            take = None
            if len(holding) > 1:
                union = {**dims, **{f: proposals[f][f] for f in holding}}
                label = "+".join(holding)
                res = evaluate(round_, {label: union})
                if res[label][0] >= floor:
                    take = (label, union, res[label][1], holding)
            if take is None:  # the single halving that saves the most bytes (the others are proposed again)
                f = min(holding, key=lambda f: (_bytes(data, replace(start.model, dims=proposals[f])), -results[f][0]))
                take = (f, proposals[f], results[f][1], [f])
            label, dims, runs, changed = take
            aucs, best_epochs = [r["auc"] for r in runs], [r["best_epoch"] for r in runs]
            for row in reversed(rows):
                if row["round"] == round_ and row["changed"] == label:
                    row["taken"] = True
                    break
            open_ = [f for f in open_ if dims[f] > 1]
            log.info("refine round %d: halved %s -> %s", round_, ", ".join(changed), dims)
    steps = pd.DataFrame(rows)
    final = replace(start.model, dims=dims)
    return Refinement(start, dims, float(np.mean(aucs)), float(np.std(aucs, ddof=1)),
                      _bytes(data, final), floor, steps, time.perf_counter() - started,
                      int(np.median(best_epochs)), {"seeds": settings.seed_list})


def _bytes(data: EncodedDataset, model: ModelConfig) -> int:
    return model_bytes(data.features, model.dims, model.hidden)


def searched_features(result) -> list[str]:
    """The features whose dim the search sampled (a sampled trial's config names them; baselines set every dim)."""
    from .space import DIM_PREFIX

    names = {k[len(DIM_PREFIX):] for r in result.trials if not r["heuristic"] for k in r["config"]
             if k.startswith(DIM_PREFIX)}
    return [f.name for f in result.extra["features"] if f.name in names]


def write_refinement(result, conf: Confirmation, ref: Refinement, data: EncodedDataset, out: Path) -> dict[str, Path]:
    """refine.csv (every proposal retrained) and refined.yaml (the refined recipe) in ``out``."""
    from pipelines.recipe import write_atomic

    recipe = retrained_recipe(
        result, conf.extra["settings"], data, ref.start, ref.model,
        expected={"val_auc": ref.mean_auc, "val_auc_sd": ref.sd_auc, "seeds": ref.extra["seeds"],
                  "model_bytes": ref.model_bytes, "best_epoch": ref.best_epoch, "floor_val_auc": round(ref.floor, 5)},
        provenance={"refined_from": ref.start.trial_id, "confirmed": conf.verdict,
                    "rule": f"halve each searched dim while the mean val AUC >= {ref.floor:.5f}"},
    )
    out = Path(out)
    return {
        "refine.csv": write_atomic(out / "refine.csv", ref.steps.to_csv(index=False)),
        "refined.yaml": recipe.save(out / "refined.yaml"),
    }


def log_refinement(result, ref: Refinement, files: dict[str, Path]) -> None:
    """The refined AUC and bytes on the parent run, its files under ``confirm/`` beside the confirmation's."""
    metrics = {"refined_val_auc_mean": ref.mean_auc, "refined_val_auc_sd": ref.sd_auc,
               "refined_model_bytes": ref.model_bytes, "refine_floor": ref.floor, "refine_seconds": ref.seconds,
               "refine_proposals": len(ref.steps)}
    log_to_parent(result, metrics, {}, files)
