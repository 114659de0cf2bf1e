"""Does the search recover planted dims? A search on synthetic data whose features have known latent dims.

    python benchmarks/planted_recovery.py [--trials 32] [--epochs 12] [--rows 200000]

Prints planted against recommended dims per feature. Target: within x2 for >= 80 % of the features (a feature
planted at dim 0, i.e. irrelevant, counts as recovered when it gets the smallest dim searched, or 2 at most).
"""
from __future__ import annotations

import argparse
import time

from _common import machine, scratch

from pipelines.synthetic import PlantedFeature

# Planted dims spread over powers of two, so "within x2" separates them; categories are seen often enough to learn.
FEATURES = (
    PlantedFeature("user_id", 1500, 16, zipf=0.6),
    PlantedFeature("item_id", 1200, 8, zipf=0.6),
    PlantedFeature("category", 200, 4, zipf=0.6),
    PlantedFeature("region", 60, 2, zipf=0.6),
    PlantedFeature("tags", 400, 8, multi=True, zipf=0.6),
    PlantedFeature("noise", 300, 0, zipf=0.6),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheduler", default="pareto-asha")
    args = ap.parse_args()

    from pipelines import SyntheticSpec, generate, prepare
    from search.runner import SearchSettings, run_search
    from search.space import build_space

    raw = generate(SyntheticSpec(features=FEATURES, rows=args.rows, seed=args.seed))
    data = prepare(raw, seed=args.seed)
    space = build_space(data.features)
    tmp, uri = scratch("planted")
    t0 = time.perf_counter()
    settings = SearchSettings(name="planted", trials=args.trials, max_epochs=args.epochs, scheduler=args.scheduler,
                              seed=args.seed, tracking_uri=uri, output_dir=str(tmp))
    result = run_search(data, space, settings, {"source": "synthetic"})
    wall = time.perf_counter() - t0

    planted = raw.meta["planted_dims"]
    recommended = result.recommended["dims"]
    print(f"machine: {machine()}")
    print(f"{args.rows:,} rows, {args.trials} trials, <= {args.epochs} epochs, {args.scheduler}: wall {wall:.1f} s; "
          f"recommended val AUC {result.recommended['best_val_auc']:.4f}")
    print(f"{'feature':<12}{'planted':>9}{'recommended':>13}{'ratio':>8}  within x2")
    hits = 0
    for name, p in planted.items():
        r = recommended[name]
        ok = (r <= max(2, space.ranges.get(name, (1, 1))[0])) if p == 0 else (p / 2 <= r <= 2 * p)
        hits += ok
        ratio = f"{r / p:.2f}" if p else "-"
        print(f"{name:<12}{p:>9}{r:>13}{ratio:>8}  {'yes' if ok else 'no'}")
    share = hits / len(planted)
    print(f"recovered within x2: {hits}/{len(planted)} = {share:.0%} (target >= 80 %) {'MET' if share >= 0.8 else 'MISSED'}")


if __name__ == "__main__":
    main()
