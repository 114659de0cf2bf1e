"""Scale: the trainer and the search's trials at 10 M rows with one field of 1 M categories.

The dataset is the synthetic generator (chunked) with MovieLens-100K-sized fields (user_id 943, item_id 1682,
occupation 21, age 7) and ad_id with 1 M categories (long tail: Zipf 0.6, so nearly all of them occur).

1. Throughput: ``pipelines.train`` training samples/s (1 thread, batch 1024, dims 16, hidden 64-32, like
   benchmarks/throughput.py) on MovieLens 100K (six features) and at scale, with dense Adam and with sparse
   gradients (``TrainConfig(sparse=True)``: lazy Adam on the rows a batch touches, as torch.optim.SparseAdam).
   Target: scale / MovieLens >= 0.5.
2. Memory: peak total memory of the trial worker processes, two concurrent trials against one, through the search's
   own path (Ray Tune, ``tune.with_parameters(run_trial, data=...)``: the dataset is put in the object store once).
   Summed both as RSS (what `ps` shows; pages of the shared object store count once per process that maps them) and
   as PSS (shared pages split between the processes sharing them, so their sum counts the data once).
   Target: two / one <= 1.3.

    pip install psutil            # only this benchmark needs it
    python benchmarks/scale.py [--rows 10000000] [--epochs 1] [--skip-throughput] [--skip-memory]

Needs ~6 GB of RAM at 10 M rows (generation, one dataset copy in the driver and one in Ray's object store, two trials).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time

from _common import ML100K, machine

ML_FEATURES = ["user_id", "item_id", "age", "gender", "occupation", "zip"]
DIM, HIDDEN, BATCH, LR = 16, (64, 32), 1024, 3e-3


def scale_dataset(rows: int, seed: int = 0):
    from pipelines import PlantedFeature, SyntheticSpec, generate, prepare

    features = (
        PlantedFeature("user_id", 943, 8),
        PlantedFeature("item_id", 1682, 8),
        PlantedFeature("occupation", 21, 2),
        PlantedFeature("age", 7, 2),
        PlantedFeature("ad_id", 1_000_000, 8, zipf=0.6),
    )
    return prepare(generate(SyntheticSpec(features=features, rows=rows, seed=seed)), seed=seed)


def train_rate(data, sparse: bool, epochs: int) -> tuple[float, float]:
    """(median training samples/s over the epochs, validation AUC of the last epoch)."""
    from pipelines import ModelConfig, TrainConfig, train

    cfg = TrainConfig(lr=LR, batch_size=BATCH, max_epochs=epochs, patience=0, sparse=sparse, threads=1)
    result = train(ModelConfig(dict.fromkeys(data.feature_names, DIM), HIDDEN), cfg, data, device="cpu")
    return statistics.median(h.samples_per_s for h in result.history), result.history[-1].val_auc


def data_bytes(data) -> int:
    return sum(c.values.nbytes + (c.offsets.nbytes if c.offsets is not None else 0) + s.label.nbytes
               for s in (data.train, data.val, data.test) for c in s.columns.values())


class TrialMemory:
    """Samples, every ``every`` seconds, the summed RSS and PSS of this process's Ray trial workers (Tune's trainable
    actors, ``ray::ImplicitFunc``); other people's Ray processes on the machine are not descendants, so not counted."""

    def __init__(self, every: float = 0.25):
        import psutil

        self.me, self.every = psutil.Process(), every
        self.peak_rss = self.peak_pss = 0
        self.peak_all = 0  # PSS of the driver and every Ray process it started (raylet and object store, workers)
        self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TrialMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every):
            rss = pss = total = n = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    m = p.memory_full_info()
                    total += m.pss
                    if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::ImplicitFunc"):
                        rss, pss, n = rss + m.rss, pss + m.pss, n + 1
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_all, self.workers = max(self.peak_all, total), max(self.workers, n)


