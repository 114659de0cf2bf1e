"""Tables and plots of a finished search, and the report folder of `embsize report`.

``trials_frame``/``front_frame``/``plot_front`` serve the runner (and any ``SearchResult``); the rest builds the
report of a search read back from MLflow (``search.review``): the printed summary, the Pareto plot (PNG and
interactive HTML), the learning curves of the front, the per-parameter sensitivity, and their upload to the parent
run under ``report/``.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .heuristics import HEURISTICS


def trials_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {k: r[k] for k in ("trial_id", "heuristic", "outcome", "best_val_auc", "model_bytes", "embedding_bytes",
                                 "epochs")}
        # seconds Ray spent training the trial (NaN for a run written before embsize logged it)
        row["train_seconds"] = round(float(r.get("train_seconds", math.nan)), 3)
        row.update({k: r[k] for k in ("ended", "run_id", "error")})
        row["run_name"] = r.get("run_name", "")
        row["on_front"] = bool(r.get("on_front", False))
        row.update({f"dim.{k}": v for k, v in r["dims"].items()})
        rows.append(row)
    return pd.DataFrame(rows)


def trial_label(record: dict) -> str:
    """How a trial is named to people: its MLflow run's name (trial-007, as the UI lists it) and Ray's trial id, or
    Ray's id alone while the run has no name (its first write has not landed)."""
    name = record.get("run_name")
    return f"{name} (Ray trial {record['trial_id']})" if name else f"trial {record['trial_id']}"


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
                "run_name": r.get("run_name", ""),
            }
        )
    return pd.DataFrame(rows).sort_values("model_bytes", kind="stable").reset_index(drop=True)


def save_figure(fig, path: Path) -> Path:
    """Render a matplotlib figure and write it atomically (temporary file + rename), then free it."""
    import io

    import matplotlib.pyplot as plt

    from pipelines.recipe import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return write_atomic(Path(path), buf.getvalue())


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
    return save_figure(fig, path)


REPORT_ARTIFACTS = "report"  # folder of the parent run's artifacts that holds the report


def front_table(result) -> pd.DataFrame:
    """``front_frame`` with the columns people read: label, flags, AUC, bytes, dims, and the trial's MLflow run name
    (trial-007, as the UI lists it; Ray's trial id where a run has none: its writes failed)."""
    frame = front_frame(result)
    cols = ["label", "on_front", "recommended", "best_val_auc", "model_bytes"] + [c for c in frame if c.startswith("dim.")]
    frame["run"] = frame["run_name"].where(frame["run_name"].astype(bool), frame["trial_id"])
    return frame[cols + ["run"]]


def report_text(result, sensitivity: pd.DataFrame | None = None, sensitivity_source: str = "") -> str:
    """The report as the CLI prints it: counts, the front beside the heuristics, the recommendation, the
    hypervolume, and the sensitivity table."""
    counts = {k: sum(r["outcome"] == k for r in result.trials) for k in ("completed", "stopped_early", "failed")}
    settings = (result.extra or {}).get("settings", {})
    rule = settings.get("rule", "")
    if rule == "epsilon":
        rule = f"epsilon={settings.get('epsilon')}"
    lines = [
        f"search '{result.name}' (MLflow parent run {result.parent_run_id}): {len(result.trials)} trials, "
        f"{counts['completed']} completed, {counts['stopped_early']} stopped early, {counts['failed']} failed",
        "",
        "Pareto front and heuristic baselines (validation AUC, fp32 model bytes):",
        front_table(result).to_string(index=False),
        "",
    ]
    rec = result.recommended
    lines.append(f"recommended{' (' + rule + ')' if rule else ''}: {trial_label(rec)}  val AUC "
                 f"{rec['best_val_auc']:.4f}  model bytes {rec['model_bytes']:,}")
    lines.append("  dims: " + ", ".join(f"{k}={v}" for k, v in rec["dims"].items()))
    ref = result.reference
    ref_text = f"reference AUC {ref[0]}, bytes {ref[1]:,.0f}" if math.isfinite(ref[1]) else "reference unknown"
    lines.append(f"hypervolume {result.hypervolume:.5f} ({ref_text})")
    if sensitivity is not None:
        lines += ["", f"Per-parameter sensitivity (fANOVA importance for val AUC, from the {sensitivity_source}):",
                  sensitivity.to_string(index=False)]
    return "\n".join(lines)


