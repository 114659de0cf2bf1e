from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from search.ranking import crowding_distance, nondominated_ranks, order, select_top


# Small integer grids: many ties in each objective and exact duplicates.
def point_sets(m: int, max_size: int = 25):
    return st.lists(st.tuples(*[st.integers(0, 5)] * m), min_size=1, max_size=max_size)


def dominates(p, q) -> bool:
    return all(a <= b for a, b in zip(p, q)) and p != q


def brute_ranks(pts) -> list[int]:
    """Peel fronts: each round, the points no remaining point dominates."""
    ranks = [-1] * len(pts)
    rank = 0
    while -1 in ranks:
        left = [i for i, r in enumerate(ranks) if r == -1]
        front = [i for i in left if not any(dominates(pts[j], pts[i]) for j in left)]
        for i in front:
            ranks[i] = rank
        rank += 1
    return ranks


@given(st.integers(1, 4).flatmap(point_sets))
def test_nondominated_ranks_match_brute_force(pts):
    assert nondominated_ranks(np.array(pts)).tolist() == brute_ranks(pts)


def test_nondominated_ranks_are_front_indices_not_positions():
    objs = [[0, 3], [1, 1], [3, 0], [1, 3], [3, 3], [1, 1]]
    assert nondominated_ranks(objs).tolist() == [0, 0, 0, 1, 2, 0]


@given(point_sets(3))
def test_crowding_distance_finite_or_inf_and_copies_score_zero(pts):
    x = np.array(pts)
    dist = crowding_distance(x, nondominated_ranks(x))
    assert not np.isnan(dist).any() and (dist >= 0).all()
    for i, p in enumerate(pts):
        if p in pts[:i]:
            assert dist[i] == 0


def test_crowding_distance_by_hand():
    objs = [[0, 4], [1, 2], [3, 1], [4, 0], [1, 2]]
    dist = crowding_distance(objs, [0] * 5)
    # Point 1: gaps (3 - 0) / 4 and (4 - 1) / 4; point 2: (4 - 1) / 4 and (2 - 0) / 4; point 4 copies point 1.
    assert dist.tolist() == [np.inf, 1.5, 1.25, np.inf, 0.0]


@given(point_sets(2), st.integers(0, 30))
def test_select_top_takes_fronts_in_order(pts, k):
    x = np.array(pts)
    ranks = np.array(brute_ranks(pts))
    top = select_top(x, k)
    assert len(top) == min(k, len(pts)) and len(set(top.tolist())) == len(top)
    if len(top):
        worst = ranks[top].max()
        assert (ranks[top] == np.sort(ranks[top])).all()
        assert set(np.flatnonzero(ranks < worst)) <= set(top.tolist())


@given(point_sets(2), st.integers(2, 30))
def test_select_top_prefers_both_ends_of_front_zero(pts, k):
    x = np.array(pts)
    on_front = np.flatnonzero(np.array(brute_ranks(pts)) == 0)
    if len({pts[i] for i in on_front}) < 2:
        return
    # The lowest-index copy of each end: minimum of objective 0 and minimum of objective 1.
    ends = {int(on_front[np.lexsort((on_front, x[on_front, j]))[0]]) for j in (0, 1)}
    full = order(x).tolist()
    interior = [i for i in on_front if i not in ends]
    assert len(ends) == 2
    assert all(full.index(e) < full.index(i) for e in ends for i in interior)
    assert ends <= set(select_top(x, k).tolist())


@given(point_sets(3))
def test_order_is_deterministic_and_a_permutation(pts):
    x = np.array(pts)
    assert sorted(order(x).tolist()) == list(range(len(pts)))
    assert order(x).tolist() == order(x.copy()).tolist()


@pytest.mark.parametrize(
    "objs, match", [([1.0, 2.0], "must be \\(n_points"), ([[1.0, np.nan]], "objective 1 of point 0 is nan")]
)
def test_ranking_refuses_bad_objectives(objs, match):
    with pytest.raises(ValueError, match=match):
        nondominated_ranks(objs)


def test_select_top_refuses_negative_k():
    with pytest.raises(ValueError, match="k is -1"):
        select_top([[0.0, 1.0]], -1)
