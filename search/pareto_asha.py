"""Pareto-ASHA: asynchronous successive halving that stops trials by dominance on (val AUC up, model bytes down).

Plain ASHA ranks the trials at a rung by validation AUC alone. Small embeddings tend to learn a little more slowly and
end a little lower, so ASHA stops the cheap trials that belong on the accuracy/memory front. This scheduler keeps
Ray's ASHA shape (``ray/tune/schedulers/async_hyperband.py``: rungs at ``grace_period * eta**k`` below ``max_t``,
brackets picked by a softmax over their rung counts, a decision once per trial and rung, STOP at ``max_t``) and
changes only the decision at a rung:

* The n trials recorded at the rung (the arriving trial included) are ranked with ``search.ranking``: non-dominated
  rank on (-best_val_auc, log10 model_bytes), ties within a front broken by crowding distance (larger first), so the
  cheap and the accurate ends of each front (crowding distance inf) win the ties. Crowding is measured in log bytes,
  the scale of the search's hypervolume.
* The arriving trial continues iff fewer than ``ceil(n / eta)`` recorded trials rank strictly ahead of it (a lower
  rank, or the same rank and a larger crowding distance). Ties go to the arriving trial, as in ASHA, which stops
  only a reward strictly below its cutoff.

The first trials at a rung: ASHA lets the very first trial through (nothing recorded, no cutoff) and judges each
later one against the (1 - 1/eta) quantile of the rewards recorded before it, however few; it has no warm-up. This
rule does the same: the first trial continues (n = 1, ceil(1/eta) = 1, nobody ahead); while n <= eta, ceil(n/eta) = 1,
so a trial continues iff no recorded trial ranks strictly ahead of it, i.e. it lies on the rung's first front and is
not crowded out: the second trial continues unless the first dominates it; a later one continues iff nothing
dominates it and it is an end of the front (or the front has at most two distinct points). From n = eta + 1 on, the
top ceil(n/eta) pass. On AUC alone (all sizes equal) the decision is ASHA's, except for a trial whose AUC lies in
[lower, upper) of the two recorded values ASHA's quantile interpolates between (tested against Ray's own bracket).
Exact copies of the arriving point never count as ahead of it.

A second test uses the trials that have finished (trained to the full budget, or converged: ``final`` in their last
result), which the rung records alone do not see: a running trial is stopped if it is *outrun*, i.e. even gaining as
much AUC from this epoch to its end as the ``outrun_quantile`` (0.5: the median) of the finished trials gained from the
same epoch, it would end dominated by a finished trial (at least 3 finished trials trained past the epoch; ``outrun``).
A sampler that works proposes most trials near the current front, so the rank among the records at a rung lets most of
them through; few of them can still add to the front once it is known, and this is what stops them. The test needs no
rung, so it runs at every epoch from the grace period on (none before it: a trial's first epoch says little on slow
learners, where it cost the planted set front trials). Replayed on six recorded FIFO searches per dataset (48 trials, <=
12 epochs, grace 2, eta 3; the replay of ``benchmarks/scheduler_hypervolume.py``), the test at the rungs alone cut
Pareto-ASHA's epochs from 54.7% to 46.3% of FIFO's on MovieLens 100K and from 56.7% to 49.3% on the planted synthetic
set, for 0.1% of hypervolume (99.8% -> 99.7%, 99.3% -> 99.2% of FIFO's); at every epoch from the grace period, over nine
searches per dataset (three recorded after the rule was chosen), 49.1% -> 45.6% and 51.6% -> 48.7% for 0.0% and 0.2%
(``benchmarks/HISTORY.md``), with the quantile at 0.6 (picked on three of those searches; 0.8 saved less).
``outrun_quantile=None`` turns it off.

Given the search's hypervolume ``reference`` point, the same test also stops a trial whose optimistic end would add less
than ``min_gain`` (0.1%) to the hypervolume of the finished trials' front. Dominance is the case of no gain at all; the
threshold also stops the trials that could only tie the front: a model a few bytes cheaper than a finished one at the
same AUC, or one a little more accurate than the best at several times its size. With the threshold the median projects
as well as the 0.6 quantile did: no lower hypervolume in any replayed search, fewer epochs. Replayed on nine recorded
FIFO searches per dataset, the two together cut the epochs from 45.2% to 37.4% of FIFO's on MovieLens and from 49.2% to
45.3% on the synthetic set, for 0.2% and 0.1% of FIFO's hypervolume (99.9% -> 99.7%, 99.4% -> 99.3%). min_gain was
picked on six of those searches (0.002 saved a few more epochs for a little more hypervolume, 0.005 lost 0.5-0.7%), the
quantile on all nine. ``min_gain=0`` (or no reference) tests dominance alone.

Heuristic-baseline trials (``trial.config["heuristic"]``) are never stopped, as in ``schedulers.BaselineAwareASHA``,
but their results are recorded at every rung they pass, so later trials are judged against them. A finished baseline
can outrun a trial, but the gains are read from sampled trials alone: the baselines are five fixed configs (the default
learning rate, dims that grow together with the cardinalities), not a sample of what the search trains, and they
finish first. On a MovieLens 100K CSV with a temporal split (12 trials, 6 epochs) all five had gained 0 after epoch 2
where the sampled trials' median gain was 0.003; projected with the baselines' gains, every sampled trial was stopped
at the grace period and the search ended with the baselines' front. Like Ray's ASHA, a
trial's last result is recorded when it completes (a trial that converged early still counts at its rung). A trial
this scheduler stops ends without ``final`` in its last result; ``searcher.DimSearch`` tells Optuna it was PRUNED
and the front leaves it out.
"""
from __future__ import annotations

