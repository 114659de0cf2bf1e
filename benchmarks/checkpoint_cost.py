"""What a trial's per-epoch checkpoint costs next to the epoch itself.

Each epoch a trial (search/trial.py) takes the trainer's snapshot, writes it with torch.save to a temporary folder,
and Ray copies that folder into the experiment's storage. This script times those three steps for small, medium and
large dims on the synthetic data (and MovieLens 100K when present), against the epoch's training time.

    python benchmarks/checkpoint_cost.py [--rows 100000]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pipelines import ModelConfig, SyntheticSpec, TrainConfig, generate, prepare, train
from search.trial import save_checkpoint

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens-100k" / "ml-100k"


def measure(data, dim: int, epochs: int = 3) -> dict:
    model_cfg = ModelConfig({f.name: min(dim, f.cardinality) for f in data.features}, (64, 32))
    costs = []

    def on_epoch(r, snapshot):
        t0 = time.perf_counter()
        state = snapshot()
        state["best_model"] = None  # as the trial saves it
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as storage:
            path = save_checkpoint(Path(tmp), state, {"epoch": r.epoch})
            t2 = time.perf_counter()
            shutil.copytree(tmp, Path(storage) / "checkpoint")  # what Ray's persist does on local storage
            t3 = time.perf_counter()
            costs.append((r.seconds, t1 - t0, t2 - t1, t3 - t2, path.stat().st_size))

    train(model_cfg, TrainConfig(max_epochs=epochs, patience=0, threads=1), data, on_epoch=on_epoch)
    later = costs[1:]  # the first epoch warms up
    avg = [sum(c[i] for c in later) / len(later) for i in range(5)]
    return {"epoch_s": avg[0], "snapshot_s": avg[1], "save_s": avg[2], "copy_s": avg[3], "bytes": int(avg[4])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    sets = [("synthetic", prepare(generate(SyntheticSpec(rows=args.rows, seed=0))))]
    if ML100K.is_dir():
        from pipelines.load import load

        sets.append(("movielens-100k", prepare(load(str(ML100K)))))
    print(f"{'data':16s} {'dim':>4s} {'epoch s':>8s} {'ckpt s':>8s} {'ckpt/epoch':>10s} {'ckpt MB':>8s}"
          "   (snapshot / torch.save / copy to storage)")
    for name, data in sets:
        for dim in (8, 32, 64):
            m = measure(data, dim)
            total = m["snapshot_s"] + m["save_s"] + m["copy_s"]
            print(f"{name:16s} {dim:4d} {m['epoch_s']:8.3f} {total:8.4f} {total / m['epoch_s']:10.1%} "
                  f"{m['bytes'] / 1e6:8.2f}   ({m['snapshot_s']:.4f} / {m['save_s']:.4f} / {m['copy_s']:.4f})")


if __name__ == "__main__":
    main()
