"""Per-feature sensitivity: which feature's dim moves the AUC, and which can shrink freely.

The importances are Optuna's (``optuna.importance.get_param_importances``, fANOVA evaluator, target = the AUC
objective ``values[0]``) over the search's completed trials. The study is the search's own Optuna journal when it is on
this machine; otherwise an in-memory study is rebuilt from the MLflow trial runs (completed trials' params and AUC),
so the same evaluator answers either way. fANOVA rather than Optuna's default PED-ANOVA: PED-ANOVA compares the top
10% of trials with all of them, which is one or two trials in a search of a few dozen; fANOVA's random forest uses
every completed trial and, seeded, gives the same answer every time.

Each searched parameter gets: its importance (share of the AUC variance it explains, summing to 1), the Spearman
correlation of its value with AUC (sign: does a larger dim help?), the range of its values on the front and in the
recommendation, and a verdict. A dim is "can shrink" when its importance is below half of an even share
(0.5 / number of searched parameters): it explains less of the AUC than a parameter chosen at random would. A
training knob (lr, hidden, dropout) below that share is "little effect" instead.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import pandas as pd

from .space import DIM_PREFIX

log = logging.getLogger(__name__)

MIN_TRIALS = 4  # completed trials below which importances are not estimated
SHRINK_SHARE = 0.5  # importance below this fraction of an even share -> "can shrink"


@contextlib.contextmanager
def quiet_optuna():
    """Optuna's INFO lines ("A new study created in memory/Journal with name: ...") off for a block: the commands'
    own lines name the search already. Optuna's verbosity is process-wide, so it is set back after."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def journal_study(path: str | Path, name: str):
    """The search's Optuna study from its journal file, or None when the file or the study is absent."""
    import optuna

    path = Path(path)
    if not path.is_file():
        return None
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no study of that name in the journal
        return None


def records_study(records: list[dict]):
    """An in-memory study of the completed trials' params and objectives (AUC, bytes), as the search would have
    told Optuna; a param's distribution spans the values seen (log scale for dims, as the search samples them)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done = [r for r in records if r["outcome"] == "completed" and math.isfinite(r["best_val_auc"])]
    keys = sorted({k for r in done for k in r["config"] if k.startswith(DIM_PREFIX) or k in ("lr", "hidden", "dropout")})
    keys = [k for k in keys if all(k in r["config"] for r in done)]
    dists = {}
    for k in keys:
        values = [r["config"][k] for r in done]
        low, high = min(values), max(values)
        if low == high:
            continue  # not varied: nothing to attribute
        if k.startswith(DIM_PREFIX):
            dists[k] = IntDistribution(int(low), int(high), log=True)
        elif k == "hidden":
            dists[k] = CategoricalDistribution(sorted(set(values)))
        else:
            dists[k] = FloatDistribution(float(low), float(high), log=k == "lr")
    with quiet_optuna():
        study = optuna.create_study(directions=["maximize", "minimize"])
    for r in done:
        attrs = {"trial_id": r["trial_id"], **({"heuristic": r["heuristic"]} if r.get("heuristic") else {})}
        study.add_trial(optuna.trial.create_trial(
            params={k: r["config"][k] for k in dists}, distributions=dists,
            values=[r["best_val_auc"], float(r["model_bytes"])], user_attrs=attrs,
        ))
    return study


def importances(study, seed: int = 0) -> dict[str, float]:
    """Normalized fANOVA importances of the searched params for the AUC objective (``values[0]``)."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    searched = _searched(study)
    if searched < MIN_TRIALS:
        baselines = len(done) - searched
        raise ValueError(
            f"sensitivity needs at least {MIN_TRIALS} completed searched trials, but the search has {searched}"
            + (f" (and {baselines} heuristic baselines, whose dims all grow together)" if baselines else "")
            + "; run it with more --trials, or --scheduler fifo so that no trial is stopped early")
    varied = [k for k in done[0].params if len({t.params.get(k) for t in done}) > 1 and all(k in t.params for t in done)]
    if not varied:
        raise ValueError("no searched parameter varies across the completed trials; nothing to attribute the AUC to")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied,
                                                   target=lambda t: t.values[0])


