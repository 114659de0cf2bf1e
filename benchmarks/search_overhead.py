"""Ray overhead of `embsize search`: the same fixed trials through the Ray path and sequentially in-process.

    python benchmarks/search_overhead.py [--trials 32] [--epochs 20] [--rounds 2]

Overhead = Ray wall / (sum of in-process trial times / CPUs). The Ray path is run_search (Ray Tune + OptunaSearch +
MLflow callback + FIFO), fed the fixed configs as labelled baselines so both sides train exactly the same configs.
Each round starts a local Ray as `embsize search` does (``cluster.start_local_ray``) right after creating a new project
MLflow store, both before the clock (a store is created once per project, Ray once per search; their times are printed
apart). The clock starts when ray.init returns, while Ray's prestarted workers may still be importing torch. The Ray
wall includes opening the store, trial workers starting, MLflow writes and the front/report at the end, and is split
into the start-up until the first trial runs, the trials, and the end. This machine's speed drifts by tens of percent
over minutes, so the Ray path and the in-process pass are alternated for ``--rounds`` rounds, each ratio taken within
its round, and the median is reported.

Each round also runs the trials on a plain process pool, one process per CPU, each handed the next trial when it is
free (as Tune's FIFO does), with the data loaded and torch imported before the clock: the floor any scheduler meets on
this machine (two trainers on two cores contend for caches and memory, and the last trials leave a core idle). Ray
wall / pool wall is then what Ray, Optuna and MLflow add over that floor.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine, movielens, scratch

FEATURES = ["user_id", "item_id", "age", "gender", "occupation", "zip"]


def fixed_configs(space, n: int, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    configs = {}
    for i in range(n):
        dims = {name: int(round(np.exp(rng.uniform(np.log(lo), np.log(hi))))) for name, (lo, hi) in space.ranges.items()}
        configs[f"fixed-{i}"] = space.encode(dims)
    return configs


def ray_round(data, space, configs, epochs: int, cpus: int) -> dict:
    """One pass of the fixed trials through run_search, in a new output folder and project store."""
    import ray

    from search import tracking
    from search.cluster import start_local_ray
    from search.runner import SearchSettings, run_search

    tmp, uri = scratch("overhead")
    # A project's MLflow store is created once (SQLite schema migrations, seconds of CPU), by its first search; every
    # later search opens it. Like Ray's start, its creation is timed apart, so the overhead is a search's steady state.
    t = time.perf_counter()
    tracking.client(uri).search_experiments(max_results=1)
    store_create = time.perf_counter() - t
    # A local Ray as `embsize search` starts it, new for each round, its start not counted either. The clock starts
    # as soon as ray.init returns, while its prestarted workers are still importing torch (cluster.start_local_ray).
    t = time.perf_counter()
    start_local_ray(True, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    settings = SearchSettings(name="overhead", trials=0, max_epochs=epochs, patience=0, scheduler="fifo",
                              tracking_uri=uri, output_dir=str(tmp), num_cpus=cpus)
    events: list[tuple[float, str]] = []
    t = time.perf_counter()
    result = run_search(data, space, settings, baselines=configs,
                        on_event=lambda kind, trial, res: events.append((time.perf_counter() - t, kind)))
    wall = time.perf_counter() - t
    ray.shutdown()
    assert len(result.trials) == len(configs)
    first_start = min(at for at, kind in events if kind == "start")
    last_done = max(at for at, kind in events if kind in ("completed", "failed"))
    return {"wall": wall, "start": first_start, "trials": last_done - first_start, "end": wall - last_done,
            "store_create": store_create, "ray_start": ray_start}


def trial_seconds(data, space, config: dict, epochs: int) -> float:
    """One fixed trial trained in this process on one thread, as a Ray trial trains it: its seconds."""
    from pipelines import train
    from search.trial import TrialSettings, train_config

    model_cfg, overrides = space.decode(config)
    t = time.perf_counter()
    train(model_cfg, train_config(TrialSettings(max_epochs=epochs, patience=0, cpus=1), overrides), data)
    return time.perf_counter() - t


def sequential_round(data, space, configs, epochs: int) -> float:
    """The same trials one after another in this process: the sum of their times."""
    return sum(trial_seconds(data, space, config, epochs) for config in configs.values())


_pool_data = None


def _pool_init(barrier) -> None:
    """A pool process: load the data and import the trainer before the clock, then wait for the others."""
    global _pool_data
    from search.space import SearchSpec, build_space

    data = movielens(FEATURES)
    _pool_data = data, build_space(data.features, SearchSpec(lr=0.003))
    barrier.wait()


def _pool_trial(item: tuple[dict, int]) -> float:
    config, epochs = item
    return trial_seconds(*_pool_data, config, epochs)


def pool_round(configs, epochs: int, cpus: int) -> tuple[float, float]:
    """(wall, sum of trial times) of the trials on ``cpus`` warm processes, each taking the next trial when free."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # not fork: this process has started torch's and Ray's threads
    barrier = ctx.Barrier(cpus + 1)
    with ctx.Pool(cpus, initializer=_pool_init, initargs=(barrier,)) as pool:
        barrier.wait()
        t = time.perf_counter()
        times = list(pool.imap_unordered(_pool_trial, [(c, epochs) for c in configs.values()], chunksize=1))
        wall = time.perf_counter() - t
    return wall, sum(times)



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="Ray and in-process passes, alternated")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from search.space import SearchSpec, build_space

    data = movielens(FEATURES)
    space = build_space(data.features, SearchSpec(lr=0.003))
    configs = fixed_configs(space, args.trials, args.seed)
    cpus = 2

    print(f"machine: {machine()}")
    print(f"{args.trials} fixed MovieLens 100K trials x {args.epochs} epochs, FIFO, {cpus} CPUs, 1 CPU per trial; "
          f"{args.rounds} rounds, each the Ray path then the same trials in process")
    print(f"{'round':>5} {'store*':>7} {'ray*':>5} {'in-proc sum':>11} {'ideal':>7} {'Ray wall':>9} {'overhead':>9} "
          f"{'start':>6} {'trials':>7} {'x ideal':>8} {'end':>5} {'pool wall':>10} {'x ideal':>8} {'Ray/pool':>9}")
    ratios, trial_ratios, floors, over_pool = [], [], [], []
    for i in range(args.rounds):
        r = ray_round(data, space, configs, args.epochs, cpus)
        seq = sequential_round(data, space, configs, args.epochs)
        pool_wall, _ = pool_round(configs, args.epochs, cpus)
        ideal = seq / cpus
        ratios.append(r["wall"] / ideal)
        trial_ratios.append(r["trials"] / ideal)
        floors.append(pool_wall / ideal)
        over_pool.append(r["wall"] / pool_wall)
        print(f"{i + 1:>5} {r['store_create']:6.1f}s {r['ray_start']:4.1f}s {seq:10.1f}s {ideal:6.1f}s "
              f"{r['wall']:8.1f}s {ratios[-1]:9.3f} "
              f"{r['start']:5.1f}s {r['trials']:6.1f}s {trial_ratios[-1]:8.3f} {r['end']:4.1f}s "
              f"{pool_wall:9.1f}s {floors[-1]:8.3f} {over_pool[-1]:9.3f}")
    print("* not counted: store, creating the project's MLflow store (once per project); ray, ray.init")
    print(f"overhead ratio (Ray wall / ideal), median of {args.rounds}: {float(np.median(ratios)):.3f}   "
          "(target <= 1.10)")
    print(f"  trials phase alone (first trial start .. last trial end) / ideal: {float(np.median(trial_ratios)):.3f}")
    print(f"  floor: the same trials on a warm {cpus}-process pool / ideal: {float(np.median(floors)):.3f}; "
          f"Ray wall / pool wall: {float(np.median(over_pool)):.3f}")
    print("  start: MLflow parent run, Tune start, trial workers importing torch; end: front, plots, MLflow artifacts")


if __name__ == "__main__":
    main()
