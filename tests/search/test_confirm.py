"""`embsize confirm`: the decision rule on injected per-seed AUCs, and one real end-to-end confirmation."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines.model import ModelConfig
from pipelines.recipe import Recipe
from search.cli import main
from search.confirm import RAY_OVERHEAD_S, Candidate, ConfirmSettings, decide, plan_workers, rebuild_data
from search.review import load_review

from .small_search import small_search
from .tables import read_table


def _cand(trial_id: str, size: int, single: float, label: str = "search") -> Candidate:
    return Candidate(trial_id, label, ModelConfig({"a": size // 100, "b": 2}), 3e-3, size, single)


# The single-seed winner "big" (0.820) is worse on average than "small" over three seeds: seed luck.
LUCKY = [_cand("tiny", 100, 0.700), _cand("small", 200, 0.800), _cand("big", 400, 0.820), _cand("sqrt", 800, 0.790, "√n")]
LUCKY_AUCS = {"tiny": [0.70, 0.71, 0.69], "small": [0.81, 0.82, 0.815], "big": [0.82, 0.78, 0.77],
              "sqrt": [0.79, 0.79, 0.80]}


def test_decide_flags_a_recommendation_that_wins_only_by_seed_luck():
    conf = decide(LUCKY, LUCKY_AUCS, recommended="big", rule="epsilon", epsilon=0.0)
    assert conf.seed_luck and conf.verdict == "seed luck"
    assert conf.challengers == ["small"]  # smaller and better on average beyond the noise ("sqrt" is within it)
    assert conf.confirmed == "small"
    row = conf.row("big")
    assert row["mean_auc"] == pytest.approx(0.79) and row["sd_auc"] == pytest.approx(0.026458, abs=1e-5)
    assert row["se_auc"] == pytest.approx(0.026458 / math.sqrt(3), abs=1e-5)
    assert list(conf.table["model_bytes"]) == [100, 200, 400, 800]



def test_confirm_names_candidates_by_their_runs_and_ray_ids():
    from dataclasses import replace

    from search.cli_review import _named

    named = [replace(c, run_name=f"trial-00{i}") if c.trial_id != "sqrt" else c for i, c in enumerate(LUCKY, 1)]
    conf = decide(named, LUCKY_AUCS, recommended="big", rule="epsilon", epsilon=0.0)
    assert conf.table["run"].tolist() == ["trial-001", "trial-002", "trial-003", "sqrt"]  # by size
    assert [_named(conf, i) for i in conf.challengers] == ["trial-002 (Ray trial small)"]
    assert _named(conf, "sqrt") == "sqrt"  # a run with no name (its writes failed): Ray's id alone


def test_decide_confirms_a_recommendation_that_holds_on_average():
    aucs = {**LUCKY_AUCS, "big": [0.82, 0.83, 0.825]}
    conf = decide(LUCKY, aucs, recommended="big", rule="epsilon", epsilon=0.0)
    assert (conf.seed_luck, conf.verdict, conf.confirmed, conf.challengers) == (False, "confirmed", "big", [])


def test_decide_does_not_call_noise_luck():
    # "small" beats "big" on mean by 0.007, inside the noise of the difference (0.016): re-picked, not flagged.
    aucs = {**LUCKY_AUCS, "small": [0.78, 0.83, 0.80], "big": [0.81, 0.79, 0.79]}
    conf = decide(LUCKY, aucs, recommended="big", rule="epsilon", epsilon=0.0)
    assert conf.confirmed == "small" and not conf.seed_luck and conf.verdict == "changed within noise"


def test_decide_gives_a_larger_challenger_the_epsilon_allowance():
    # "big" beats R = "small" on mean by 0.03: luck only if that exceeds the epsilon a larger model is allowed.
    aucs = {**LUCKY_AUCS, "small": [0.80, 0.80, 0.80], "big": [0.83, 0.83, 0.83]}
    assert not decide(LUCKY, aucs, "small", "epsilon", epsilon=0.04).seed_luck  # within the allowance
    flagged = decide(LUCKY, aucs, "small", "epsilon", epsilon=0.02)
    assert flagged.seed_luck and flagged.challengers == ["big"]
    assert not decide(LUCKY, aucs, "small", "knee").seed_luck  # the knee trades larger-and-better away


def test_decide_budget_rule_ignores_candidates_over_the_budget():
    aucs = {**LUCKY_AUCS, "big": [0.70, 0.70, 0.70], "sqrt": [0.90, 0.90, 0.90]}
    conf = decide(LUCKY, aucs, "big", "budget", budget=500)
    assert conf.challengers == ["small"] and conf.confirmed == "small"


def test_decide_refuses_bad_input():
    with pytest.raises(ValueError, match="recommended trial 'nope' is not among the candidates"):
        decide(LUCKY, LUCKY_AUCS, "nope")
    with pytest.raises(ValueError, match="candidate 'tiny' has fewer than 2 seed results"):
        decide(LUCKY, {**LUCKY_AUCS, "tiny": [0.7]}, "big")
    with pytest.raises(ValueError, match="seeds is 1, but must be >= 2"):
        ConfirmSettings(seeds=1)


def test_plan_workers_parallelizes_only_work_that_repays_starting_ray():
    quick = [replace(c, train_seconds=1.0) for c in LUCKY]  # 4 candidates x 3 seeds x 1 s = 12 s
    assert plan_workers(quick, seeds=3, cpus=2) == (1, 12.0)
    assert plan_workers(quick, seeds=3, cpus=2, extra=12) == (2, 48.0)  # --refine's retrains repay it
    slow = [replace(c, train_seconds=RAY_OVERHEAD_S) for c in LUCKY]
    assert plan_workers(slow, seeds=3, cpus=8) == (8, 12 * RAY_OVERHEAD_S)
    assert plan_workers(slow, seeds=3, cpus=1)[0] == 1
    assert plan_workers(LUCKY, seeds=2, cpus=4)[0] == 4  # unknown training time: assume it is long


@pytest.mark.slow
def test_confirm_end_to_end_retrains_and_logs_to_the_parent_run(ray_session, tmp_path_factory, tmp_path, capsys):
    result, uri, _, _ = small_search(tmp_path_factory)
    out = tmp_path / "confirm"
    assert main(["confirm", "small", "--seeds", "2", "--workers", "2", "--tracking-uri", uri, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    table = read_table(out / "confirm.csv")
    reviewed = load_review(result.parent_run_id, uri)
    heuristics = {r["trial_id"] for r in reviewed.trials if r["heuristic"] and r["outcome"] == "completed"}
    expected = {r["trial_id"] for r in reviewed.front} | heuristics | {reviewed.recommended["trial_id"]}
    assert set(table["trial_id"]) == expected
    assert table["recommended"].sum() == 1 and table["confirmed"].sum() == 1
    assert ((table["auc_seed0"] + table["auc_seed1"]) / 2 - table["mean_auc"]).abs().max() < 1e-4
    assert (table["sd_auc"] > 0).all()  # different seeds, different models
    confirmed = table.loc[table["confirmed"], "trial_id"].item()
    recipe = Recipe.load(out / "confirmed.yaml")
    assert recipe.provenance["trial_id"] == confirmed
    assert recipe.expected["seeds"] == [2, 3]  # the search's seed (1) + 1 ... + k
    assert recipe.model_bytes() == table.loc[table["confirmed"], "model_bytes"].item()
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert parent.data.tags["confirmed_trial"] == confirmed
    assert parent.data.metrics["confirmed_val_auc_mean"] == pytest.approx(table.loc[table["confirmed"], "mean_auc"].item())
    assert parent.data.metrics["confirm_seeds"] == 2
    uploaded = {a.path for a in MlflowClient(uri).list_artifacts(result.parent_run_id, "confirm")}
    assert {"confirm/confirm.csv", "confirm/confirmed.yaml"} <= uploaded  # (test_refine adds refine files to the run)
    named = {r["trial_id"]: r["run_name"] for r in reviewed.trials}
    assert table["run"].tolist() == [named[t] for t in table["trial_id"]]  # the names the MLflow UI lists
    assert f"confirmed recommendation {named[confirmed]} (Ray trial {confirmed})" in text
    assert parent.data.tags["confirm_verdict"] in text


@pytest.mark.slow
def test_confirm_rebuilt_data_must_match_the_searchs_fingerprint(ray_session, tmp_path_factory):
    result, uri, _, _ = small_search(tmp_path_factory)
    reviewed = load_review(result.parent_run_id, uri)
    assert rebuild_data(reviewed).fingerprint == reviewed.extra["params"]["dataset.fingerprint"]
    with pytest.raises(ValueError, match="but the search trained on"):
        rebuild_data(reviewed, "synthetic", synthetic_rows=5_000)


def test_confirm_data_that_moved_says_to_pass_data(tmp_path):
    """The run records the searched file's absolute path; once it moved, the fix is --data (the message was the
    generic "give a MovieLens folder/zip, a CSV/Parquet file, or 'synthetic'")."""
    from types import SimpleNamespace

    gone = tmp_path / "events.csv"
    reviewed = SimpleNamespace(extra={"params": {"dataset.source": str(gone), "dataset.label": "clicked",
                                                 "dataset.features": "user_id,item_id"}})
    with pytest.raises(ValueError, match=f"the search's data '{gone}' does not exist .*; pass where that data is "
                                         "now with --data"):
        rebuild_data(reviewed)


def _clicks(path, n: int = 600) -> None:
    """A table whose label is text (click/noclick) and learnable from both features."""
    rng = np.random.default_rng(0)
    user, item = rng.integers(0, 20, n), rng.integers(0, 12, n)
    p = 1 / (1 + np.exp(-(1.5 * (user % 3 - 1) + (item % 2 - 0.5))))
    pd.DataFrame({"user": [f"u{u}" for u in user], "item": [f"i{i}" for i in item],
                  "y": np.where(rng.random(n) < p, "click", "noclick")}).to_csv(path, index=False)


@pytest.mark.slow
def test_confirm_and_train_reread_a_table_as_its_search_read_it(ray_session, tmp_path, monkeypatch, capsys):
    """`embsize search` of a ';'-delimited CSV with a click/noclick label (--positive-label click): the search records
    how it read the table, so `embsize confirm NAME` and `embsize train --config` with no data option rebuild the same
    data (same fingerprint, hence the same 0/1 labels); another positive value is refused in one line, nothing
    written."""
    csv = tmp_path / "clicks.csv"
    _clicks(csv)
    csv.write_text(csv.read_text().replace(",", ";"))
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--data", str(csv), "--label", "y", "--features", "user,item", "--delimiter", ";",
                 "--positive-label", "click", "--trials", "2", "--max-epochs", "2", "--no-heuristics", "--max-dim",
                 "4", "--name", "clicks", "--tracking-uri", uri])
    searched = capsys.readouterr()
    assert code == 0, searched.err[-2000:]
    reviewed = load_review("clicks", uri)
    p = reviewed.extra["params"]
    fingerprint = p["dataset.fingerprint"]
    assert (p["dataset.label"], p["dataset.features"], p["dataset.delimiter"], p["dataset.positive_label"]) == (
        "y", "user,item", ";", "click")

    out = tmp_path / "confirm"  # no data option: the table and how to read it come from the search's run
    code = main(["confirm", "clicks", "--seeds", "2", "--workers", "1", "--tracking-uri", uri, "--out", str(out)])
    confirmed = capsys.readouterr()
    assert code == 0, confirmed.err[-2000:]
    assert "fingerprint" not in confirmed.out + confirmed.err
    assert Recipe.load(out / "confirmed.yaml").dataset["fingerprint"] == fingerprint
    assert Recipe.load(out / "confirmed.yaml").dataset["positive_label"] == "click"
    assert set(read_table(out / "confirm.csv")["trial_id"]) >= {reviewed.recommended["trial_id"]}
    assert MlflowClient(uri).get_run(reviewed.parent_run_id).data.tags["confirmed_trial"] in confirmed.out

    code = main(["train", "--config", str(out / "confirmed.yaml"), "--tracking-uri", uri])
    trained = capsys.readouterr()
    assert code == 0, trained.err[-2000:]
    assert "fingerprint" not in trained.err  # the same data: no "differs from the search's" warning
    assert (f"data: {csv}, split=random, seed=0, min_freq=1, label=y, features=user,item, positive_label=click, "
            "delimiter=; (the config's)") in trained.out
    final_id = trained.out.split("MLflow run ", 1)[1].split()[0]
    for run_id, context in ((reviewed.parent_run_id, "search"), (final_id, "training")):
        (used,) = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs  # the MLflow UI's "Datasets used"
        assert (used.dataset.name, used.dataset.digest, used.dataset.source_type) == ("clicks", fingerprint, "local")
        assert str(csv) in used.dataset.source and used.tags[0].value == context

    elsewhere = tmp_path / "refused"  # the other value: other labels, so another fingerprint
    assert main(["confirm", "clicks", "--positive-label", "noclick", "--tracking-uri", uri, "--out",
                 str(elsewhere)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("embsize: error: ") and f"but the search trained on {fingerprint}" \
        in lines[0], err
    assert not elsewhere.exists()


def _hold(out: str, ready) -> None:
    import time
    from pathlib import Path

    from search.resume import claimed

    with claimed(Path(out), "small"):
        ready.set()
        time.sleep(120)  # until killed


def test_confirm_refuses_a_search_running_on_this_machine_and_report_warns(ray_session, tmp_path_factory, tmp_path,
                                                                           capsys):
    # the parent run still RUNNING and its folder held by a live driver: confirm's retrains would compete with the
    # search's trials and judge a front still moving; report goes on and says what it covers
    import multiprocessing as mp

    result, uri, out_dir, _ = small_search(tmp_path_factory)
    c = MlflowClient(uri)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(out_dir / "small"), ready))
    c.update_run(result.parent_run_id, status="RUNNING")
    try:
        holder.start()
        assert ready.wait(timeout=60)
        assert main(["confirm", "small", "--tracking-uri", uri, "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == "embsize: error: search 'small' is running now on this machine; confirm it when it has ended"
        assert not (tmp_path / "c").exists()
        assert main(["report", "small", "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-log"]) == 0
        err = capsys.readouterr().err
        assert "embsize: warning: search 'small' is still running (or its driver was killed): this covers the " in err
    finally:
        holder.kill()
        holder.join(timeout=30)
        c.update_run(result.parent_run_id, status="FINISHED")


@pytest.mark.slow
def test_confirm_retrains_as_a_sparse_search_trained(ray_session, tmp_path, monkeypatch, capsys):
    """A search run with --sparse (lazy Adam) is confirmed with lazy Adam too: each retrain equals `train` with
    sparse=True at that seed (not the dense one, which learns differently), and the confirmed recipe says so."""
    from pipelines import TrainConfig, prepare, train
    from pipelines.load import load
    from search.review import trial_setup

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["search", "--rows", "4000", "--trials", "2", "--max-epochs", "2", "--max-dim", "6", "--sparse",
                 "--name", "sp", "--tracking-uri", uri]) == 0
    out = tmp_path / "confirm"
    assert main(["confirm", "sp", "--seeds", "2", "--workers", "1", "--tracking-uri", uri, "--out", str(out)]) == 0
    capsys.readouterr()
    recipe = Recipe.load(out / "confirmed.yaml")
    assert recipe.train.sparse is True
    reviewed = load_review("sp", uri)
    assert reviewed.extra["settings"]["sparse"] is True
    table = read_table(out / "confirm.csv").set_index("trial_id")
    trial = next(r for r in reviewed.trials if r["trial_id"] == table.index[0])
    model, overrides = trial_setup(reviewed, trial)
    data = prepare(load("synthetic", synthetic_rows=4000, seed=0), seed=0)
    cfg = TrainConfig(lr=overrides["lr"], max_epochs=2, patience=3, seed=1, threads=1)
    sparse, dense = (train(model, replace(cfg, sparse=s), data).best_val_auc for s in (True, False))
    assert table.loc[table.index[0], "auc_seed0"] == pytest.approx(sparse, abs=1e-5)
    assert abs(sparse - dense) > 1e-5  # else this would not tell the two apart
