"""Training throughput: ``pipelines.train`` against a standard PyTorch loop, on MovieLens 100K.

The standard loop is what a PyTorch user writes first: ``DataLoader(TensorDataset(x, y), batch_size=1024,
shuffle=True)`` and, per batch, forward, ``BCEWithLogitsLoss``, ``zero_grad``, ``backward``, ``torch.optim.Adam``
step. Both loops train the same ``EmbeddingRecommender`` (same dims, hidden widths, init seed) on the same rows
with the same batch size, one thread each, interleaved epoch by epoch within one run so machine noise hits both.
Figures are training samples/s per epoch (evaluation excluded), by wall clock and by process CPU time (blind to
waiting for a core); the trainer's end-to-end rate (with its per-epoch validation AUC) is printed too, and both
loops' validation AUC after the same number of epochs, so that speed is not bought with correctness.

    python benchmarks/throughput.py [--data ../shared/data/movielens-100k] [--rounds 3] [--epochs 3] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import EncodedDataset, ModelConfig, RawDataset, TrainConfig, prepare, train  # noqa: E402
from pipelines.model import EmbeddingRecommender  # noqa: E402
from pipelines.train import SplitTensors, evaluate  # noqa: E402

FEATURES = ("user_id", "item_id", "age", "gender", "occupation", "zip")
DIM_SETS = {
    "uniform 16": dict.fromkeys(FEATURES, 16),
    "mixed": {"user_id": 32, "item_id": 32, "zip": 16, "occupation": 8, "age": 4, "gender": 2},
}
HIDDEN = (64, 32)
BATCH, LR, SEED = 1024, 3e-3, 0


def load(path: Path) -> EncodedDataset:
    """MovieLens 100K with its six single-valued features (no genres, no release year)."""
    from pipelines.movielens import load_movielens

    raw = load_movielens(path)
    features = tuple(raw.feature(n) for n in FEATURES)
    six = RawDataset(raw.name, raw.frame[list(FEATURES)], features, raw.label, raw.time, raw.meta)
    return prepare(six, split="random", seed=SEED)


class StandardLoop:
    """The standard PyTorch loop, one epoch per call; with ``index_batches`` the same autograd step on batches sliced
    from a once-per-epoch permuted copy instead of a DataLoader (what plain index batching alone buys)."""

    def __init__(self, data: EncodedDataset, dims: dict, index_batches: bool = False):
        torch.manual_seed(SEED)
        self.model = EmbeddingRecommender(data.features, dims, HIDDEN)
        tr = SplitTensors(data.train, self.model, torch.device("cpu"))
        self.rows = len(tr)
        self.loader = DataLoader(
            TensorDataset(tr.single, tr.label), batch_size=BATCH, shuffle=True,
            generator=torch.Generator().manual_seed(SEED),
        )
        self.index_batches, self.tensors, self.gen = index_batches, tr, torch.Generator().manual_seed(SEED)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.val = SplitTensors(data.val, self.model, torch.device("cpu"))

    def _batches(self):
        if not self.index_batches:
            return iter(self.loader)
        perm = torch.randperm(self.rows, generator=self.gen)
        x, y = self.tensors.single.index_select(0, perm), self.tensors.label.index_select(0, perm)
        return ((x[a : a + BATCH], y[a : a + BATCH]) for a in range(0, self.rows, BATCH))

    def epoch(self) -> tuple[float, float, float]:
        """(wall samples/s, CPU samples/s, wall seconds)."""
        t0, c0 = time.perf_counter(), time.process_time()
        for x, y in self._batches():
            loss = self.loss_fn(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        seconds = time.perf_counter() - t0
        return self.rows / seconds, self.rows / (time.process_time() - c0), seconds

    def val_auc(self) -> float:
        return evaluate(self.model, self.val)[0]


def paired_round(data: EncodedDataset, dims: dict, epochs: int) -> dict:
    """``epochs`` epochs of each loop, interleaved epoch by epoch (ours, standard, index-batched, ours, ...) so that a
    change in the machine's load hits all of them: the other loops' epochs run inside the trainer's ``on_epoch``."""
    standard, indexed = StandardLoop(data, dims), StandardLoop(data, dims, index_batches=True)
    pairs, indexed_rates, standard_seconds = [], [], 0.0

    def on_epoch(r, _snapshot) -> None:
        nonlocal standard_seconds
        wall, cpu, seconds = standard.epoch()
        i_wall, i_cpu, i_seconds = indexed.epoch()
        standard_seconds += seconds + i_seconds
        pairs.append(((r.samples_per_s, len(data.train) / r.cpu_seconds), (wall, cpu)))
        indexed_rates.append((i_wall, i_cpu))

    cfg = TrainConfig(lr=LR, batch_size=BATCH, max_epochs=epochs, patience=0, seed=SEED, threads=1)
    t0 = time.perf_counter()
    result = train(ModelConfig(dims, HIDDEN), cfg, data, on_epoch=on_epoch, device="cpu")
    ours_wall = time.perf_counter() - t0 - standard_seconds  # setup, training and per-epoch validation
    return {
        "pairs": pairs,
        "indexed": indexed_rates,
        "end_to_end": epochs * len(data.train) / ours_wall,
        "auc": (result.history[-1].val_auc, standard.val_auc()),
    }


