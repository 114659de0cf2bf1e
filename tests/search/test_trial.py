"""The trial function under real Ray Tune: a stop that lands between the scheduler's rungs."""
from __future__ import annotations

import pytest

from pipelines import prepare
from pipelines.load import load
from search.space import SearchSpec, build_space
from search.trial import TrialSettings, run_trial


def one_of(config, **kwargs):  # grid_search over whole configs: each arrives under one key
    run_trial(config["cfg"], **kwargs)


@pytest.mark.slow
def test_a_trial_stopped_mid_epoch_frees_its_actor_for_the_next_trial(tmp_path, monkeypatch):
    """Pareto-ASHA's outrun test may stop a trial at any epoch, while the trial (between rungs it does not wait for
    its report) is already training the next one. Ray reuses the actor only if the stopped trial's thread ends
    within TUNE_FUNCTION_THREAD_TIMEOUT_S; otherwise the *next* trial on that actor fails. Epochs here take longer
    than that bound, so the trial must leave the epoch under way, not finish it."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class StopAtEpoch2(FIFOScheduler):  # stops every trial after its second epoch, which is not a "decision" epoch
        def on_trial_result(self, tune_controller, trial, result):
            return TrialScheduler.STOP if result["epoch"] >= 2 else TrialScheduler.CONTINUE

    monkeypatch.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", "1")  # the actors inherit it from this process
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    data = prepare(load("synthetic", synthetic_rows=4_000, seed=0), seed=0)
    space = build_space(data.features, SearchSpec(max_dim=4))
    # batch size 2: ~1,600 optimizer steps an epoch, well over a second; decisions at the rungs only (here: none)
    settings = TrialSettings(max_epochs=6, patience=0, batch_size=2, cpus=1, decisions=frozenset({6}))
    configs = [space.encode({f.name: d for f in data.features}) for d in (1, 2, 3, 4)]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        grid = tune.Tuner(
            tune.with_parameters(one_of, data=data.for_training(), space=space, settings=settings),
            param_space={"cfg": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(scheduler=StopAtEpoch2(), reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="stop", verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    assert [r.error for r in grid] == [None] * 4  # every trial after the first ran on a reused actor
    epoch_seconds = [r.metrics["epoch_seconds"] for r in grid]
    assert min(epoch_seconds) > 1.0, epoch_seconds  # else the scenario does not test the bound
    assert sorted(r.metrics["epoch"] for r in grid) == [2, 2, 2, 2]
