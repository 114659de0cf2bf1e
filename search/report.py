"""Tables and the Pareto plot of a finished search."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .heuristics import HEURISTICS


def trials_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {k: r[k] for k in ("trial_id", "heuristic", "outcome", "best_val_auc", "model_bytes", "embedding_bytes",
                                 "epochs", "ended", "run_id", "error")}
        row["on_front"] = bool(r.get("on_front", False))
        row.update({f"dim.{k}": v for k, v in r["dims"].items()})
        rows.append(row)
    return pd.DataFrame(rows)


def front_frame(result) -> pd.DataFrame:
    """The front (searched and baseline points) plus every heuristic baseline, labelled, smallest model first."""
    picked = result.recommended["trial_id"]
    rows = []
    for r in result.trials:
        if not (r.get("on_front") or r["heuristic"]):
            continue
        rows.append(
            {
                "label": HEURISTICS.get(r["heuristic"], r["heuristic"]) if r["heuristic"] else "search",
                "on_front": bool(r.get("on_front", False)),
                "recommended": r["trial_id"] == picked,
                "best_val_auc": round(r["best_val_auc"], 5),
                "model_bytes": r["model_bytes"],
                "embedding_bytes": r["embedding_bytes"],
                "outcome": r["outcome"],
                **{f"dim.{k}": v for k, v in r["dims"].items()},
                "trial_id": r["trial_id"],
            }
        )
    return pd.DataFrame(rows).sort_values("model_bytes", kind="stable").reset_index(drop=True)


def plot_front(result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    done = [r for r in result.trials if r["outcome"] == "completed" and not r["heuristic"]]
    stopped = [r for r in result.trials if r["outcome"] == "stopped_early" and r["best_val_auc"] == r["best_val_auc"]]
    ax.scatter([r["model_bytes"] for r in stopped], [r["best_val_auc"] for r in stopped], s=14, c="#bbbbbb",
               label="stopped early (last seen)")
    ax.scatter([r["model_bytes"] for r in done], [r["best_val_auc"] for r in done], s=18, c="#4c72b0", label="trials")
    front = result.front
    ax.step([r["model_bytes"] for r in front], [r["best_val_auc"] for r in front], where="post", c="#dd8452",
            lw=1.5, label="Pareto front")
    markers = iter("sD^vP*X")
    for r in result.trials:
        if r["heuristic"] and r["outcome"] == "completed":
            ax.scatter([r["model_bytes"]], [r["best_val_auc"]], marker=next(markers, "o"), s=60, edgecolor="k",
                       label=HEURISTICS.get(r["heuristic"], r["heuristic"]))
    rec = result.recommended
    ax.scatter([rec["model_bytes"]], [rec["best_val_auc"]], s=220, facecolors="none", edgecolors="red", lw=2,
               label="recommended")
    ax.set_xscale("log")
    ax.set_xlabel("model bytes (fp32, log scale)")
    ax.set_ylabel("validation AUC")
    ax.set_title(f"{result.name}: hypervolume {result.hypervolume:.4f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
