"""A 32-trial search on MovieLens 100K, then the recommendation against the rules of thumb on the test split.

    python benchmarks/movielens_front.py [--trials 32] [--epochs 20] [--seeds 3]

Prints the search wall time (Ray start included; target <= 90 s on 2 cores), then retrains the recommended config
and every heuristic config with 3 seeds and prints test AUC (mean ± sd) and embedding bytes. Targets: the
recommendation's test AUC >= that of √n, min(50, n/2) and fastai at <= 25 % of their embedding bytes, and >= the
n^0.25 config's AUC + 0.005.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine, movielens, scratch


def test_auc(data, space, config: dict, seed: int, epochs: int) -> float:
    from pipelines import train
    from pipelines.train import SplitTensors, evaluate
    from search.trial import TrialSettings, train_config

    model_cfg, overrides = space.decode(config)
    result = train(model_cfg, train_config(TrialSettings(max_epochs=epochs, seed=seed, cpus=2), overrides), data)
    auc, _ = evaluate(result.model, SplitTensors(data.test, result.model, next(result.model.parameters()).device))
    return auc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scheduler", default="pareto-asha")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from search.heuristics import HEURISTICS
    from search.runner import SearchSettings, heuristic_configs, run_search
    from search.space import build_space

    data = movielens()
    space = build_space(data.features)
    tmp, uri = scratch("front")
    settings = SearchSettings(name="ml100k", trials=args.trials, max_epochs=args.epochs, scheduler=args.scheduler,
                              tracking_uri=uri, output_dir=str(tmp))
    result = run_search(data, space, settings, {"source": "movielens-100k"})
    wall = time.perf_counter() - t0

    from pipelines.memory import embedding_bytes

    def emb(config: dict) -> int:
        return sum(embedding_bytes(data.features, space.decode(config)[0].dims).values())

    configs = {"recommended": result.recommended["config"], **heuristic_configs(data, space, None)}
    rows = {}
    for label, config in configs.items():
        aucs = [test_auc(data, space, config, seed, args.epochs) for seed in range(args.seeds)]
        rows[label] = (float(np.mean(aucs)), float(np.std(aucs)), emb(config))

    print(f"machine: {machine()}")
    print(f"search: {args.trials} trials + {len(configs) - 1} baselines, <= {args.epochs} epochs, {args.scheduler}; "
          f"wall {wall:.1f} s including data load and Ray start (target <= 90 s)")
    print(f"recommended dims: {result.recommended['dims']}")
    print()
    print(f"{'config':<22}{'test AUC (mean ± sd)':>24}{'embedding bytes':>18}{'rec bytes / this':>18}")
    rec_auc, _, rec_bytes = rows["recommended"]
    for label, (mean, sd, nbytes) in rows.items():
        name = HEURISTICS.get(label, label)
        print(f"{name:<22}{mean:>16.4f} ± {sd:.4f}{nbytes:>18,}{rec_bytes / nbytes:>18.2f}")
    print()
    for rule in ("sqrt", "half50", "fastai"):
        mean, _, nbytes = rows[rule]
        ok = rec_auc >= mean and rec_bytes <= 0.25 * nbytes
        print(f"vs {HEURISTICS[rule]:<20} AUC {rec_auc - mean:+.4f}, bytes {rec_bytes / nbytes:.2f}x  "
              f"(target: AUC >= , bytes <= 0.25x) {'MET' if ok else 'MISSED'}")
    mean = rows["google"][0]
    print(f"vs {HEURISTICS['google']:<20} AUC {rec_auc - mean:+.4f}  (target >= +0.005) "
          f"{'MET' if rec_auc >= mean + 0.005 else 'MISSED'}")


if __name__ == "__main__":
    main()
