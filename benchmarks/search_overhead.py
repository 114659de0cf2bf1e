"""Ray overhead of `embsize search`: the same fixed trials through the Ray path and sequentially in-process.

    python benchmarks/search_overhead.py [--trials 16] [--epochs 10]

Overhead = Ray wall / (sum of in-process trial times / CPUs). The Ray path is run_search (Ray Tune + OptunaSearch +
MLflow callback + FIFO), fed the fixed configs as labelled baselines so both sides train exactly the same configs.
Ray is started before the clock (its start is printed separately); the Ray wall includes worker start-up, MLflow
writes and the front/report at the end, and is split into the start-up until the first trial runs, the trials, and
the end.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine, movielens, scratch


def fixed_configs(space, n: int, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    configs = {}
    for i in range(n):
        dims = {name: int(round(np.exp(rng.uniform(np.log(lo), np.log(hi))))) for name, (lo, hi) in space.ranges.items()}
        configs[f"fixed-{i}"] = space.encode(dims)
    return configs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray

    from pipelines import train
    from search.runner import SearchSettings, run_search
    from search.space import SearchSpec, build_space
    from search.trial import TrialSettings, train_config

    data = movielens(["user_id", "item_id", "age", "gender", "occupation", "zip"])
    space = build_space(data.features, SearchSpec(lr=0.003))
    configs = fixed_configs(space, args.trials, args.seed)
    cpus = 2

    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t

    tmp, uri = scratch("overhead")
    settings = SearchSettings(name="overhead", trials=0, max_epochs=args.epochs, patience=0, scheduler="fifo",
                              tracking_uri=uri, output_dir=str(tmp))
    events: list[tuple[float, str]] = []
    t = time.perf_counter()
    result = run_search(data, space, settings, baselines=configs,
                        on_event=lambda kind, trial, res: events.append((time.perf_counter() - t, kind)))
    ray_wall = time.perf_counter() - t
    first_start = min(at for at, kind in events if kind == "start")
    last_done = max(at for at, kind in events if kind in ("completed", "failed"))
    assert len(result.trials) == args.trials

    ts = TrialSettings(max_epochs=args.epochs, patience=0, cpus=1)
    times = []
    for config in configs.values():
        model_cfg, overrides = space.decode(config)
        t = time.perf_counter()
        train(model_cfg, train_config(ts, overrides), data)
        times.append(time.perf_counter() - t)
    ideal = sum(times) / cpus

    print(f"machine: {machine()}")
    print(f"{args.trials} fixed MovieLens 100K trials x {args.epochs} epochs, FIFO, {cpus} CPUs, 1 CPU per trial")
    print(f"ray start (not counted)          {ray_start:8.1f} s")
    print(f"sum of in-process trial times    {sum(times):8.1f} s  (mean {np.mean(times):.2f} s per trial)")
    print(f"ideal parallel wall (sum / CPUs) {ideal:8.1f} s")
    print(f"Ray path wall (run_search)       {ray_wall:8.1f} s")
    print(f"overhead ratio                   {ray_wall / ideal:8.3f}   (target <= 1.10)")
    print("where the Ray path's wall goes:")
    print(f"  until the first trial runs       {first_start:8.1f} s  (MLflow store opening, Tune start, trial workers "
          "importing torch)")
    print(f"  trials (first start..last end)   {last_done - first_start:8.1f} s  = {(last_done - first_start) / ideal:.3f}"
          " x the ideal parallel wall")
    print(f"  after the last trial             {ray_wall - last_done:8.1f} s  (front, plots, MLflow artifacts)")


if __name__ == "__main__":
    main()
