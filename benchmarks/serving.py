"""Serving throughput: the registered pyfunc model scoring raw rows in batches of 1, 100 and 10,000.

The model is a MovieLens 100K model (``../shared/data/movielens-100k`` when present, else 100,000 synthetic rows),
trained one epoch, exported, logged and registered in a throwaway SQLite MLflow store, and loaded back with
``mlflow.pyfunc.load_model("models:/bench/1")``: the same path a production caller takes. Batches are random raw rows
of the source table (strings, ints, multi-valued genre cells). For each batch size it prints rows/s of
``pyfunc.predict`` and the per-row cost split into: encoding (``Encoder.transform``: vocabulary lookups, vectorised
per column), the model (input layout + forward), and the rest (column checks, MLflow's wrapper, the output frame).
A per-row Python dict lookup of the same vocabularies is timed too: the vectorised encoder should beat it by a wide
margin at 10,000 rows, which is what "vectorisation holds" means here. Frames of up to ``Encoder.SMALL_FRAME`` rows
(512) are encoded cell by cell, without pandas' per-column overhead: that is what an online request of one row costs.

    python benchmarks/serving.py [--data PATH|synthetic] [--seconds 2] [--threads N]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import ModelConfig, TrainConfig, load, prepare, save_model, train  # noqa: E402
from pipelines.encode import Encoded, _prepare  # noqa: E402
from pipelines.export import check_columns  # noqa: E402
from pipelines.recipe import Recipe  # noqa: E402
from pipelines.train import SplitTensors, predict  # noqa: E402

ML100K = ROOT.parent / "shared" / "data" / "movielens-100k" / "ml-100k"
BATCHES = (1, 100, 10_000)


def timed(fn, seconds: float) -> float:
    """Median CPU seconds per call over repeated calls filling about ``seconds`` of wall time (at least 5 calls).

    CPU time of the process, not wall time: on a shared machine wall time also counts waiting for a core (and with
    more than one torch thread, OpenMP barriers waiting for a busy core), which is noise here, not serving cost.
    ``WALL`` collects the wall-clock medians for the pyfunc rows, printed beside.
    """
    fn()  # warm-up
    cpu, wall, spent = [], [], 0.0
    while spent < seconds or len(cpu) < 5:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
        spent += wall[-1]
    WALL.append(statistics.median(wall))
    return statistics.median(cpu)


WALL: list[float] = []


def python_loop_encode(encoder, indexes: dict[str, dict[str, int]], frame) -> None:
    """The per-row alternative: a dict lookup per cell (per token for multi-valued cells); dicts built beforehand."""
    for name, vocab in encoder.vocabs.items():
        index = indexes[name]
        cells = _prepare(frame[name], vocab.feature).tolist()
        if vocab.feature.multi:
            [[index.get(t.strip(), 0) for t in c.split(vocab.feature.sep)] if isinstance(c, str) else [0] for c in cells]
        else:
            [index.get(c, 0) for c in cells]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ML100K) if ML100K.is_dir() else "synthetic")
    p.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as one worker per core)")
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    import mlflow
    import torch

    from pipelines.serving import log_model

    torch.set_num_threads(args.threads)
    raw = load(args.data) if args.data != "synthetic" else load("synthetic", synthetic_rows=100_000)
    data = prepare(raw)
    model_cfg = ModelConfig({f.name: 16 for f in data.features}, (64, 32))
    model = train(model_cfg, TrainConfig(max_epochs=1), data, train_on_val=True).model
    with tempfile.TemporaryDirectory() as tmp:
        export = save_model(Path(tmp) / "export", model, data.encoder, Recipe(data.features, model_cfg, TrainConfig()))
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        # the model's files go to the temp dir too (a SQLite store's default artifact root is ./mlruns under the cwd)
        experiment = mlflow.create_experiment("bench", artifact_location=Path(tmp, "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            log_model(export, raw.frame.head(5), registered_model_name="bench")
        pyfunc = mlflow.pyfunc.load_model("models:/bench/1")
        served = pyfunc.unwrap_python_model()
        encoder, net = served.encoder, served.model

        print(f"data: {raw.name}, {len(raw):,} rows; columns {list(raw.frame.columns)}")
        print(f"model: dims 16 each, hidden (64, 32); torch threads {torch.get_num_threads()}; "
              f"{args.seconds:g} s per measurement, median CPU time per call")
        print()
        head = (f"{'batch':>7} {'pyfunc rows/s':>14} {'(wall)':>9} {'us/row':>9} {'encode':>9} {'model':>9}"
                f" {'other':>9} {'py-loop encode':>15} {'loop/vector':>12}")
        print(head)
        rng = np.random.default_rng(0)
        indexes = {k: {c: i + 1 for i, c in enumerate(v.categories)} for k, v in encoder.vocabs.items()}
        for n in BATCHES:
            rows = raw.frame.iloc[rng.integers(0, len(raw), n)].reset_index(drop=True)
            total = timed(lambda: pyfunc.predict(rows), args.seconds)
            wall = WALL[-1]
            check = timed(lambda: check_columns(encoder, rows), args.seconds / 4)
            encode = timed(lambda: encoder.transform(rows), args.seconds)
            columns = encoder.transform(rows)
            label = np.zeros(n, dtype=np.float32)
            forward = timed(lambda: predict(net, SplitTensors(Encoded(columns, label), net, torch.device("cpu"))),
                            args.seconds)
            loop = timed(lambda: python_loop_encode(encoder, indexes, rows), args.seconds)
            us = 1e6 / n
            other = max(total - encode - forward, 0.0)
            print(f"{n:>7,} {n / total:>14,.0f} {n / wall:>9,.0f} {total * us:>9.1f} {encode * us:>9.1f} {forward * us:>9.1f} "
                  f"{other * us:>9.1f} {loop * us:>15.2f} {loop / encode:>11.1f}x")
            if n == BATCHES[-1]:
                share = encode / total
        print()
        print("us/row columns: total per row of pyfunc.predict = encode (Encoder.transform) + model (layout + forward)"
              " + other (column check ~%.0f us per call, MLflow wrapper, output frame)." % (check * 1e6))
        print(f"At {BATCHES[-1]:,} rows encoding is {share:.0%} of the per-row cost; 'loop/vector' is a per-row "
              "Python dict lookup of the same vocabularies over the vectorised encoder.")


if __name__ == "__main__":
    main()
