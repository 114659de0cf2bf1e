"""DimSearch on a real Optuna study in journal storage (no Ray needed: the searcher is asked and told directly)."""
from __future__ import annotations

import optuna

from pipelines.dataset import FeatureInfo
from search.searcher import DimSearch
from search.space import build_space, parse_spec

FEATURES = (FeatureInfo("user_id", False, 944), FeatureInfo("item_id", False, 1683), FeatureInfo("genres", True, 20))


def _journal(tmp_path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.journal")))


def test_first_sampled_trial_is_the_smallest_model_once_per_study(tmp_path):
    space = build_space(FEATURES, parse_spec({"hidden": [32, 64]}))
    baseline = space.encode({"user_id": 30, "item_id": 40, "genres": 4})
    search = DimSearch(space, {"sqrt": baseline}, seed=3, storage=_journal(tmp_path), study_name="s")
    assert search.suggest("b") == {**baseline, "heuristic": "sqrt"}  # baselines still come first
    first = search.suggest("t0")
    assert first == space.smallest() and space.bytes(first) == space.min_bytes()
    search.on_trial_complete("t0", {"best_val_auc": 0.6, "model_bytes": space.bytes(first), "final": True})
    others = [search.suggest(f"t{i}") for i in range(1, 6)]
    assert all(space.bytes(c) > space.min_bytes() for c in others)  # sampled, not the anchor again

    # the same study continued (a resumed search): no second anchor
    again = DimSearch(space, {}, seed=3, storage=_journal(tmp_path), study_name="s")
    assert space.bytes(again.suggest("t9")) > space.min_bytes()
    anchors = [t for t in again.study.trials if t.user_attrs.get("anchor") == "smallest"]
    assert len(anchors) == 1 and anchors[0].state == optuna.trial.TrialState.COMPLETE