import logging
import math
import pickle
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .pareto import hypervolume
from .ranking import crowding_distance, nondominated_ranks

log = logging.getLogger(__name__)

MIN_GAIN = 0.001  # the outrun test also stops a trial whose optimistic end adds < 0.1% of the finished front's HV


class _Bracket:
    """The rungs of one bracket, highest milestone first, each mapping trial id -> (-auc, log10 bytes) at the rung."""

    def __init__(self, min_t: int, max_t: int, eta: float, s: int):
        self.eta = eta
        # Ray's rung formula, so Pareto-ASHA and ASHA built with the same settings judge at the same epochs.
        n_rungs = int(np.log(max_t / min_t) / np.log(eta) - s + 1)
        self.rungs: list[tuple[float, dict[str, tuple[float, float]]]] = [
            (min_t * eta ** (k + s), {}) for k in reversed(range(n_rungs))
        ]

    def on_result(self, trial_id: str, t: float, point: tuple[float, float], protected: bool) -> str | None:
        """Record the trial at the highest rung it reached but is not recorded at and decide there, once: STOP or
        CONTINUE; None if this result is at no new rung (no decision)."""
        for milestone, recorded in self.rungs:
            if t < milestone or trial_id in recorded:
                continue
            recorded[trial_id] = point
            if not protected and not keeps(list(recorded.values()), len(recorded) - 1, self.eta):
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE
        return None


def outrun(auc: float, nbytes: float, t: int, finished: list[tuple[float, float, list[float]]], quantile: float,
           min_finished: int = 3, reference: tuple[float, float] | None = None, min_gain: float = 0.0) -> bool:
    """Whether a trial at (``auc`` after ``t`` epochs, ``nbytes``) would end dominated by a finished trial even if it
    gained as much AUC from here as the ``quantile`` of the finished trials did after their epoch ``t``; with a
    ``reference`` point (AUC, bytes) and ``min_gain`` > 0, also whether that end would add less than ``min_gain`` of
    the finished trials' hypervolume (``pareto.hypervolume``: a dominated end adds nothing, so 0 is the first test).

    ``finished``: (final best AUC, model bytes, best AUC per epoch) of trials trained to their end. Gains are read
    from trials that trained past ``t``; with fewer than ``min_finished`` of them nothing is outrun."""
    gains = [final - curve[t - 1] for final, _, curve in finished if len(curve) > t and math.isfinite(curve[t - 1])]
    if len(gains) < min_finished:
        return False
    reach = auc + float(np.quantile(gains, quantile))
    if any(final >= reach and size <= nbytes for final, size, _ in finished):
        return True
    if reference is None or min_gain <= 0:
        return False
    aucs = np.array([final for final, _, _ in finished] + [reach])
    sizes = np.array([size for _, size, _ in finished] + [nbytes])
    before = hypervolume(aucs[:-1], sizes[:-1], ref_auc=reference[0], ref_bytes=reference[1])
    after = hypervolume(aucs, sizes, ref_auc=reference[0], ref_bytes=reference[1])
    return after - before < min_gain * before


