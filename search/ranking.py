"""Non-dominated sorting and crowding distance (NSGA-II, Deb et al. 2002) for picking the best of n trials.

All objectives are minimized (callers negate AUC). A rank is the index of the front a point lies on (0 = not dominated,
1 = not dominated once front 0 is removed, ...), not a position in a sorted list. Optuna implements the same ideas on
FrozenTrial lists in private modules only, so these small array versions are written here.
"""

from __future__ import annotations

import numpy as np


def _check(objs) -> np.ndarray:
    x = np.asarray(objs, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"objectives have shape {x.shape}, but must be (n_points, n_objectives)")
    if not np.isfinite(x).all():
        i = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"objective {i[1]} of point {i[0]} is {x[tuple(i)]}, but must be finite")
    return x


def nondominated_ranks(objs) -> np.ndarray:
    """Front index of each point; identical points share a rank. O(m n^2) time and O(n^2) memory."""
    x = _check(objs)
    le = (x[:, None, :] <= x[None, :, :]).all(axis=2)
    lt = (x[:, None, :] < x[None, :, :]).any(axis=2)
    dominates = le & lt  # dominates[i, j]: i dominates j
    n_dominators = dominates.sum(axis=0)
    ranks = np.full(len(x), -1)
    rank = 0
    front = n_dominators == 0
    while front.any():
        ranks[front] = rank
        n_dominators = n_dominators - dominates[front].sum(axis=0)
        n_dominators[ranks >= 0] = -1  # already placed
        front = n_dominators == 0
        rank += 1
    return ranks


def crowding_distance(objs, ranks) -> np.ndarray:
    """Crowding distance of each point within its front; the ends of each objective get inf.

    Per objective, an interior point scores the gap between its two neighbours divided by the front's range; an
    objective the whole front shares adds nothing. Copies of a point: the lowest index scores as the distinct point,
    the later copies score 0 (they add no spread), which keeps the result free of NaN and independent of sort order.
    """
    x = _check(objs)
    ranks = np.asarray(ranks)
    if ranks.shape != (len(x),):
        raise ValueError(f"ranks have shape {ranks.shape}, but must be ({len(x)},), one per point")
    dist = np.zeros(len(x))
    for r in np.unique(ranks):
        members = np.flatnonzero(ranks == r)
        _, first = np.unique(x[members], axis=0, return_index=True)
        idx = np.sort(members[first])  # one index (the lowest) per distinct point
        if len(idx) <= 2:
            dist[idx] = np.inf
            continue
        for j in range(x.shape[1]):
            v = x[idx, j]
            span = v.max() - v.min()
            if span == 0:
                continue
            order = idx[np.argsort(v, kind="stable")]  # ties keep index order
            vs = x[order, j]
            dist[order[[0, -1]]] = np.inf
            dist[order[1:-1]] += (vs[2:] - vs[:-2]) / span
    return dist


def order(objs) -> np.ndarray:
    """All indices, best first: by rank ascending, then crowding distance descending, then index."""
    x = _check(objs)
    ranks = nondominated_ranks(x)
    crowd = crowding_distance(x, ranks)
    return np.lexsort((np.arange(len(x)), -crowd, ranks))


def select_top(objs, k: int) -> np.ndarray:
    """Indices of the k best points (all of them if k exceeds their number), best first."""
    if k < 0:
        raise ValueError(f"k is {k}, but must be >= 0")
    return order(objs)[:k]
