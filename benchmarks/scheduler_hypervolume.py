"""Schedulers compared by the front they find: FIFO (full training), ASHA (val AUC) and Pareto-ASHA (AUC and bytes).

Part 1, end to end: every search is a real ``search.runner.run_search`` (Ray Tune + DimSearch/Optuna TPE + MLflow in
a temp SQLite store) with the same trial budget, epochs, grace period and eta; only ``scheduler`` differs. Per dataset
the searches share the search space, so the hypervolume's reference point (``search.runner.reference_point``: chance
AUC, twice the largest model of the space) is fixed. Heuristic baselines are off: they train to the full budget under
every scheduler and would only add the same epochs to all three. The sampler learns from what the scheduler lets
finish, so part 1 measures scheduler and sampler together, and its seeds differ in the configs sampled.

Part 2, replay: the learning curves FIFO recorded in part 1 (every trial trained to its end) are fed again, in the
same order, to Ray's ``ASHAScheduler`` and to ``ParetoASHA`` through their ``on_trial_add/on_trial_result/
on_trial_complete`` API, with two workers timed by the recorded epoch seconds. The configs are identical, so this
isolates the stopping decisions from the sampler.
The replay also prints a bound for any stopping rule with the same grace period
(``oracle_epochs``): on MovieLens and the synthetic set 99% of FIFO's hypervolume rests on 2-5 trials (the cheapest
good models own most of the log-bytes axis), so an oracle needs ~21-27% of FIFO's epochs at grace 2; a rung rule that
keeps the top 1/eta of the trials recorded so far keeps far more, because a sampler that works proposes trials on or
near the current front.

Printed per dataset: final front hypervolume and total epochs (mean and per seed), their ratios to FIFO, and the
hypervolume reached as a function of epochs spent (the front of the trials completed so far), also plotted to
``benchmarks/out/scheduler_hypervolume.png`` (tables: ``.txt``, raw runs: ``.json`` beside it).

    python benchmarks/scheduler_hypervolume.py [--quick] [--trials 48] [--max-epochs 12] [--grace-period 2] [--eta 3]
        [--seeds 3] [--datasets movielens,synthetic] [--data ../shared/data/movielens-100k]
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import EncodedDataset, prepare  # noqa: E402
from search.pareto import hypervolume  # noqa: E402
from search.ranking import nondominated_ranks  # noqa: E402
from search.runner import SearchSettings, reference_point, run_search  # noqa: E402
from search.space import SearchSpec, build_space  # noqa: E402

SCHEDULERS = ("fifo", "asha", "pareto-asha")
ML100K = ROOT.parent / "shared" / "data" / "movielens-100k"
OUT = ROOT / "benchmarks" / "out"


@dataclass
class Run:
    dataset: str
    scheduler: str
    seed: int
    hypervolume: float = 0.0
    epochs: int = 0
    completed: int = 0
    stopped: int = 0
    front: int = 0
    seconds: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epochs spent, hypervolume of completed so far)
    trials: list[list[tuple[float, float, float, bool]]] = field(default_factory=list)  # per trial, per epoch results


class Timeline:
    """``run_search``'s on_event hook: epochs as results stream in, the front's hypervolume as trials complete."""

    def __init__(self, ref: tuple[float, float]):
        self.ref = ref
        self.epochs = 0
        self.points: list[tuple[float, float]] = []
        self.curve: list[tuple[int, float]] = [(0, 0.0)]
        self.trials: dict[str, list[tuple[float, float, float, bool]]] = {}  # (best AUC, bytes, seconds, final)

    def __call__(self, kind: str, trial, result) -> None:
        if kind == "result":
            self.epochs += 1
            self.trials.setdefault(trial.trial_id, []).append(
                (result["best_val_auc"], result["model_bytes"], result["epoch_seconds"], bool(result["final"]))
            )
        elif kind == "completed" and result:
            self.points.append((float(result["best_val_auc"]), float(result["model_bytes"])))
            self.curve.append((self.epochs, front_hv(self.points, self.ref)))


def front_hv(points, ref: tuple[float, float]) -> float:
    auc, size = np.array(points, dtype=float).reshape(-1, 2).T
    return hypervolume(auc, size, ref_auc=ref[0], ref_bytes=ref[1])


def datasets(names: list[str], data_dir: Path, rows: int) -> dict[str, EncodedDataset]:
    from pipelines.load import load

    out = {}
    for name in names:
        if name == "movielens":
            if not data_dir.exists():
                raise SystemExit(f"MovieLens 100K not found at {data_dir}; pass --data or drop it from --datasets")
            out[name] = prepare(load(str(data_dir)), split="random", seed=0)
        elif name == "synthetic":
            out[name] = prepare(load("synthetic", synthetic_rows=rows, seed=0), split="random", seed=0)
        else:
            raise SystemExit(f"dataset {name!r} is unknown; use movielens and/or synthetic")
    return out


def space_of(data: EncodedDataset, args):
    space = build_space(data.features, SearchSpec(max_dim=args.max_dim))
    return space, reference_point(space, {})


def run_one(data: EncodedDataset, dataset: str, scheduler: str, seed: int, args, tmp: Path) -> Run:
    space, ref = space_of(data, args)
    timeline = Timeline(ref)
    settings = SearchSettings(
        name=f"{dataset}-{scheduler}-s{seed}", trials=args.trials, max_epochs=args.max_epochs, patience=args.patience,
        scheduler=scheduler, grace_period=args.grace_period, reduction_factor=args.eta, heuristics=False,
        seed=seed, tracking_uri=f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}", output_dir=str(tmp / "out"),
    )
    res = run_search(data, space, settings, on_event=timeline)
    assert res.reference == ref
    epochs = sum(r["epochs"] for r in res.trials)
    assert epochs == timeline.epochs, (epochs, timeline.epochs)  # every epoch arrived as one result
    return Run(
        dataset, scheduler, seed, res.hypervolume, epochs,
        sum(r["outcome"] == "completed" for r in res.trials), sum(r["outcome"] == "stopped_early" for r in res.trials),
        len(res.front), res.seconds, timeline.curve, list(timeline.trials.values()),
    )


def replay(fifo: Run, scheduler: str, args, ref: tuple[float, float], workers: int = 2) -> Run:
    """FIFO's recorded trials fed, in order, to a scheduler; workers take the next trial when one ends or is stopped."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from search.schedulers import make_scheduler

    if scheduler == "asha":  # Ray's plain ASHA (the heuristic exemption of BaselineAwareASHA plays no part here)
        sched = ASHAScheduler(metric="best_val_auc", mode="max", max_t=args.max_epochs,
                              grace_period=args.grace_period, reduction_factor=args.eta)
    else:
        sched = make_scheduler(scheduler, args.max_epochs, args.grace_period, args.eta, ref)
    curves = fifo.trials
    trials = [SimpleNamespace(trial_id=str(i), config={}) for i in range(len(curves))]  # what schedulers read
    pending, events, tick = list(range(len(curves))), [], itertools.count()

    def start(i: int, now: float) -> None:
        sched.on_trial_add(None, trials[i])
        heapq.heappush(events, (now + curves[i][0][2], next(tick), i, 1))

    for _ in range(workers):
        if pending:
            start(pending.pop(0), 0.0)
    run = Run(fifo.dataset, scheduler, fifo.seed, curve=[(0, 0.0)])
    points = []
    while events:
        now, _, i, epoch = heapq.heappop(events)
        auc, nbytes, _, final = curves[i][epoch - 1]
        run.epochs += 1
        result = {"training_iteration": epoch, "best_val_auc": auc, "model_bytes": nbytes, "final": final}
        stop = sched.on_trial_result(None, trials[i], result) == TrialScheduler.STOP
        if final or stop or epoch == len(curves[i]):  # the last test covers a trial that failed under FIFO
            sched.on_trial_complete(None, trials[i], result)
            if final:
                points.append((auc, nbytes))
                run.curve.append((run.epochs, front_hv(points, ref)))
            run.completed += final
            run.stopped += not final
            if pending:
                start(pending.pop(0), now)
        else:
            heapq.heappush(events, (now + curves[i][epoch][2], next(tick), i, epoch + 1))
    run.hypervolume = front_hv(points, ref)
    return run


