"""One small real search (Ray + Optuna + MLflow SQLite), run once per test session and shared by the review tests
(report, confirm, MLflow UI): they only read it or add to its parent run."""
from __future__ import annotations

from pathlib import Path

from pipelines import prepare
from pipelines.load import load

ROWS, SEED = 6_000, 1  # the default synthetic dataset (what `embsize search --rows 6000 --seed 1` trains on)
_CACHE: dict = {}


def small_search(tmp_path_factory) -> tuple:
    """(SearchResult, tracking URI, out dir, workdir): 12 sampled trials + 5 baselines, <= 3 epochs, ASHA stopping
    (4-5 sampled trials complete: sensitivity needs 4)."""
    if "result" not in _CACHE:
        from search.runner import SearchSettings, run_search
        from search.space import SearchSpec, build_space

        work = tmp_path_factory.mktemp("small-search")
        uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
        data = prepare(load("synthetic", synthetic_rows=ROWS, seed=SEED), seed=SEED)
        space = build_space(data.features, SearchSpec(max_dim=16))
        settings = SearchSettings(name="small", trials=12, max_epochs=3, patience=0, grace_period=1,
                                  reduction_factor=2, scheduler="asha", tracking_uri=uri, seed=SEED,
                                  output_dir=str(work / "embsize-out"))
        info = {"source": "synthetic", "split": "random", "min_freq": 1, "seed": SEED, "rows": ROWS}
        _CACHE["result"] = (run_search(data, space, settings, info), uri, Path(settings.output_dir), work)
        _CACHE["data"] = data
    return _CACHE["result"]


def small_data():
    return _CACHE["data"]
