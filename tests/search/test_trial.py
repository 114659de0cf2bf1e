"""The trial function under real Ray Tune: a stop that lands between the scheduler's rungs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Run in a process of its own: the Ray it starts must give its workers TUNE_FUNCTION_THREAD_TIMEOUT_S, and the
# test session's Ray (conftest.ray_session) may be up already.
SCRIPT = """
import json, sys
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from pipelines import prepare
from pipelines.load import load
from search.space import SearchSpec, build_space
from search.trial import TrialSettings, run_trial


class StopAtEpoch2(FIFOScheduler):  # stops every trial after its second epoch, which is not a "decision" epoch
    def on_trial_result(self, tune_controller, trial, result):
        return TrialScheduler.STOP if result["epoch"] >= 2 else TrialScheduler.CONTINUE


def one_of(config, **kwargs):  # grid_search over whole configs: each arrives under one key
    run_trial(config["cfg"], **kwargs)


data = prepare(load("synthetic", synthetic_rows=12_000, seed=0), seed=0)
space = build_space(data.features, SearchSpec(max_dim=4))
# batch size 1: ~9,600 optimizer steps an epoch, well over a second (0.9 s seen at 8,000 rows on a quiet box);
# decisions at the last epoch only
settings = TrialSettings(max_epochs=6, patience=0, batch_size=1, cpus=1, decisions=frozenset({6}))
configs = [space.encode({f.name: d for f in data.features}) for d in (1, 2, 3, 4)]
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
grid = tune.Tuner(
    tune.with_parameters(one_of, data=data.for_training(), space=space, settings=settings),
    param_space={"cfg": tune.grid_search(configs)},
    tune_config=tune.TuneConfig(scheduler=StopAtEpoch2(), reuse_actors=True),
    run_config=tune.RunConfig(storage_path=sys.argv[1], name="stop", verbose=0),
).fit()
print(json.dumps([[None if r.error is None else str(r.error)[:300], r.metrics.get("epoch"),
                   r.metrics.get("epoch_seconds")] for r in grid]))
"""


@pytest.mark.slow
def test_a_trial_stopped_mid_epoch_frees_its_actor_for_the_next_trial(tmp_path):
    """Pareto-ASHA's outrun test may stop a trial at any epoch, while the trial (between rungs it does not wait for
    its report) is already training the next one. Ray reuses the actor only if the stopped trial's thread ends
    within TUNE_FUNCTION_THREAD_TIMEOUT_S; otherwise the *next* trial on that actor fails. Epochs here take longer
    than that bound, so the trial must leave the epoch under way, not finish it."""
    env = {**os.environ, "TUNE_FUNCTION_THREAD_TIMEOUT_S": "1", "RAY_AIR_NEW_OUTPUT": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = json.loads(done.stdout.splitlines()[-1])
    assert [error for error, _, _ in trials] == [None] * 4, done.stderr[-3000:]  # trials 2-4 ran on a reused actor
    assert [epoch for _, epoch, _ in trials] == [2, 2, 2, 2]
    assert min(seconds for _, _, seconds in trials) > 1.0, trials  # else the scenario does not test the bound


def test_checkpoint_folders_a_killed_worker_left_are_swept_after_an_hour(tmp_path):
    """A trial writes each checkpoint to a folder in the node's temporary directory and removes it once Tune has it;
    a worker killed in between (kill -9 of the driver, a lost node) left it for good. Each trial start removes the
    ones untouched for an hour; a folder in use (seconds old) and other programs' folders stay."""
    import time

    from search.trial import CKPT_PREFIX, STALE_S, _sweep_stale_checkpoints

    old, fresh, other = tmp_path / f"{CKPT_PREFIX}old", tmp_path / f"{CKPT_PREFIX}fresh", tmp_path / "other-old"
    for folder in (old, fresh, other):
        folder.mkdir()
        (folder / "model.pt").write_bytes(b"x" * 100)
    for folder in (old, other):
        then = time.time() - STALE_S - 60
        os.utime(folder, (then, then))
    assert _sweep_stale_checkpoints(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{CKPT_PREFIX}fresh", "other-old"]
