from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from search.pareto import non_dominated
from search.recommend import recommend

aucs = st.integers(0, 40).map(lambda v: 0.6 + v / 200)  # steps of 0.005: ties, and gaps near epsilon
sizes = st.integers(0, 12).map(lambda v: 10 ** (2 + v / 3))
points = st.lists(st.tuples(aucs, sizes), min_size=1, max_size=25)
TOL = 1e-9

# A concave front (diminishing returns, knee at 1 KB) plus a dominated point at index 5.
AUC = [0.60, 0.75, 0.78, 0.79, 0.80, 0.70]
SIZE = [100, 1_000, 10_000, 100_000, 1_000_000, 50_000]


@pytest.mark.parametrize("epsilon, pick", [(0.0, 4), (0.002, 4), (0.01, 3), (0.025, 2), (0.05, 1), (1.0, 0)])
def test_recommend_epsilon_by_hand(epsilon, pick):
    assert recommend(AUC, SIZE, epsilon=epsilon) == pick


def test_recommend_epsilon_counts_exact_decimal_gap():
    assert recommend([0.800, 0.798], [2_000, 1_000], epsilon=0.002) == 1


def test_recommend_epsilon_zero_takes_smallest_copy_of_best():
    assert recommend([0.8, 0.8, 0.8, 0.7], [200, 100, 100, 50], epsilon=0.0) == 1


def test_recommend_knee_by_hand():
    # Scaled: log-size 0, .25, .5, .75, 1 against AUC 0, .75, .9, .95, 1; the 1 KB model is farthest above the line.
    assert recommend(AUC, SIZE, rule="knee") == 1


def test_recommend_knee_without_bulge_uses_epsilon():
    # Convex front: every interior point lies below the line, so the epsilon rule picks the best model.
    assert recommend([0.60, 0.61, 0.63, 0.80], [100, 1_000, 10_000, 100_000], rule="knee") == 3


@pytest.mark.parametrize("auc, size, pick", [([0.7], [10], 0), ([0.70, 0.80, 0.60], [10, 1_000, 100], 1)])
def test_recommend_knee_on_short_front_uses_epsilon(auc, size, pick):
    assert recommend(auc, size, rule="knee") == pick


@pytest.mark.parametrize("budget, pick", [(100, 0), (9_999, 1), (10_000, 2), (10**9, 4)])
def test_recommend_budget_by_hand(budget, pick):
    assert recommend(AUC, SIZE, rule="budget", budget=budget) == pick


def test_recommend_budget_names_budget_and_smallest_model():
    with pytest.raises(ValueError, match="budget of 99 bytes; the smallest model on the front has 100 bytes"):
        recommend(AUC, SIZE, rule="budget", budget=99)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(rule="best"), "rule is 'best', but must be one of epsilon, knee, budget"),
     (dict(epsilon=-0.1), "epsilon is -0.1, but must be"), (dict(epsilon=float("nan")), "epsilon is nan"),
     (dict(rule="budget"), "needs a budget"), (dict(rule="budget", budget=0), "budget is 0")],
)
def test_recommend_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recommend(AUC, SIZE, **kwargs)


def test_recommend_refuses_empty_input():
    with pytest.raises(ValueError, match="empty"):
        recommend([], [])


@given(points, st.sampled_from([0.0, 0.002, 0.005, 0.02, 0.1]))
def test_recommend_epsilon_is_smallest_close_front_point(pts, epsilon):
    a, s = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    i = recommend(a, s, epsilon=epsilon)
    front = non_dominated(a, s)
    best = a[front].max()
    assert front[i] and best - a[i] <= epsilon + TOL
    close = front & (best - a <= epsilon + TOL)
    assert s[i] == s[close].min()
    if epsilon == 0:
        assert a[i] == a.max() and s[i] == s[a == a.max()].min()


@given(points, st.sampled_from(["knee", "budget"]), sizes)
def test_recommend_other_rules_pick_front_points(pts, rule, budget):
    a, s = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if rule == "budget" and s.min() > budget:
        with pytest.raises(ValueError, match="no trial fits"):
            recommend(a, s, rule=rule, budget=budget)
        return
    i = recommend(a, s, rule=rule, budget=budget)
    assert non_dominated(a, s)[i]
    if rule == "budget":
        assert s[i] <= budget and a[i] == a[s <= budget].max()


def test_recommend_knee_without_a_knee_takes_the_epsilon():
    """Why `search --knee --epsilon` is accepted: the epsilon decides the knee rule's fallback."""
    auc, size = [0.60, 0.61, 0.63, 0.80], [100, 1_000, 10_000, 100_000]  # convex: no knee
    assert recommend(auc, size, rule="knee", epsilon=0.002) == 3
    assert recommend(auc, size, rule="knee", epsilon=0.5) == 0
