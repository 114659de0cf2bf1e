"""Trial schedulers by name. Heuristic baselines are never stopped early: they are reference points on the front.

pareto-asha (the default) stops trials by Pareto rank on (val AUC, model bytes), see ``pareto_asha``; asha by val AUC
alone; fifo never stops a trial.
"""
from __future__ import annotations

import math

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from .pareto_asha import ParetoASHA

SCHEDULERS = ("pareto-asha", "asha", "fifo")  # the first is the default


class BaselineAwareASHA(ASHAScheduler):
    """Ray's ASHA on best val AUC, except that heuristic-baseline trials always continue to their full budget."""

    def on_trial_result(self, tune_controller, trial, result):
        if trial.config.get("heuristic"):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_scheduler(kind: str, max_epochs: int, grace_period: int = 2, reduction_factor: float = 3,
                   reference: tuple[float, float] | None = None) -> TrialScheduler:
    """``reference``: the search's hypervolume reference point (AUC, bytes), which Pareto-ASHA's outrun test reads."""
    if kind == "fifo":
        return FIFOScheduler()
    if kind == "pareto-asha":
        return ParetoASHA(
            time_attr="training_iteration",
            max_t=max_epochs,
            grace_period=min(grace_period, max_epochs),
            reduction_factor=reduction_factor,
            reference=reference,
        )
    if kind == "asha":
        return BaselineAwareASHA(
            time_attr="training_iteration",
            metric="best_val_auc",
            mode="max",
            max_t=max_epochs,
            grace_period=min(grace_period, max_epochs),
            reduction_factor=reduction_factor,
        )
    raise ValueError(f"scheduler is {kind!r}, but must be one of {', '.join(SCHEDULERS)}")


def decision_epochs(scheduler: TrialScheduler, max_epochs: int) -> frozenset[int] | None:
    """The epochs at which ``scheduler`` decides on a trial (``TrialSettings.decisions``), or None if at any epoch.

    FIFO stops none. Both ASHAs decide once per trial and rung, at its first epoch at or past the rung's milestone, and
    stop a trial at max_t; between rungs Ray's ASHA always continues. Pareto-ASHA's outrun test may also stop a trial
    between rungs; such a stop finds the trial training its next epoch, which it leaves at the next batch
    (``trial.run_trial``), so these stay the rungs: waiting at every epoch would put a report's round trip to the
    driver (5-15 ms) in every epoch of every trial. Read from the scheduler's own rungs (for Ray's ASHA
    its ``_Bracket._rungs``, which Ray does not expose), so the epochs cannot drift from the decisions."""
    if type(scheduler) is FIFOScheduler:
        return frozenset()
    if isinstance(scheduler, ParetoASHA):
        milestones = [m for b in scheduler._brackets for m, _ in b.rungs]
    elif isinstance(scheduler, ASHAScheduler):
        milestones = [m for b in scheduler._brackets for m, _ in b._rungs]
    else:
        return None
    return frozenset(math.ceil(m) for m in milestones) | {max_epochs}
