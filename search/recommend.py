"""Pick the recommended trial from the AUC/size Pareto front."""

from __future__ import annotations

import logging
import math

import numpy as np

from .pareto import check_objectives, non_dominated

log = logging.getLogger(__name__)

RULES = ("epsilon", "knee", "budget")
_TOL = 1e-9  # AUC slack, so that 0.800 - 0.798 counts as within epsilon=0.002 despite float rounding


def recommend(auc, size, rule: str = "epsilon", epsilon: float = 0.002, budget: float | None = None) -> int:
    """Index (into the inputs) of the recommended trial; only points on the Pareto front are considered.

    Rules:
      epsilon: the smallest model whose AUC is within `epsilon` of the best AUC.
      knee: the front point farthest above the line joining its two ends, in (log10 bytes, AUC) scaled to [0, 1];
        a front of 1-2 distinct points, or one with no point above that line, falls back to the epsilon rule.
      budget: the best AUC among models of at most `budget` bytes (`budget` is used by this rule only).
    Copies of a point resolve to the lowest index.
    """
    if rule not in RULES:
        raise ValueError(f"rule is {rule!r}, but must be one of {', '.join(RULES)}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon is {epsilon}, but must be an AUC difference >= 0 (e.g. 0.002)")
    if rule == "budget" and budget is None:
        raise ValueError("rule 'budget' needs a budget in bytes (e.g. budget=2_000_000)")
    if budget is not None and not budget > 0:
        raise ValueError(f"budget is {budget}, but must be a number of bytes > 0")
    a, s = check_objectives(auc, size)
    if len(a) == 0:
        raise ValueError("no trials to recommend from: auc and size are empty")
    front = _distinct_front(a, s)
    if rule == "budget":
        fits = front[s[front] <= budget]
        if len(fits) == 0:
            raise ValueError(
                f"no trial fits the budget of {budget:,.0f} bytes; the smallest model on the front has "
                f"{s[front[0]]:,.0f} bytes: raise the budget"
            )
        return int(fits[-1])
    if rule == "knee" and len(front) >= 3:
        x, y = np.log10(s[front]), a[front]
        # Sizes and AUCs both strictly increase along the distinct front, so the scaling never divides by zero.
        above = (y - y[0]) / (y[-1] - y[0]) - (x - x[0]) / (x[-1] - x[0])
        if above.max() > _TOL:
            return int(front[np.argmax(above)])
        log.info("the front has no knee (no point above the line between its ends); using the epsilon rule")
    close = front[a[front].max() - a[front] <= epsilon + _TOL]
    return int(close[0])


def _distinct_front(a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Front indices, smallest model first, one (the lowest index) per distinct point."""
    idx = np.flatnonzero(non_dominated(a, s))
    idx = idx[np.lexsort((idx, s[idx]))]
    # On the front equal size means equal AUC, so copies are neighbours of equal size.
    return idx[np.r_[True, s[idx][1:] != s[idx][:-1]]]


def conclude(records: list[dict], rule: str, epsilon: float, budget: float | None, ref: tuple[float, float]):
    """From a search's trial records: the completed ones (each marked ``on_front``), the front sorted by bytes, the
    recommended record and the front's hypervolume (NaN without a finite reference). None when nothing completed.

    The search's end and ``embsize report`` both call this, so a report recomputes exactly what the search wrote."""
    from .pareto import hypervolume

    done = [r for r in records if r["outcome"] == "completed" and math.isfinite(r["best_val_auc"])]
    if not done:
        return None
    auc = np.array([r["best_val_auc"] for r in done])
    size = np.array([r["model_bytes"] for r in done], dtype=float)
    mask = non_dominated(auc, size)
    for r, m in zip(done, mask):
        r["on_front"] = bool(m)
    front = sorted((r for r in done if r["on_front"]), key=lambda r: r["model_bytes"])
    pick = done[recommend(auc, size, rule=rule, epsilon=epsilon, budget=budget)]
    hv = hypervolume(auc[mask], size[mask], ref_auc=ref[0], ref_bytes=ref[1]) if math.isfinite(ref[1]) else math.nan
    return done, front, pick, hv
