"""Which trial checkpoints a running search deletes (search/checkpoints.py), in a folder and in an S3 bucket (a local
S3 server, through pyarrow's filesystem as Ray Tune writes there). The states here are written with Ray's own
checkpoint manager and JSON encoder; test_faults.py runs the pruner in a real search that a kill -9 interrupts."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from search import checkpoints
from search.cluster import experiment_path


@pytest.fixture(params=["folder", "bucket"])
def experiment(request, tmp_path) -> Path | str:
    """A Ray Tune experiment's place: a folder, or a URI in a new bucket."""
    if request.param == "folder":
        return tmp_path
    return experiment_path(request.getfixturevalue("s3_storage"), "exp")


def _write(experiment, relative: str, data: bytes) -> None:
    fs, root = checkpoints.filesystem(experiment)
    fs.create_dir(f"{root}/{relative}".rsplit("/", 1)[0])
    with fs.open_output_stream(f"{root}/{relative}") as f:
        f.write(data)


def _read(experiment, relative: str) -> bytes:
    fs, root = checkpoints.filesystem(experiment)
    with fs.open_input_stream(f"{root}/{relative}") as f:
        return f.readall()


def _manager(experiment, folder: str, indices: list[int]):
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig

    fs, root = checkpoints.filesystem(experiment)
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=None))
    for i in indices:
        checkpoint = Checkpoint(f"{root}/{folder}/checkpoint_{i:06d}", filesystem=fs)
        manager.register_checkpoint(_TrainingResult(checkpoint, {"epoch": i + 1}))
    return manager


def _state(experiment, stamp: str, trials: dict[str, tuple[str, list[int]]]) -> None:
    """An experiment state as Ray saves it: per trial folder, (status, the checkpoints registered by then)."""
    from ray.tune.utils.serialization import TuneFunctionEncoder

    data = [[json.dumps({"trial_id": folder[-4:], "status": status, "relative_logdir": folder}),
             json.dumps({"checkpoint_manager": _manager(experiment, folder, indices)}, cls=TuneFunctionEncoder)]
            for folder, (status, indices) in trials.items()]
    _write(experiment, f"experiment_state-{stamp}.json", json.dumps({"trial_data": data, "runner_data": {}}).encode())


def _checkpoints(experiment, folder: str, n: int) -> None:
    for i in range(n):
        _write(experiment, f"{folder}/checkpoint_{i:06d}/trainer.pt", b"x" * 100)


def _left(experiment, folder: str) -> list[int]:
    fs, root = checkpoints.filesystem(experiment)
    found = fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", allow_not_found=True))
    return sorted(int(f.base_name[-6:]) for f in found if f.base_name.startswith("checkpoint_"))


def _prune(experiment) -> int:
    return checkpoints.delete(experiment, checkpoints.superseded(experiment))


def test_a_running_trial_keeps_the_checkpoint_the_state_names_and_those_after_it(experiment):
    _checkpoints(experiment, "run_trial_aaaa", 6)  # 4 and 5 were written after the save
    _state(experiment, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2, 3])})
    assert _prune(experiment) == 300
    assert _left(experiment, "run_trial_aaaa") == [3, 4, 5]
    assert _prune(experiment) == 0


def test_every_saved_state_counts_as_a_resume_may_fall_back_to_an_older_one(experiment):
    """resume.repair moves a newest state that does not load aside for the one before it (an earlier leg's)."""
    _checkpoints(experiment, "run_trial_aaaa", 8)
    _state(experiment, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2])})
    _state(experiment, "2026-12-03_11-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2, 3, 4, 5])})
    _prune(experiment)
    assert _left(experiment, "run_trial_aaaa") == [2, 5, 6, 7]


def test_an_ended_trial_keeps_only_what_an_older_state_names(experiment):
    _checkpoints(experiment, "run_trial_aaaa", 6)
    _checkpoints(experiment, "run_trial_bbbb", 3)
    _state(experiment, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2])})
    _state(experiment, "2026-12-03_11-00-00", {"run_trial_aaaa": ("TERMINATED", list(range(6))),
                                             "run_trial_bbbb": ("TERMINATED", [0, 1, 2])})
    _prune(experiment)
    assert _left(experiment, "run_trial_aaaa") == [2]
    assert _left(experiment, "run_trial_bbbb") == []