def keeps(points: list[tuple[float, float]], i: int, eta: float) -> bool:
    """Whether point i is in the top ceil(n/eta) of the n points (all minimized), ties counting in its favour."""
    objs = np.asarray(points, dtype=float)
    ranks = nondominated_ranks(objs)
    crowd = crowding_distance(objs, ranks)
    ahead = (ranks < ranks[i]) | ((ranks == ranks[i]) & (crowd > crowd[i]))
    ahead &= (objs != objs[i]).any(axis=1)  # a copy scores 0 crowding as a later duplicate; it is a tie, not ahead
    return int(ahead.sum()) < math.ceil(len(points) / eta)


class ParetoASHA(FIFOScheduler):
    """Asynchronous successive halving on the (best val AUC, model bytes) Pareto ranking; see the module docstring.

    Args mirror Ray's ``ASHAScheduler``; ``auc_attr`` is maximized and ``bytes_attr`` minimized, both read from each
    reported result (model bytes are exact, from the trial's config). ``seed`` fixes the random bracket choice.
    ``reference`` (the search's hypervolume reference point) and ``min_gain``: see ``outrun``.
    """

    _reference, _min_gain = None, 0.0  # a scheduler pickled before these existed (a resumed search) tests dominance

    def __init__(
        self,
        time_attr: str = "training_iteration",
        auc_attr: str = "best_val_auc",
        bytes_attr: str = "model_bytes",
        max_t: int = 100,
        grace_period: int = 1,
        reduction_factor: float = 3,
        brackets: int = 1,
        seed: int = 0,
        outrun_quantile: float | None = 0.5,
        final_attr: str = "final",
        reference: tuple[float, float] | None = None,
        min_gain: float = MIN_GAIN,
    ):
        if max_t < 1:
            raise ValueError(f"max_t is {max_t}, but must be >= 1")
        if not 1 <= grace_period <= max_t:
            raise ValueError(f"grace_period is {grace_period}, but must be in [1, max_t={max_t}]")
        if not reduction_factor > 1:
            raise ValueError(f"reduction_factor is {reduction_factor}, but must be > 1")
        if brackets < 1:
            raise ValueError(f"brackets is {brackets}, but must be >= 1")
        if outrun_quantile is not None and not 0 <= outrun_quantile <= 1:
            raise ValueError(f"outrun_quantile is {outrun_quantile}, but must be in [0, 1] (or None: rung rule only)")
        if not 0 <= min_gain < 1:
            raise ValueError(f"min_gain is {min_gain}, but must be in [0, 1) (0: stop only trials a finished one "
                             "dominates)")
        super().__init__()
        self._outrun_quantile, self._final_attr = outrun_quantile, final_attr
        self._reference, self._min_gain = reference, min_gain
        self._curves: dict[str, list[float]] = {}  # trial id -> best AUC per epoch, while the trial runs
        self._finished: list[tuple[float, float, list[float]]] = []  # (final AUC, bytes, curve) of trials at their end
        self._num_outrun = 0
        self._time_attr, self._auc_attr, self._bytes_attr = time_attr, auc_attr, bytes_attr
        self._metric = auc_attr  # what Ray shows as the scheduler's metric
        self._max_t, self._grace_period = max_t, grace_period
        self._brackets = [_Bracket(grace_period, max_t, reduction_factor, s) for s in range(brackets)]
        self._rng = np.random.default_rng(seed)
        self._trial_info: dict[str, _Bracket] = {}
        self._num_stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The objectives are fixed by the constructor; a metric/mode from TuneConfig would conflict (as for ASHA).
        return metric is None and mode is None

    def on_trial_add(self, tune_controller, trial) -> None:
        if trial.trial_id in self._trial_info:  # a retried trial (Ray re-adds it after on_trial_error) keeps its bracket
            return
        sizes = np.array([len(b.rungs) for b in self._brackets])
        probs = np.exp(sizes - sizes.max())
        self._trial_info[trial.trial_id] = self._brackets[self._rng.choice(len(self._brackets), p=probs / probs.sum())]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        point = self._point(result)
        if point is None:
            return TrialScheduler.CONTINUE
        protected = bool(trial.config.get("heuristic"))
        t = result[self._time_attr]
        curve = self._curves.setdefault(trial.trial_id, [])
        del curve[int(t) - 1:]  # a trial resumed from an earlier checkpoint reports those epochs again
        curve.extend([math.nan] * (int(t) - 1 - len(curve)))  # epochs this scheduler did not see (a restored search)
        curve.append(-point[0])
        if t >= self._max_t:
            action = TrialScheduler.CONTINUE if protected else TrialScheduler.STOP
        else:
            action = self._trial_info[trial.trial_id].on_result(trial.trial_id, t, point, protected)
            # The outrun test needs no rung: from the grace period on, every epoch is checked.
            if action != TrialScheduler.STOP and not protected and t >= self._grace_period and (
                    self._outrun_quantile is not None
                    and outrun(-point[0], 10 ** point[1], int(t), self._finished, self._outrun_quantile,
                               reference=self._reference, min_gain=self._min_gain)):
                action = TrialScheduler.STOP
                self._num_outrun += 1
            action = action or TrialScheduler.CONTINUE
        if action == TrialScheduler.STOP and t < self._max_t:
            self._num_stopped += 1
            log.debug("stopped trial %s at %s=%s", trial.trial_id, self._time_attr, t)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict | None) -> None:
        point = self._point(result)
        bracket = self._trial_info.pop(trial.trial_id, None)
        curve = self._curves.pop(trial.trial_id, [])
        if point is not None and bracket is not None:
            bracket.on_result(trial.trial_id, result[self._time_attr], point, protected=True)  # record only
        if point is not None and result.get(self._final_attr) and curve:
            # A baseline's end counts (it can dominate), its learning curve does not: see the module docstring.
            gains = [] if trial.config.get("heuristic") else curve
            self._finished.append((-point[0], 10 ** point[1], gains))

    def on_trial_error(self, tune_controller, trial) -> None:
        pass  # Ray may retry the trial (on_trial_add again); its bracket and rung records stay

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)
        self._curves.pop(trial.trial_id, None)

    def _point(self, result: dict | None) -> tuple[float, float] | None:
        if not result or any(k not in result for k in (self._time_attr, self._auc_attr, self._bytes_attr)):
            return None
        auc, nbytes = float(result[self._auc_attr]), float(result[self._bytes_attr])
        if not (math.isfinite(auc) and nbytes > 0):
            log.warning("result without a finite %s and a positive %s: not ranked", self._auc_attr, self._bytes_attr)
            return None
        return -auc, math.log10(nbytes)

    def rung_records(self) -> list[dict[float, dict[str, tuple[float, float]]]]:
        """Per bracket: rung milestone -> {trial id: (best val AUC, model bytes) recorded there}."""
        return [
            {m: {tid: (-p[0], 10 ** p[1]) for tid, p in rec.items()} for m, rec in reversed(b.rungs)}
            for b in self._brackets
        ]

    def debug_string(self) -> str:
        rungs = " | ".join(f"t={m:g}: {len(rec)} recorded" for m, rec in reversed(self._brackets[0].rungs))
        return (f"Using Pareto-ASHA: num_stopped={self._num_stopped} (outrun by a finished trial: {self._num_outrun}); "
                f"bracket 0: {rungs}")

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
