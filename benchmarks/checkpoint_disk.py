"""Disk held by trial checkpoints during a search, with the checkpoints no saved Ray state needs deleted as it runs
(search/checkpoints.py) and with every one kept until the end (as before).

    python benchmarks/checkpoint_disk.py [--trials 32] [--epochs 10] [--dim-cap 64] [--rounds 2]

The same MovieLens 100K search (FIFO, a checkpoint every epoch: ``--checkpoint-every 0``) runs with the pruner and
with it switched off, alternated over ``--rounds`` (after an untimed warm-up search: the first search of a process
pays for the workers' imports). A thread sums the sizes of the experiment's checkpoint folders every 0.1 s: the peak
is the disk a search needs for them, and every folder seen is what the trials wrote. Ray saves its experiment state
every 10 s at least ("auto"), so pruning lags that much behind the trials: the longer the search, the larger the
saving.
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from _common import machine, movielens, scratch

FEATURES = ["user_id", "item_id", "age", "gender", "occupation", "zip"]


def _sizes(experiment: Path) -> dict[str, int]:
    sizes = {}
    for ckpt in experiment.glob("*/checkpoint_*"):
        try:
            sizes[str(ckpt)] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        except OSError:  # deleted meanwhile
            continue
    return sizes


def run(data, space, trials: int, epochs: int, prune: bool) -> dict:
    from search import checkpoints
    from search.runner import SearchSettings, run_search

    tmp, uri = scratch("ckpt-disk")
    settings = SearchSettings(name="disk", trials=trials, max_epochs=epochs, patience=0, scheduler="fifo",
                              heuristics=False, tracking_uri=uri, output_dir=str(tmp), checkpoint_seconds=0.0)
    experiment = Path(settings.storage) / settings.name
    peak, seen, done = 0, {}, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            sizes = _sizes(experiment)
            peak = max(peak, sum(sizes.values()))
            seen.update(sizes)
            time.sleep(0.1)

    watcher = threading.Thread(target=sample, daemon=True)
    original = checkpoints.Pruner.on_step_end
    if not prune:
        checkpoints.Pruner.on_step_end = lambda self, iteration, trials, **info: None
    t = time.perf_counter()
    watcher.start()
    try:
        result = run_search(data, space, settings)
    finally:
        done.set()
        watcher.join()
        checkpoints.Pruner.on_step_end = original
    return {"wall": time.perf_counter() - t, "peak": peak, "written": sum(seen.values()), "count": len(seen),
            "trials": len(result.trials)}


def main() -> None:
    import ray

    from search.space import SearchSpec, build_space

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--dim-cap", type=int, default=64, help="the space's largest dim (bigger: bigger checkpoints)")
    args = ap.parse_args()
    data = movielens(FEATURES)
    space = build_space(data.features, SearchSpec(lr=0.003, max_dim=args.dim_cap))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"machine: {machine()}")
    print(f"MovieLens 100K, {args.trials} trials x {args.epochs} epochs (FIFO), a checkpoint every epoch")
    run(data, space, 2, 1, True)  # warm-up
    print(f"{'round':<6} {'checkpoints':<22} {'peak on disk':>13} {'written':>10} {'folders':>8} {'wall':>7}")
    peaks, walls = [], []
    for i in range(args.rounds):
        order = [("pruned as it runs", True), ("all kept to the end", False)]
        rows = {name: run(data, space, args.trials, args.epochs, prune)
                for name, prune in (order if i % 2 == 0 else order[::-1])}
        for name, r in rows.items():
            print(f"{i + 1:<6} {name:<22} {r['peak'] / 1e6:10.1f} MB {r['written'] / 1e6:7.1f} MB {r['count']:8d} "
                  f"{r['wall']:6.1f}s")
        kept, pruned = rows["all kept to the end"], rows["pruned as it runs"]
        peaks.append(pruned["peak"] / kept["peak"])
        walls.append(pruned["wall"] / kept["wall"])
    print(f"peak disk, pruned / kept: {', '.join(f'{x:.3f}' for x in peaks)}; "
          f"wall, pruned / kept: {', '.join(f'{x:.3f}' for x in walls)}")


if __name__ == "__main__":
    main()
