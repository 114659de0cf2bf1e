"""Which trial checkpoints a running search deletes (search/checkpoints.py). The states here are written with Ray's own
checkpoint manager and JSON encoder; test_faults.py runs the pruner in a real search that a kill -9 interrupts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from search import checkpoints


def _manager(folder: Path, indices: list[int]):
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig

    manager = _CheckpointManager(CheckpointConfig(num_to_keep=None))
    for i in indices:
        path = folder / f"checkpoint_{i:06d}"
        manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(path)), {"epoch": i + 1}))
    return manager


def _state(experiment: Path, stamp: str, trials: dict[str, tuple[str, list[int]]]) -> None:
    """An experiment state as Ray saves it: per trial folder, (status, the checkpoints registered by then)."""
    from ray.tune.utils.serialization import TuneFunctionEncoder

    data = [[json.dumps({"trial_id": folder[-4:], "status": status, "relative_logdir": folder}),
             json.dumps({"checkpoint_manager": _manager(experiment / folder, indices)}, cls=TuneFunctionEncoder)]
            for folder, (status, indices) in trials.items()]
    (experiment / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": data, "runner_data": {}}))


def _checkpoints(experiment: Path, folder: str, n: int) -> None:
    for i in range(n):
        (experiment / folder / f"checkpoint_{i:06d}").mkdir(parents=True)
        (experiment / folder / f"checkpoint_{i:06d}" / "trainer.pt").write_bytes(b"x" * 100)


def _left(experiment: Path, folder: str) -> list[int]:
    return sorted(int(c.name[-6:]) for c in (experiment / folder).glob("checkpoint_*"))


def _prune(experiment: Path) -> int:
    return checkpoints.delete(checkpoints.superseded(experiment))


def test_a_running_trial_keeps_the_checkpoint_the_state_names_and_those_after_it(tmp_path):
    _checkpoints(tmp_path, "run_trial_aaaa", 6)  # 4 and 5 were written after the save
    _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2, 3])})
    assert _prune(tmp_path) == 300
    assert _left(tmp_path, "run_trial_aaaa") == [3, 4, 5]
    assert _prune(tmp_path) == 0


def test_every_saved_state_counts_as_a_resume_may_fall_back_to_an_older_one(tmp_path):
    """resume.repair moves a newest state that does not load aside for the one before it (an earlier leg's)."""
    _checkpoints(tmp_path, "run_trial_aaaa", 8)
    _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2])})
    _state(tmp_path, "2026-12-03_11-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2, 3, 4, 5])})
    _prune(tmp_path)
    assert _left(tmp_path, "run_trial_aaaa") == [2, 5, 6, 7]


def test_an_ended_trial_keeps_only_what_an_older_state_names(tmp_path):
    _checkpoints(tmp_path, "run_trial_aaaa", 6)
    _checkpoints(tmp_path, "run_trial_bbbb", 3)
    _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2])})
    _state(tmp_path, "2026-12-03_11-00-00", {"run_trial_aaaa": ("TERMINATED", list(range(6))),
                                             "run_trial_bbbb": ("TERMINATED", [0, 1, 2])})
    _prune(tmp_path)
    assert _left(tmp_path, "run_trial_aaaa") == [2]
    assert _left(tmp_path, "run_trial_bbbb") == []


@pytest.mark.parametrize("case", ["unknown trial", "no checkpoint at the save", "manager in another form", "cut state"])
def test_what_cannot_be_told_is_kept(tmp_path, case):
    _checkpoints(tmp_path, "run_trial_aaaa", 3)
    if case == "no checkpoint at the save":  # a restore would start the trial afresh, but the next save names one
        _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [])})
    elif case == "unknown trial":  # started after the last save
        _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_bbbb": ("RUNNING", [])})
    else:
        _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1])})
        state = tmp_path / "experiment_state-2026-12-03_10-00-00.json"
        text = state.read_text()
        if case == "cut state":  # being written (Ray's syncer copies it in place), or cut by a full disk
            state.write_text(text[: len(text) // 2])
        else:
            state.write_text(text.replace("CLOUDPICKLE_FALLBACK", "SOMETHING_NEWER"))
    assert checkpoints.superseded(tmp_path) == []
    assert _left(tmp_path, "run_trial_aaaa") == [0, 1, 2]


def test_the_pruner_deletes_after_each_new_state_and_looks_at_most_once_per_check(tmp_path, monkeypatch):
    _checkpoints(tmp_path, "run_trial_aaaa", 4)
    _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1])})
    pruner = checkpoints.Pruner(tmp_path)
    pruner.on_step_end(0, [])
    assert _left(tmp_path, "run_trial_aaaa") == [1, 2, 3] and pruner.freed == 100
    _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1, 2, 3])})  # Ray's next save
    pruner.on_step_end(1, [])  # within CHECK_S of the last look: not yet
    assert _left(tmp_path, "run_trial_aaaa") == [1, 2, 3]
    monkeypatch.setattr(checkpoints, "CHECK_S", 0.0)
    pruner._next = 0.0  # as CHECK_S later
    pruner.on_step_end(2, [])
    assert _left(tmp_path, "run_trial_aaaa") == [3] and pruner.freed == 300

    reads = []
    monkeypatch.setattr(checkpoints, "needed", lambda experiment: reads.append(experiment))
    pruner.on_step_end(3, [])  # no new state: nothing read
    assert reads == []
    state = tmp_path / "experiment_state-2026-12-03_10-00-00.json"
    state.write_text(state.read_text()[:100])  # Ray's syncer copying the next one in place
    pruner.on_step_end(4, [])
    assert reads == [tmp_path]


def test_a_restored_pruner_reads_the_states_again(tmp_path):
    import pickle

    _checkpoints(tmp_path, "run_trial_aaaa", 2)
    _state(tmp_path, "2026-12-03_10-00-00", {"run_trial_aaaa": ("RUNNING", [0, 1])})
    pruner = checkpoints.Pruner(tmp_path)
    pruner.on_step_end(0, [])
    restored = pickle.loads(pickle.dumps(pruner))  # Ray's experiment state, restored by a resume
    assert restored._pruned_at == () and restored._next == 0.0 and restored.experiment == tmp_path
