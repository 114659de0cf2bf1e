from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from search.pareto import hypervolume, non_dominated

# Coarse grids so that random sets have ties in each objective and exact duplicates.
aucs = st.integers(0, 8).map(lambda v: 0.45 + v / 40)
sizes = st.integers(0, 8).map(lambda v: 10 ** (2 + v / 2))
points = st.lists(st.tuples(aucs, sizes), min_size=1, max_size=25)
REF = dict(ref_auc=0.5, ref_bytes=10**5)


def dominates(p, q) -> bool:
    return p[0] >= q[0] and p[1] <= q[1] and p != q


def brute_front(pts) -> list[bool]:
    return [not any(dominates(q, p) for q in pts) for p in pts]


def brute_hypervolume(pts, ref_auc, ref_bytes) -> float:
    """Area of the union of boxes, summed over the cells of the grid the box corners make."""
    boxes = [(math.log10(s), a) for a, s in pts if a > ref_auc and s < ref_bytes]
    top = math.log10(ref_bytes)
    xs = sorted({x for x, _ in boxes} | {top})
    ys = sorted({y for _, y in boxes} | {ref_auc})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if any(x <= cx and cy <= y for x, y in boxes):
                area += (x1 - x0) * (y1 - y0)
    return area


def hv(pts) -> float:
    return hypervolume([a for a, _ in pts], [s for _, s in pts], **REF)


@given(points)
def test_non_dominated_matches_brute_force(pts):
    mask = non_dominated([a for a, _ in pts], [s for _, s in pts])
    assert mask.tolist() == brute_front(pts)


def test_non_dominated_keeps_duplicates_and_drops_ties():
    auc = [0.80, 0.80, 0.80, 0.75, 0.85, 0.70]
    size = [100, 100, 200, 100, 300, 50]
    assert non_dominated(auc, size).tolist() == [True, True, False, False, True, True]


def test_non_dominated_empty_input():
    assert non_dominated([], []).shape == (0,)


@pytest.mark.parametrize(
    "auc, size, match",
    [([0.7, 0.8], [10], "one AUC and one size"), ([0.7, float("nan")], [10, 20], r"auc\[1\] is nan"),
     ([0.7], [0], "must be > 0"), ([0.7], [float("inf")], "must be finite")],
)
def test_non_dominated_refuses_bad_input(auc, size, match):
    with pytest.raises(ValueError, match=match):
        non_dominated(auc, size)


@given(points)
def test_hypervolume_matches_brute_force(pts):
    assert hv(pts) == pytest.approx(brute_hypervolume(pts, **REF), rel=1e-9, abs=1e-12)


def test_hypervolume_two_boxes_by_hand():
    # Boxes [0.5, 0.7] x [2, 5] and [0.5, 0.9] x [4, 5] in (AUC, log10 bytes): 0.6 + 0.4 - 0.2 overlap.
    assert hypervolume([0.7, 0.9], [100, 10_000], ref_bytes=10**5) == pytest.approx(0.8)


def test_hypervolume_ignores_points_outside_reference():
    assert hypervolume([0.4, 0.9, 0.5], [10, 10**6, 10], ref_bytes=10**5) == 0.0


@given(points, st.data())
def test_hypervolume_unchanged_by_dominated_points(pts, data):
    a, s = data.draw(st.sampled_from(pts))
    worse = (a - data.draw(st.integers(0, 3)) / 40, s * 10 ** (data.draw(st.integers(0, 3)) / 2))
    assert hv(pts + [worse]) == pytest.approx(hv(pts), rel=1e-9, abs=1e-12)


@given(points, st.tuples(aucs, sizes))
def test_hypervolume_grows_with_non_dominated_point(pts, new):
    before, after = hv(pts), hv(pts + [new])
    assert after >= before - 1e-12
    weakly_dominated = any(q[0] >= new[0] and q[1] <= new[1] for q in pts)
    if not weakly_dominated and new[0] > REF["ref_auc"] and new[1] < REF["ref_bytes"]:
        assert after > before + 1e-9


def test_hypervolume_refuses_bad_reference():
    with pytest.raises(ValueError, match="ref_bytes is 0"):
        hypervolume([0.7], [10], ref_bytes=0)
