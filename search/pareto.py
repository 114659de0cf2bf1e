"""The AUC/size Pareto front of a search and its hypervolume.

Objectives: validation AUC (maximize) and model bytes (minimize). Optuna has equivalent helpers, but only as private
modules (`optuna.study._multi_objective`, `optuna._hypervolume`) that may change in any release; the 2-D cases are a
sort and a sweep, so they are written here.
"""

from __future__ import annotations

import numpy as np


def check_objectives(auc, size) -> tuple[np.ndarray, np.ndarray]:
    """Both objectives as float arrays, refused with a ValueError unless they are 1-D, equally long and valid."""
    a, s = np.asarray(auc, dtype=float), np.asarray(size, dtype=float)
    if a.ndim != 1 or s.ndim != 1 or len(a) != len(s):
        raise ValueError(f"auc has shape {a.shape} and size has shape {s.shape}; pass one AUC and one size per trial")
    for name, v in (("auc", a), ("size", s)):
        bad = np.flatnonzero(~np.isfinite(v))
        if len(bad):
            raise ValueError(f"{name}[{bad[0]}] is {v[bad[0]]}, but must be finite; drop failed trials first")
    if len(s) and s.min() <= 0:
        i = int(np.argmin(s))
        raise ValueError(f"size[{i}] is {s[i]}, but model bytes must be > 0")
    return a, s


def non_dominated(auc, size) -> np.ndarray:
    """Boolean mask of the points no other point dominates (higher-or-equal AUC at smaller-or-equal size, one strict).

    Exact duplicates do not dominate each other: all copies of a front point are kept. O(n log n).
    """
    a, s = check_objectives(auc, size)
    n = len(a)
    if n == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((-a, s))  # smallest model first; within one size, best AUC first
    a_sorted, s_sorted = a[order], s[order]
    starts = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    best_so_far = np.r_[-np.inf, np.maximum.accumulate(a_sorted)[:-1]]
    # A point survives if it has its size's best AUC and beats every strictly smaller model.
    keep_sorted = (a_sorted == a_sorted[group_start]) & (a_sorted > best_so_far[group_start])
    keep = np.empty(n, dtype=bool)
    keep[order] = keep_sorted
    return keep


def hypervolume(auc, size, *, ref_bytes: float, ref_auc: float = 0.5) -> float:
    """Exact area dominated by the points and bounded by the reference point (ref_auc, ref_bytes).

    The area is measured in (AUC, log10 bytes): the union of the boxes [ref_auc, auc_i] x [log10 size_i,
    log10 ref_bytes]. Model sizes span orders of magnitude, so in linear bytes the largest models would own almost all
    of the area and a better small model would barely move it; log10 bytes weighs each factor of 10 the same. Points
    not strictly better than the reference in both objectives add nothing. Keep the reference fixed to compare searches.
    """
    a, s = check_objectives(auc, size)
    if not (np.isfinite(ref_bytes) and ref_bytes > 0):
        raise ValueError(f"ref_bytes is {ref_bytes}, but must be a finite number of bytes > 0")
    if not np.isfinite(ref_auc):
        raise ValueError(f"ref_auc is {ref_auc}, but must be finite")
    inside = (a > ref_auc) & (s < ref_bytes)
    if not inside.any():
        return 0.0
    x = np.log10(s[inside])
    order = np.argsort(x, kind="stable")
    x, height = x[order], np.maximum.accumulate(a[inside][order]) - ref_auc
    # Sweep from small to large models: between consecutive sizes the covered AUC is the best seen so far.
    widths = np.diff(np.r_[x, np.log10(ref_bytes)])
    return float(height @ widths)