@pytest.mark.parametrize("case", ["unknown trial", "no checkpoint at the save", "manager in another form", "cut state"])
def test_what_cannot_be_told_is_kept(experiment, case):
    _checkpoints(experiment, "run_trial_aaaa", 3)
    if case == "no checkpoint at the save":  # a restore would start the trial afresh, but the next save names one
        _state(experiment, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [])})
    elif case == "unknown trial":  # started after the last save
        _state(experiment, "2026-12-03_10-00-00", {"run_trial_bbbb": ("RUNNING", [])})
    else:
        _state(experiment, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1])})
        state = "experiment_state-2026-12-03_10-00-00.json"
        text = _read(experiment, state)
        if case == "cut state":  # being written (Ray's syncer copies it in place), or cut by a full disk
            _write(experiment, state, text[: len(text) // 2])
        else:
            _write(experiment, state, text.replace(b"CLOUDPICKLE_FALLBACK", b"SOMETHING_NEWER"))
    assert checkpoints.superseded(experiment) == []
    assert _left(experiment, "run_trial_aaaa") == [0, 1, 2]


def test_the_pruner_deletes_after_each_new_state_and_looks_at_most_once_per_check(experiment, monkeypatch):
    _checkpoints(experiment, "run_trial_aaaa", 4)
    _state(experiment, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1])})
    pruner = checkpoints.Pruner(experiment)
    pruner.on_step_end(0, [])
    pruner.wait()
    assert _left(experiment, "run_trial_aaaa") == [1, 2, 3] and pruner.freed == 100
    _state(experiment, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2, 3])})  # Ray's next save
    pruner.on_step_end(1, [])  # within CHECK_S of the last look: not yet
    pruner.wait()
    assert _left(experiment, "run_trial_aaaa") == [1, 2, 3]
    monkeypatch.setattr(checkpoints, "CHECK_S", 0.0)
    pruner._next = 0.0  # as CHECK_S later
    pruner.on_step_end(2, [])
    pruner.wait()
    assert _left(experiment, "run_trial_aaaa") == [3] and pruner.freed == 300

    reads = []
    monkeypatch.setattr(checkpoints, "needed", lambda experiment, *where: reads.append(experiment))
    pruner.on_step_end(3, [])  # no new state: nothing read
    pruner.wait()
    assert reads == []
    state = "experiment_state-2026-12-03_10-00-00.json"
    _write(experiment, state, _read(experiment, state)[:100])  # Ray's syncer copying the next one in place
    pruner.on_step_end(4, [])
    pruner.wait()
    assert reads == [experiment]


def test_a_restored_pruner_reads_the_states_again(experiment):
    import pickle

    _checkpoints(experiment, "run_trial_aaaa", 2)
    _state(experiment, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1])})
    pruner = checkpoints.Pruner(experiment)
    pruner.on_step_end(0, [])
    pruner.wait()
    restored = pickle.loads(pickle.dumps(pruner))  # Ray's experiment state, restored by a resume
    assert restored._pruned_at == () and restored._next == 0.0 and restored.experiment == experiment


def test_tunes_loop_never_waits_for_a_look_and_looks_do_not_overlap(tmp_path, monkeypatch):
    """On a bucket a look is a LIST request (tens of ms, more on a slow link): it runs on a thread of its own, and the
    next one starts only once it has ended."""
    import threading
    import time

    started, release = threading.Event(), threading.Event()

    def slow_listing(fs, root):
        started.set()
        release.wait(10)
        return []

    monkeypatch.setattr(checkpoints, "_states", slow_listing)
    monkeypatch.setattr(checkpoints, "CHECK_S", 0.0)
    pruner = checkpoints.Pruner(tmp_path)
    t0 = time.monotonic()
    pruner.on_step_end(0, [])
    assert started.wait(5)
    look = pruner._look
    pruner.on_step_end(1, [])  # the look still runs: no second one
    assert pruner._look is look and look.is_alive() and time.monotonic() - t0 < 1
    release.set()
    pruner.on_experiment_end([])  # waits for it, before the runner's prune_all
    assert not look.is_alive()
