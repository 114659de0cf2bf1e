"""`embsize confirm --refine`: the halving walk on known AUC surfaces, and one real end-to-end refinement."""
from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from pipelines import SyntheticSpec, generate, prepare
from pipelines.memory import model_bytes
from pipelines.model import ModelConfig
from pipelines.recipe import Recipe
from pipelines.synthetic import PlantedFeature
from search.cli import main
from search.confirm import Candidate, ConfirmSettings, decide
from search.refine import refine, searched_features
from search.review import load_review

from .small_search import small_search
from .tables import read_table

SEEDS = ConfirmSettings(seeds=3, first_seed=1)
START = {"a": 32, "b": 16, "c": 16, "pinned": 8}


@pytest.fixture(scope="module")
def data():
    features = (PlantedFeature("a", 400, 8), PlantedFeature("b", 50, 2), PlantedFeature("c", 30, 0),
                PlantedFeature("pinned", 20, 2))
    return prepare(generate(SyntheticSpec(features=features, rows=3_000, seed=0)))


def surface(auc_of):
    """A retrain_fn whose AUC for seed s is auc_of(dims) plus a per-seed offset shared by every config (paired)."""
    calls = []

    def retrain_fn(cands, data, settings):
        assert settings.seed_list == [4, 5, 6]  # fresh: the confirmation trained on 1, 2, 3
        calls.append([c.model.dims for c in cands])
        return {c.trial_id: [{"seed": s, "auc": auc_of(c.model.dims) + 0.001 * (s - 5), "best_epoch": 3, "epochs": 4}
                             for s in settings.seed_list] for c in cands}
    return retrain_fn, calls


def confirmed(auc_of, dims=START):
    """A confirmation whose pick is ``dims`` with the surface's AUCs (what ``confirm`` hands to ``refine``)."""
    start = Candidate("t1", "search", ModelConfig(dict(dims)), 3e-3, 10_000, auc_of(dims))
    # its confirmation AUCs lie 0.004 above the surface, as a pick chosen as the best of many means does: the
    # refinement must measure its own reference, not inherit this one
    runs = {"t1": [{"seed": s, "auc": auc_of(dims) + 0.004 + 0.001 * (s - 2), "best_epoch": 3, "epochs": 4}
                   for s in SEEDS.seed_list]}
    conf = decide([start], {"t1": [r["auc"] for r in runs["t1"]]}, "t1")
    conf.seeds = SEEDS.seed_list
    conf.extra = {"candidates": {"t1": start}, "runs": runs, "settings": SEEDS, "best_epoch": 3}
    return conf


def needs(need: dict, cost: float = 0.01):
    """AUC 0.8, minus ``cost`` per halving a feature sits below what it needs."""
    return lambda dims: 0.8 - cost * sum(max(0.0, math.log2(n / dims[f])) for f, n in need.items())


def test_refine_halves_each_dim_down_to_what_it_needs(data):
    auc = needs({"a": 8, "b": 2})  # c is irrelevant
    fn, calls = surface(auc)
    ref = refine(confirmed(auc), data, SEEDS, ["a", "b", "c"], tolerance=0.002, retrain_fn=fn)
    assert ref.dims == {"a": 8, "b": 2, "c": 1, "pinned": 8}  # the unsearched feature is left alone
    assert ref.mean_auc == pytest.approx(0.8) and ref.floor == pytest.approx(0.798)
    steps = ref.steps
    assert steps["taken"].any() and steps.loc[steps["taken"], "holds"].all()
    # the proposals that failed are exactly the halvings below a need: a 8 -> 4 and b 2 -> 1, once each
    assert steps.iloc[0][["round", "changed", "holds", "taken"]].tolist() == [0, "start", True, True]
    assert calls[0] == [START]  # round 0: the pick itself, on the refinement's fresh seeds
    failed = steps.loc[~steps["holds"]].set_index("changed")
    assert sorted(failed.index) == ["a", "b"]
    assert failed.loc["a", "dim.a"] == 4 and failed.loc["b", "dim.b"] == 1
    assert len(calls) == 1 + 4 + 3  # round 0, rounds of proposals, plus a union in each of the first three
    assert ref.model_bytes == model_bytes(data.features, ref.dims, ModelConfig.hidden)
    assert ref.model_bytes < model_bytes(data.features, START, ModelConfig.hidden)