def trials_memory(data, concurrent: int, epochs: int) -> TrialMemory:
    """Run ``concurrent`` identical trials at once through Ray Tune and the search's trial function."""
    from ray import tune

    from search.space import SearchSpec, build_space
    from search.trial import TrialSettings, run_trial

    space = build_space(data.features, SearchSpec(lr=LR))
    config = space.encode(dict.fromkeys(data.feature_names, 8))
    settings = TrialSettings(max_epochs=epochs, patience=0, batch_size=BATCH, lr=LR, cpus=1, sparse=True)
    trainable = tune.with_parameters(run_trial, data=data.for_training(), space=space, settings=settings)  # once
    trainable = tune.with_resources(trainable, {"cpu": 1})
    storage = tempfile.mkdtemp(prefix="embsize-scale-")
    tuner = tune.Tuner(
        trainable,
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=concurrent, max_concurrent_trials=concurrent, reuse_actors=False),
        run_config=tune.RunConfig(name=f"scale-{concurrent}", storage_path=storage, verbose=0),
    )
    with TrialMemory() as mem:
        grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"a trial failed: {errors[0]}")
    return mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per measurement at scale")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    print(machine())

    t = time.perf_counter()
    data = scale_dataset(args.rows)
    print(f"{data.summary()}\n  generated and encoded in {time.perf_counter() - t:.0f} s; "
          f"{data_bytes(data) / 1e6:,.0f} MB of encoded arrays\n")

    if not args.skip_throughput:
        from _common import movielens

        if not ML100K.is_dir():
            raise SystemExit(f"MovieLens 100K not found at {ML100K}; this benchmark needs ../shared/data")
        ml = movielens(ML_FEATURES)
        print(f"training samples/s (1 thread, batch {BATCH}, dims {DIM}, hidden {HIDDEN}; median over epochs):")
        ml_dense, ml_auc = train_rate(ml, sparse=False, epochs=3)
        ml_sparse, _ = train_rate(ml, sparse=True, epochs=3)
        print(f"  MovieLens 100K, dense Adam  {ml_dense:>12,.0f}   (val AUC {ml_auc:.4f}): the reference")
        print(f"  MovieLens 100K, sparse      {ml_sparse:>12,.0f}")
        for label, sparse in (("dense Adam", False), ("sparse (lazy Adam)", True)):
            rate, auc = train_rate(data, sparse=sparse, epochs=args.epochs)
            verdict = "meets" if rate / ml_dense >= 0.5 else "misses"
            print(f"  {args.rows / 1e6:g} M rows, {label:18s} {rate:>12,.0f}   (val AUC {auc:.4f})  "
                  f"ratio {rate / ml_dense:.2f} to MovieLens: {verdict} the >= 0.5 target")
        print()

    if not args.skip_memory:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        print(f"trial workers' peak memory, {args.epochs} epoch(s) of sparse training per trial "
              f"(dataset {data_bytes(data) / 1e6:,.0f} MB, in the object store once):")
        one = trials_memory(data, 1, args.epochs)
        two = trials_memory(data, 2, args.epochs)
        ray.shutdown()
        for label, m in (("one trial", one), ("two concurrent trials", two)):
            print(f"  {label:22s} {m.workers} worker(s)   RSS sum {m.peak_rss / 1e6:>8,.0f} MB   "
                  f"PSS sum {m.peak_pss / 1e6:>8,.0f} MB   whole search (PSS) {m.peak_all / 1e6:>8,.0f} MB")
        print(f"  ratio two / one by trial workers' RSS: {two.peak_rss / one.peak_rss:.2f} (each worker's RSS counts "
              "the shared dataset pages again)")
        print(f"  ratio two / one by trial workers' PSS: {two.peak_pss / one.peak_pss:.2f}")
        ratio = two.peak_all / one.peak_all
        print(f"  ratio two / one by whole search's PSS: {ratio:.2f} (the machine's memory, shared pages counted once: "
              f"{'meets' if ratio <= 1.3 else 'misses'} the <= 1.3 target)")


if __name__ == "__main__":
    main()