def compiled_loop(data: EncodedDataset, dims: dict, epochs: int) -> tuple[float, list[float]]:
    """The standard step under torch.compile (index batches, no DataLoader): compile seconds, samples/s per epoch."""
    torch.manual_seed(SEED)
    model = EmbeddingRecommender(data.features, dims, HIDDEN)
    tr = SplitTensors(data.train, model, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    loss_fn = nn.BCEWithLogitsLoss()

    @torch.compile
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    gen = torch.Generator().manual_seed(SEED)
    t0, compile_s, rates = time.perf_counter(), 0.0, []
    for epoch in range(epochs + 1):
        perm = torch.randperm(len(tr), generator=gen)
        x, y = tr.single.index_select(0, perm), tr.label.index_select(0, perm)
        t0 = time.perf_counter()
        for a in range(0, len(tr), BATCH):
            step(x[a : a + BATCH], y[a : a + BATCH])
        seconds = time.perf_counter() - t0
        if epoch == 0:  # the first epoch compiles (full and last partial batch shapes)
            compile_s = seconds
        else:
            rates.append(len(tr) / seconds)
    return compile_s, rates


def _summary(rates: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """[(median, best) of wall rates, (median, best) of CPU rates]."""
    return [(statistics.median(r), max(r)) for r in ([w for w, _ in rates], [c for _, c in rates])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "movielens-100k")
    parser.add_argument("--rounds", type=int, default=3, help="trainer runs, each interleaving the other loops' epochs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loop per round")
    parser.add_argument("--compile", action="store_true", help="also time the standard step under torch.compile")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"MovieLens 100K not found at {args.data}; pass --data")
    torch.set_num_threads(1)
    data = load(args.data)
    print(data.summary())
    print(f"torch {torch.__version__}, 1 thread, batch {BATCH}, hidden {HIDDEN}, {args.rounds} rounds x {args.epochs} "
          "epochs per loop, samples/s = training rows / training seconds per epoch\n")
    for name, dims in DIM_SETS.items():
        rounds = [paired_round(data, dims, args.epochs) for _ in range(args.rounds)]
        pairs = [p for r in rounds for p in r["pairs"]]
        ours, base = [o for o, _ in pairs], [b for _, b in pairs]
        print(f"dims {name}: {dims}")
        print(f"  {'samples/s':28s}{'wall median':>14s}{'wall best':>12s}{'CPU median':>14s}{'CPU best':>12s}")
        indexed = [i for r in rounds for i in r["indexed"]]
        for label, rates in (("standard DataLoader loop", base), ("  same step, index batches", indexed),
                             ("pipelines.train", ours)):
            print(f"  {label:28s}" + "".join(f"{m:>14,.0f}{b:>12,.0f}" for m, b in _summary(rates)))
        (bw, bwb), (bc, bcb) = _summary(base)
        (ow, owb), (oc, ocb) = _summary(ours)
        print(f"  {'ratio':28s}{ow / bw:>13.1f}x{owb / bwb:>11.1f}x{oc / bc:>13.1f}x{ocb / bcb:>11.1f}x")
        (iw, _), (ic, _) = _summary(indexed)
        print(f"  {'index batching alone':28s}{iw / bw:>13.1f}x{'':>12s}{ic / bc:>13.1f}x")
        print(f"  {'pipelines.train over that':28s}{ow / iw:>13.1f}x{'':>12s}{oc / ic:>13.1f}x")
        paired = [o[0] / b[0] for o, b in pairs]
        print(f"  ratio within each epoch pair (wall): median {statistics.median(paired):.1f}x, "
              f"range {min(paired):.1f}x - {max(paired):.1f}x over {len(paired)} pairs")
        print(f"  pipelines.train end to end (setup and per-epoch validation included): median "
              f"{statistics.median(r['end_to_end'] for r in rounds):,.0f} samples/s wall")
        o_auc = statistics.median(r["auc"][0] for r in rounds)
        b_auc = statistics.median(r["auc"][1] for r in rounds)
        print(f"  val AUC after {args.epochs} epochs: standard {b_auc:.4f}, pipelines.train {o_auc:.4f} "
              f"(difference {o_auc - b_auc:+.4f})\n")
        if args.compile:
            try:
                compile_s, rates = compiled_loop(data, dims, args.epochs)
            except Exception as exc:  # inductor needs a C++ toolchain; report instead of failing the benchmark
                print(f"  torch.compile unavailable here: {type(exc).__name__}: {exc}\n")
                continue
            print(f"  torch.compile standard step: first epoch (compiling) {compile_s:.1f} s, then median "
                  f"{statistics.median(rates):,.0f} samples/s ({statistics.median(rates) / bw:.1f}x standard)\n")


if __name__ == "__main__":
    main()
