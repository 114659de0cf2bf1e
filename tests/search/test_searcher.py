"""DimSearch over the legs of a resumed search: a real Optuna study in a journal file, as `embsize search` keeps it."""
from __future__ import annotations

import optuna
import pytest

from pipelines import SyntheticSpec, generate, prepare
from search.runner import heuristic_configs
from search.searcher import DimSearch
from search.space import SearchSpec, build_space


@pytest.fixture(scope="module")
def space_and_baselines():
    data = prepare(generate(SyntheticSpec(rows=2000, seed=5)))
    space = build_space(data.features, SearchSpec(max_dim=8))
    return space, heuristic_configs(data, space, None)


def _searcher(tmp_path, space, baselines, trials=3):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.journal")))
    searcher = DimSearch(space, baselines, seed=0, storage=storage, study_name="s", trials=trials)
    searcher.fail_untracked()  # as the runner does before a fresh Ray experiment
    return searcher


def _final(auc: float) -> dict:
    return {"final": True, "best_val_auc": auc, "model_bytes": 1000, "epoch": 2}


def test_a_leg_whose_ray_state_was_lost_samples_only_the_rest_of_the_budget(tmp_path, space_and_baselines):
    """Ray starts such a leg afresh and would sample --trials again, and run every baseline again, on top of the trials
    that ended before: the study now holds the count, and the baselines that ended."""
    space, baselines = space_and_baselines
    first = _searcher(tmp_path, space, baselines)
    for i, name in enumerate(baselines):  # every baseline ran and ended (one failed: it ended all the same)
        assert first.suggest(f"b{i}")["heuristic"] == name
        first.on_trial_complete(f"b{i}", _final(0.6), error=i == 1)
    first.suggest("t1")
    first.on_trial_complete("t1", _final(0.7))
    first.suggest("t2")  # running when the driver died: trained again
    first.suggest("t3")
    first._ot_trials["t3"].set_user_attr("outcome", "completed")  # ended, its tell lost with the journal's last record

    second = _searcher(tmp_path, space, baselines)
    asked = [second.suggest(f"n{i}") for i in range(3)]
    assert isinstance(asked[0], dict) and "heuristic" not in asked[0]  # no baseline again
    assert asked[1:] == [DimSearch.FINISHED] * 2  # t1 and t3 count, t2 does not: one more
    states = {t.user_attrs.get("ray_trial_id", t.number): t.user_attrs.get("outcome") for t in second.study.trials
              if "heuristic" not in t.user_attrs}
    assert sorted(map(str, states.values())) == ["None", "completed", "completed", "interrupted"]


def test_a_baseline_that_did_not_end_runs_again(tmp_path, space_and_baselines):
    space, baselines = space_and_baselines
    names = list(baselines)
    first = _searcher(tmp_path, space, baselines)
    first.suggest("b0")
    first.on_trial_complete("b0", _final(0.6))
    first.suggest("b1")  # running at the kill
    second = _searcher(tmp_path, space, baselines)
    assert [second.suggest(f"n{i}").get("heuristic") for i in range(len(names) - 1)] == names[1:]


def test_without_a_budget_it_samples_as_long_as_ray_asks(tmp_path, space_and_baselines):
    space, _ = space_and_baselines
    searcher = _searcher(tmp_path, space, {}, trials=None)
    assert all(isinstance(searcher.suggest(f"t{i}"), dict) for i in range(5))
    (tmp_path / "b").mkdir()
    searcher = _searcher(tmp_path / "b", space, {}, trials=2)
    assert [isinstance(searcher.suggest(f"t{i}"), dict) for i in range(3)] == [True, True, False]