def sensitivity_table(study, records: list[dict], recommended: dict | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per searched param, most important first: importance, Spearman rho with AUC, front range, verdict."""
    imp = importances(study, seed)
    done = [t for t in study.get_trials(deepcopy=False) if t.values is not None]
    auc = pd.Series([t.values[0] for t in done])
    front = [r for r in records if r.get("on_front")]
    share = 1.0 / len(imp)
    rows = []
    for param, value in imp.items():
        x = pd.Series([float(t.params[param]) for t in done])
        rho = x.corr(auc, method="spearman") if x.nunique() > 1 else math.nan
        row = {
            "param": param,
            "feature": param[len(DIM_PREFIX):] if param.startswith(DIM_PREFIX) else "",
            "importance": round(float(value), 4),
            "spearman_auc": round(float(rho), 3) if math.isfinite(rho) else math.nan,
            "front_min": _front_value(front, param, min),
            "front_max": _front_value(front, param, max),
            "recommended": _value(recommended, param) if recommended else math.nan,
            # a training knob (lr, hidden, dropout) that explains little has no size to shrink
            "verdict": "matters" if value >= SHRINK_SHARE * share else (
                "can shrink" if param.startswith(DIM_PREFIX) else "little effect"),
        }
        rows.append(row)
    frame = pd.DataFrame(rows)
    for col in ("front_min", "front_max", "recommended"):  # dims stay integers beside a float lr
        frame[col] = pd.Series([row[col] for row in rows], dtype=object)
    return frame


def sensitivity(result, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """The table for a reviewed or finished search, and where its trials came from ("optuna journal" or
    "mlflow runs")."""
    journal = result.extra.get("journal") if result.extra else result.out / "optuna.journal"
    study = journal_study(journal, result.study_name) if journal is not None else None
    source = "optuna journal"
    if study is None or _searched(study) < MIN_TRIALS:
        study, source = records_study(result.trials), "mlflow runs"
    return sensitivity_table(study, result.trials, result.recommended, seed), source


def plot_sensitivity(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Horizontal bars of the importances, most important on top; dims that can shrink in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table.iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(t) + 1.4), dpi=120)
    colors = ["#4c72b0" if v == "matters" else "#bbbbbb" for v in t["verdict"]]
    ax.barh(t["param"], t["importance"], color=colors)
    for y, (imp, rho) in enumerate(zip(t["importance"], t["spearman_auc"])):
        ax.text(imp, y, f" {imp:.2f}" + (f"  (rho {rho:+.2f})" if rho == rho else ""), va="center", fontsize=7)
    ax.axvline(SHRINK_SHARE / len(t), color="k", lw=0.8, ls="--", label="half an even share")
    ax.set_xlabel("fANOVA importance for validation AUC (sums to 1)")
    ax.set_xlim(0, max(1e-9, t["importance"].max()) * 1.35)
    ax.set_title(title or "per-parameter sensitivity", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from .report import save_figure

    return save_figure(fig, path)


def _searched(study) -> int:
    """Completed trials that are not heuristic baselines. The baselines are used with the rest, but do not count:
    every rule grows all dims together with the features' cardinalities, so they cannot tell which feature's dim
    moved the AUC."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sum(not t.user_attrs.get("heuristic") for t in done)


def _value(record: dict, param: str):
    if param.startswith(DIM_PREFIX):
        return int(record["dims"].get(param[len(DIM_PREFIX):]))
    return record["config"].get(param, math.nan)


def _front_value(front: list[dict], param: str, pick):
    values = [v for v in (_value(r, param) for r in front) if v == v]
    return pick(values) if values else math.nan
