"""Ray's OptunaSearch, made correct for a multi-objective search with early stopping and heuristic baselines.

What Ray's OptunaSearch does not do, and this subclass adds:
- A trial stopped early by the scheduler reaches Ray as "complete" with half-trained metrics; Ray would tell Optuna
  it COMPLETED, poisoning the sampler and the front. Here it is told PRUNED. Only trials whose last result says
  ``final`` (trained to the full budget or to their own early-stopping convergence) are told COMPLETE.
- A memory budget is a hard constraint: a sampled config over budget is told to Optuna as FAIL (user attr
  ``rejected``) and never reaches a worker.
- Heuristic baselines (√n, fastai, ...) run first as labelled trials; when their config lies inside the sampled space
  they are added to the study as completed warm-start points once trained.
- A resumed search (Ray restores this searcher from its last experiment checkpoint, the study from its journal) may
  find trials the journal already finished after that checkpoint: telling them again is skipped, not an error. Study
  trials left RUNNING by the interrupted driver that Ray will not continue are marked FAIL (``outcome`` interrupted).
- The trial budget holds over every leg of a resumed search. Ray counts only the trials of its saved experiment, so a
  trial that ended after Ray's last save (a ``kill -9``), or every trial of a leg whose Ray state was lost (a full
  disk), was sampled again on top. The study is the record here: sampling stops (``Searcher.FINISHED``) once it holds
  ``trials`` sampled trials, and a baseline that ended in an earlier leg (a study attribute) is not run again.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .sensitivity import quiet_optuna
from .space import SearchSpace

log = logging.getLogger(__name__)

METRICS = ["best_val_auc", "model_bytes"]
MODES = ["max", "min"]
BASELINE_ENDED = "baseline_ended."  # study attribute BASELINE_ENDED + name: the baseline's trial ended (its Ray id)
MAX_REJECTS = 200  # over-budget samples in a row before falling back to shrinking a sample into the budget


class DimSearch(OptunaSearch):
    def __init__(
        self,
        space: SearchSpace,
        heuristics: Mapping[str, dict] | None = None,
        budget: int | None = None,
        seed: int = 0,
        storage=None,
        study_name: str = "embsize",
        trials: int | None = None,
    ):
        import optuna

        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)
        super().__init__(
            space=space.distributions(),
            metric=list(METRICS),
            mode=list(MODES),
            sampler=sampler,
            storage=storage,
            study_name=study_name,
        )
        self.dim_space = space
        self.budget = budget
        self.trials = trials  # sampled trials over the whole search (None: as many as Ray asks for)
        self._queue = list((heuristics or {}).items())
        self._configs: dict[str, dict] = {}

    @property
    def study(self):
        return self._ot_study

    def _setup_study(self, mode):
        with quiet_optuna():  # "A new study created in Journal ..." on every new search
            super()._setup_study(mode)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self._configs:  # Ray may ask again for a restored trial
            return self._configs[trial_id]
        ended = self._ot_study.user_attrs
        while self._queue and f"{BASELINE_ENDED}{self._queue[0][0]}" in ended:  # ended in an earlier leg
            self._queue.pop(0)
        if self._queue:
            name, config = self._queue.pop(0)
            config = {**config, "heuristic": name}
        elif getattr(self, "trials", None) is not None and self._sampled() >= self.trials:  # absent: an older pickle
            return Searcher.FINISHED
        else:
            config = self._sample_within_budget(trial_id)
        self._configs[trial_id] = config
        return config

    def _sampled(self) -> int:
        """The study's sampled trials, over every leg: asked or ended; not the over-budget samples it rejected, the
        baselines' warm-start points, or trials an interrupted driver left running that Ray does not continue."""
        import optuna

        states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.FAIL)
        return sum(not {"heuristic", "rejected"} & t.user_attrs.keys() and t.user_attrs.get("outcome") != "interrupted"
                   for t in self._ot_study.get_trials(deepcopy=False, states=states))

    def _sample_within_budget(self, trial_id: str) -> dict:
        import optuna

        for attempt in range(MAX_REJECTS + 1):
            config = super().suggest(trial_id)
            if self.budget is None or self.dim_space.bytes(config) <= self.budget:
                return config
            ot_trial = self._ot_trials.pop(trial_id)
            ot_trial.set_user_attr("rejected", f"model bytes {self.dim_space.bytes(config)} over budget {self.budget}")
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
            if attempt == MAX_REJECTS - 1:
                # The sampler keeps proposing infeasible configs: enqueue the last one shrunk into the budget.
                self._ot_study.enqueue_trial(self.dim_space.shrink(config, self.budget))
        raise RuntimeError("could not sample a config within the memory budget")  # unreachable: shrink() fits

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        config = self._configs.get(trial_id, {})
        final = bool(result and result.get("final")) and not error
        values = _values(result) if final else None
        if config.get("heuristic"):
            # in the study, which a resumed search reads, whatever Ray's saved state holds
            self._ot_study.set_user_attr(f"{BASELINE_ENDED}{config['heuristic']}", trial_id)
            if values is not None and self.dim_space.contains(config) and not self._added(trial_id):
                params = {k: config[k] for k in self.dim_space.distributions()}
                trial = optuna.trial.create_trial(
                    params=params,
                    distributions=self.dim_space.distributions(),
                    values=values,
                    user_attrs={"heuristic": config["heuristic"], "ray_trial_id": trial_id},
                )
                self._ot_study.add_trial(trial)
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or self._finished(ot_trial):  # finished: told before an interrupted driver's last save
            return
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        if result:
            ot_trial.set_user_attr("epochs", int(result.get("epoch", 0)))
        if error or (final and values is None):
            ot_trial.set_user_attr("outcome", "failed")
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        elif final:
            ot_trial.set_user_attr("outcome", "completed")
            ot_trial.set_user_attr("ended", str(result.get("ended", "")))
            self._ot_study.tell(ot_trial, values)
        else:
            ot_trial.set_user_attr("outcome", "stopped_early")
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.fail_untracked()

    def fail_untracked(self) -> None:
        """Mark FAIL the study's RUNNING trials no Ray trial stands for: asked by a driver that was killed before it
        saved them (a resumed search's Ray trials are exactly the saved ones)."""
        import optuna

        tracked = {t._trial_id for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if frozen._trial_id not in tracked:  # asked after the last save: its Ray trial was never saved
                # an outcome set already: the trial ended and its tell was lost (a kill between the two writes, or a
                # full disk that cut the journal's last record); it stays one of the search's trials (``_sampled``)
                if frozen.user_attrs.get("outcome") not in ("completed", "stopped_early", "failed"):
                    self._ot_study._storage.set_trial_user_attr(frozen._trial_id, "outcome", "interrupted")
                self._ot_study.tell(frozen.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                log.info("study trial %d was left running by an interrupted search: marked FAIL", frozen.number)

    def _finished(self, ot_trial) -> bool:
        return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def _added(self, trial_id: str) -> bool:
        """Whether a baseline's warm-start point is in the study already (added before an interrupted driver's last
        save)."""
        return any(t.user_attrs.get("ray_trial_id") == trial_id for t in self._ot_study.get_trials(deepcopy=False))


def _values(result: dict | None) -> list[float] | None:
    if not result:
        return None
    values = [result.get(m) for m in METRICS]
    if any(v is None or not math.isfinite(float(v)) for v in values):
        return None
    return [float(v) for v in values]