TITLE_CHARS = 100  # a line of a 9-point title across the 7.5-inch learning-curves figure


def curves_title(name: str, features: list[str]) -> str:
    """The learning curves' title, wrapped between features: on one line, eight MovieLens features ran past the
    figure's edge and were cut off."""
    import textwrap

    return textwrap.fill(f"{name}: learning curves of the Pareto front (dims of {' / '.join(features)})",
                         width=TITLE_CHARS, break_long_words=False, break_on_hyphens=False)


def plot_learning_curves(result, histories: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Per-epoch validation AUC of the front's trials (``histories``: trial id -> (epoch, AUC) pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    picked = result.recommended["trial_id"]
    for r in result.front:
        h = histories.get(r["trial_id"], [])
        if not h:
            continue
        label = HEURISTICS.get(r["heuristic"], r["trial_id"]) if r["heuristic"] else r["trial_id"]
        dims = "/".join(str(v) for v in r["dims"].values())
        ax.plot([e for e, _ in h], [v for _, v in h], marker="o", ms=3, lw=2.5 if r["trial_id"] == picked else 1.2,
                label=f"{label} ({r['model_bytes']:,} B; dims {dims})" + (" - recommended" if r["trial_id"] == picked else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC")
    ax.set_title(curves_title(result.name, list(result.recommended["dims"])), fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(result, out: Path, histories: dict, sensitivity: pd.DataFrame | None = None,
                 sensitivity_source: str = "") -> dict[str, Path]:
    """Write the report folder; returns name -> path of every file written."""
    from pipelines.recipe import write_atomic

    from .interactive import write_front_html
    from .sensitivity import plot_sensitivity

    out = Path(out)
    files = {
        "pareto.png": plot_front(result, out / "pareto.png"),
        "pareto.html": write_front_html(result, out / "pareto.html"),
        "learning_curves.png": plot_learning_curves(result, histories, out / "learning_curves.png"),
        "front.csv": write_atomic(out / "front.csv", front_frame(result).to_csv(index=False)),
        "trials.csv": write_atomic(out / "trials.csv", trials_frame(result.trials).to_csv(index=False)),
    }
    if sensitivity is not None:
        files["sensitivity.csv"] = write_atomic(out / "sensitivity.csv", sensitivity.to_csv(index=False))
        files["sensitivity.png"] = plot_sensitivity(sensitivity, out / "sensitivity.png",
                                                    f"{result.name}: which dims matter for AUC ({sensitivity_source})")
    files["report.txt"] = write_atomic(out / "report.txt", report_text(result, sensitivity, sensitivity_source) + "\n")
    return files


# what the search itself logs at the top of its parent run, and the report writes again from the same trial runs with
# the same functions (the rows or the legend in another order): a second copy under report/ would only be clutter
SEARCH_ARTIFACTS = ("pareto.png", "front.csv", "trials.csv")


def log_report(result, files: dict[str, Path]) -> None:
    """Upload the report folder to the parent run (artifacts under ``report/``), but for the files the search logged
    already (``SEARCH_ARTIFACTS``; a search interrupted before its end has none of them, and gets the report's)."""
    from . import tracking

    c = tracking.client(result.extra["tracking_uri"])
    logged = {a.path for a in c.list_artifacts(result.parent_run_id)}
    for name, path in files.items():
        if not (name in SEARCH_ARTIFACTS and name in logged):
            c.log_artifact(result.parent_run_id, str(path), REPORT_ARTIFACTS)