def test_refine_floor_is_fixed_so_small_losses_do_not_add_up(data):
    # every halving of a below 32 costs 0.0015, under the 0.002 tolerance one at a time, over it twice
    auc = needs({"a": 32}, cost=0.0015)
    fn, _ = surface(auc)
    ref = refine(confirmed(auc), data, SEEDS, ["a"], tolerance=0.002, retrain_fn=fn)
    assert ref.dims["a"] == 16
    assert ref.mean_auc >= ref.floor


def test_refine_takes_one_halving_when_the_union_fails(data):
    # a and b may each be halved alone, but halving both costs 0.01
    def auc(dims):
        return 0.8 - (0.01 if dims["a"] < 32 and dims["b"] < 16 else 0.0)

    fn, calls = surface(auc)
    ref = refine(confirmed(auc), data, SEEDS, ["a", "b"], tolerance=0.002, retrain_fn=fn)
    # round 1: a alone, b alone, a+b (fails) -> a, the larger saving (400 rows against 50), is taken
    assert [sorted(d.items()) for d in calls[2]] == [sorted({**START, "a": 16, "b": 8}.items())]
    assert ref.dims["b"] == 16 and ref.dims["a"] == 1  # b is closed when proposed again; a goes on alone
    union = ref.steps[ref.steps["changed"] == "a+b"]
    assert len(union) == 1 and not union["holds"].item() and not union["taken"].item()


@pytest.mark.slow
def test_confirm_refine_end_to_end_writes_and_logs_the_refined_recipe(ray_session, tmp_path_factory, tmp_path, capsys):
    result, uri, _, _ = small_search(tmp_path_factory)
    out = tmp_path / "confirm"
    argv = ["confirm", "small", "--seeds", "2", "--workers", "2", "--tracking-uri", uri, "--out", str(out),
            "--refine", "--refine-tolerance", "0.01"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    confirm = read_table(out / "confirm.csv")
    steps = read_table(out / "refine.csv")
    pick = confirm.loc[confirm["confirmed"]].iloc[0]
    recipe = Recipe.load(out / "refined.yaml")
    reviewed = load_review(result.parent_run_id, uri)
    searched = set(searched_features(reviewed))
    assert searched and searched <= {f.name for f in reviewed.extra["features"]}
    assert len(steps) >= len([f for f in searched if pick[f"dim.{f}"] > 1])  # round 1 proposes each open feature
    for f, d in recipe.model.dims.items():
        assert d <= pick[f"dim.{f}"] if f in searched else d == pick[f"dim.{f}"]
    start = steps[steps["round"] == 0]
    assert start["changed"].tolist() == ["start"] and start["model_bytes"].item() == pick["model_bytes"]
    floor = start["mean_auc"].item() - 0.01
    assert recipe.expected["seeds"] == [4, 5]  # fresh: after the search's seed (1) and the confirmation's 2, 3
    assert recipe.expected["floor_val_auc"] == pytest.approx(floor, abs=1e-5)
    assert recipe.expected["val_auc"] >= floor - 1e-9
    assert (steps["holds"] == (steps["mean_auc"] >= floor - 1e-5)).all()
    assert steps.loc[steps["taken"], "holds"].all()
    assert recipe.model_bytes() == recipe.expected["model_bytes"] <= pick["model_bytes"]
    assert recipe.provenance["refined_from"] == pick["trial_id"]
    metrics = MlflowClient(uri).get_run(reviewed.parent_run_id).data.metrics
    assert metrics["refined_model_bytes"] == recipe.expected["model_bytes"]
    assert metrics["refined_val_auc_mean"] == pytest.approx(recipe.expected["val_auc"])
    uploaded = {a.path for a in MlflowClient(uri).list_artifacts(result.parent_run_id, "confirm")}
    assert {"confirm/refine.csv", "confirm/refined.yaml"} <= uploaded
    assert "refined config: mean AUC" in text and str(out / "refined.yaml") in text
