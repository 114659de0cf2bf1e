"""The MLflow store: a new SQLite store opened by several processes at once (search/tracking.py)."""
from __future__ import annotations

import multiprocessing as mp


def _open_and_write(uri: str, barrier, i: int, results) -> None:
    try:
        from search import tracking

        barrier.wait(timeout=60)  # every process opens the store at the same moment
        c = tracking.client(uri)
        exp = tracking.ensure_experiment(c, f"e{i}", uri)
        run = c.create_run(exp)
        c.log_metric(run.info.run_id, "x", float(i))
        c.set_terminated(run.info.run_id)
        results.put((i, "ok"))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((i, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def test_a_new_sqlite_store_opened_by_four_processes_at_once(tmp_path):
    # MLflow creates and migrates a new SQLite store's tables on first open, unlocked; two searches started together
    # in a new project raced on it ("no such column" in the second) before tracking.client serialized the first open
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_and_write, args=(uri, barrier, i, results)) for i in range(4)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == {i: "ok" for i in range(4)}

    from search import tracking

    c = tracking.client(uri)
    names = {e.name for e in c.search_experiments()}
    assert {f"e{i}" for i in range(4)} <= names
    for i in range(4):
        exp = c.get_experiment_by_name(f"e{i}")
        (run,) = c.search_runs([exp.experiment_id])
        assert run.data.metrics["x"] == float(i) and run.info.status == "FINISHED"