def oracle_epochs(fifo: Run, grace: int, ref: tuple[float, float], share: float = 0.99) -> tuple[float, int]:
    """A bound no stopping rule can beat on FIFO's recorded curves: the fewest epochs whose trials' front holds
    ``share`` of FIFO's final hypervolume, if every trial runs to the grace period and only the trials picked (knowing
    their final results) run on to their end. Greedy: starting from FIFO's final front, drop the trial that loses the
    least hypervolume per epoch saved while the rest keep ``share``. Returns (epochs / FIFO's epochs, trials kept)."""
    finals = [(t[-1][0], t[-1][1]) for t in fifo.trials]
    lens = [len(t) for t in fifo.trials]
    full = front_hv(finals, ref)
    keep = set(np.flatnonzero(nondominated_ranks([(-a, b) for a, b in finals]) == 0).tolist())
    while True:
        cost = {}
        for i in keep:
            rest = [finals[j] for j in keep - {i}]
            hv = front_hv(rest, ref) if rest else 0.0
            if hv >= share * full:
                cost[i] = (full - hv) / max(1, lens[i] - grace)
        if not cost:
            break
        keep.discard(min(cost, key=cost.get))
    epochs = sum(min(grace, n) for n in lens) + sum(lens[i] - min(grace, lens[i]) for i in keep)
    return epochs / sum(lens), len(keep)


def hv_at(curve: list[tuple[int, float]], epochs: float) -> float:
    """Hypervolume reached after spending ``epochs`` (step function of the curve)."""
    best = 0.0
    for e, hv in curve:
        if e > epochs:
            break
        best = hv
    return best


def table(runs: list[Run], title: str) -> list[str]:
    by = {s: [r for r in runs if r.scheduler == s] for s in SCHEDULERS if any(r.scheduler == s for r in runs)}
    fifo_hv = np.mean([r.hypervolume for r in by["fifo"]])
    fifo_ep = np.mean([r.epochs for r in by["fifo"]])
    lines = [title, f"  {'scheduler':<12} {'HV':>7} {'HV/FIFO':>8} {'epochs':>7} {'ep/FIFO':>8} {'done':>5} "
                    f"{'stopped':>7}   HV per seed"]
    for s, rs in by.items():
        hv, ep = np.mean([r.hypervolume for r in rs]), np.mean([r.epochs for r in rs])
        lines.append(f"  {s:<12} {hv:7.4f} {hv / fifo_hv:8.1%} {ep:7.0f} {ep / fifo_ep:8.1%} "
                     f"{np.mean([r.completed for r in rs]):5.1f} {np.mean([r.stopped for r in rs]):7.1f}   "
                     + " ".join(f"{r.hypervolume:.4f}" for r in rs))
    budgets = sorted({int(round(f * fifo_ep)) for f in (0.1, 0.2, 0.3, 0.4, 0.6, 1.0)})
    lines.append("  HV reached after E epochs (mean over seeds)   E = " + " ".join(f"{b:>6}" for b in budgets))
    for s, rs in by.items():
        lines.append(f"    {s:<42}" + " ".join(f"{np.mean([hv_at(r.curve, b) for r in rs]):6.4f}" for b in budgets))
    if "pareto-asha" in by and "asha" in by:
        ours, asha = by["pareto-asha"], by["asha"]
        hv, ep = np.mean([r.hypervolume for r in ours]), np.mean([r.epochs for r in ours])
        lines.append(
            f"  Pareto-ASHA: {hv / fifo_hv:.1%} of FIFO's HV with {ep / fifo_ep:.1%} of its epochs (target >= 99% with "
            f"<= 40%); vs ASHA: {hv / np.mean([r.hypervolume for r in asha]):.3f}x the HV with "
            f"{ep / np.mean([r.epochs for r in asha]):.2f}x the epochs; beats ASHA's HV in "
            f"{sum(o.hypervolume >= a.hypervolume for o, a in zip(ours, asha))}/{len(ours)} seeds"
        )
    return lines


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.dataset for r in runs))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    colors = {"fifo": "tab:gray", "asha": "tab:blue", "pareto-asha": "tab:red"}
    for ax, ds in zip(axes[0], names):
        for s in SCHEDULERS:
            for i, r in enumerate(x for x in runs if x.dataset == ds and x.scheduler == s):
                e, hv = zip(*r.curve)
                ax.step(e, hv, where="post", color=colors[s], alpha=0.8, label=s if i == 0 else None)
        ax.set(title=f"{ds} (end to end, one line per seed)", xlabel="epochs spent",
               ylabel="front hypervolume (AUC x log10 bytes)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small version: 8 trials, 6 epochs, 1 seed, 20k synthetic rows")
    p.add_argument("--datasets", default="movielens,synthetic")
    p.add_argument("--data", type=Path, default=ML100K, help="MovieLens 100K folder or zip")
    p.add_argument("--trials", type=int, default=48, help="sampled trials per search (the same for every scheduler)")
    p.add_argument("--max-epochs", type=int, default=12)
    p.add_argument("--grace-period", type=int, default=SearchSettings.grace_period, help="default: embsize search's")
    p.add_argument("--eta", type=float, default=SearchSettings.reduction_factor)
    p.add_argument("--patience", type=int, default=3, help="the trials' own early stopping, under every scheduler")
    p.add_argument("--max-dim", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", type=int, default=100_000, help="synthetic rows (100000: the default planted set)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.quick:
        args.trials, args.max_epochs, args.seeds, args.rows = 8, 6, 1, 20_000
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # "slow snapshot" warnings when other jobs share the cores
    data = datasets(args.datasets.split(","), args.data, args.rows)
    runs: list[Run] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embsize-bench-") as tmp:
        for ds, d in data.items():
            for seed in range(args.seeds):
                for s in SCHEDULERS:
                    r = run_one(d, ds, s, seed, args, Path(tmp))
                    runs.append(r)
                    print(f"{ds:<10} {s:<12} seed {seed}: HV {r.hypervolume:.4f}  epochs {r.epochs:4d}  "
                          f"completed {r.completed:2d}  stopped {r.stopped:2d}  {r.seconds:5.0f} s", flush=True)
    wall = time.perf_counter() - started
    lines = [f"\nSame budget: {args.trials} trials x <= {args.max_epochs} epochs (patience {args.patience}), grace "
             f"{args.grace_period}, eta {args.eta:g}, {args.seeds} seeds; machine: {os.cpu_count()} cores, "
             f"2 trials at a time; HV in AUC x log10 bytes, reference (0.5, 2 x largest model)"]
    for ds, d in data.items():
        _, ref = space_of(d, args)
        mine = [r for r in runs if r.dataset == ds]
        lines += table(mine, f"\n{ds}, end to end (run_search, TPE sampler):")
        fifo = [r for r in mine if r.scheduler == "fifo"]
        replayed = fifo + [replay(f, s, args, ref) for s in ("asha", "pareto-asha") for f in fifo]
        lines += table(replayed, f"{ds}, replay of FIFO's learning curves (same configs, stopping decisions only):")
        bounds = [oracle_epochs(f, args.grace_period, ref) for f in fifo]
        lines.append(f"  oracle bound (final results known, every trial to the grace period, the fewest others on to "
                     f"their end for 99% of FIFO's HV): {np.mean([b[0] for b in bounds]):.1%} of FIFO's epochs "
                     f"(per seed {' '.join(f'{b[0]:.1%}' for b in bounds)}; trials run on: "
                     f"{' '.join(str(b[1]) for b in bounds)})")
    print("\n".join(lines))
    png = args.out / "scheduler_hypervolume.png"
    plot(runs, png)
    (args.out / "scheduler_hypervolume.json").write_text(json.dumps([asdict(r) for r in runs]))
    (args.out / "scheduler_hypervolume.txt").write_text("\n".join(lines).strip() + "\n")
    print(f"\nwall time of the searches {wall:.0f} s; plot {png}")


if __name__ == "__main__":
    main()
