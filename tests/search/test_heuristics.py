from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.dataset import FeatureInfo
from search.heuristics import HEURISTICS, heuristic_dims, mde_dims, mean_frequency
from tests.conftest import SHARED_ML100K


def _feature(name: str, n: int, multi: bool = False) -> FeatureInfo:
    return FeatureInfo(name, multi, n + 1)  # n real categories plus the unknown bucket


def _uniform_counts(features, per_category: dict[str, int]) -> dict[str, np.ndarray]:
    return {f.name: np.r_[0, np.full(f.cardinality - 1, per_category[f.name])] for f in features}


@pytest.mark.parametrize(
    "n, expected",
    [
        # hand-computed: sqrt(1682)=41.01, 1682/2=841, 1.6*1682^0.56=102.47, 1682^0.25=6.40
        (1682, {"sqrt": 41, "half50": 50, "fastai": 102, "google": 6}),
        # sqrt(942)=30.69, 942/2=471, 1.6*942^0.56=74.06, 942^0.25=5.54
        (942, {"sqrt": 31, "half50": 50, "fastai": 74, "google": 6}),
        # sqrt(9)=3, ceil(4.5)=5, 1.6*9^0.56=5.48, 9^0.25=1.73
        (9, {"sqrt": 3, "half50": 5, "fastai": 5, "google": 2}),
        (1, {"sqrt": 1, "half50": 1, "fastai": 2, "google": 1}),  # 1.6 rounds to 2
        (0, {"sqrt": 1, "half50": 1, "fastai": 1, "google": 1}),  # only the unknown bucket: still dim 1
        (10**7, {"sqrt": 3162, "half50": 50, "fastai": 600, "google": 56}),  # fastai's cap of 600
    ],
)
def test_heuristic_dims_known_cardinalities(n, expected):
    f = _feature("x", n)
    dims = heuristic_dims([f], {"x": np.ones(f.cardinality)})
    assert {rule: dims[rule]["x"] for rule in expected} == expected


def test_heuristic_dims_every_rule_labelled_and_at_least_one():
    features = [_feature("a", 0), _feature("b", 1), _feature("c", 500, multi=True)]
    dims = heuristic_dims(features, _uniform_counts(features, {"a": 1, "b": 7, "c": 3}))
    assert list(dims) == list(HEURISTICS) == ["sqrt", "half50", "fastai", "google", "mde"]
    assert HEURISTICS["sqrt"] == "√n" and HEURISTICS["mde"] == "MDE power-law"
    assert all(d >= 1 and isinstance(d, int) for rule in dims.values() for d in rule.values())
    assert all(set(rule) == {"a", "b", "c"} for rule in dims.values())


def test_mde_dims_more_frequent_feature_gets_larger_dim():
    features = [_feature("rare", 1000), _feature("mid", 1000), _feature("popular", 1000)]
    counts = _uniform_counts(features, {"rare": 2, "mid": 20, "popular": 200})
    dims = heuristic_dims(features, counts)["mde"]
    assert dims["rare"] < dims["mid"] < dims["popular"]
    # the power law: a 10x frequency ratio is a 10^0.3 ~ 2x dim ratio
    assert dims["mid"] / dims["rare"] == pytest.approx(10**0.3, rel=0.05)


def test_mde_dims_match_fastai_embedding_parameters():
    features = [_feature("user", 2000), _feature("item", 3000), _feature("genre", 400)]
    counts = _uniform_counts(features, {"user": 50, "item": 30, "genre": 250})
    dims = heuristic_dims(features, counts)
    params = {rule: sum(f.cardinality * dims[rule][f.name] for f in features) for rule in ("fastai", "mde")}
    assert params["mde"] == pytest.approx(params["fastai"], rel=0.01)
    assert dims["mde"] != dims["fastai"]  # same memory, shared differently


def test_mde_dims_capped_at_real_categories():
    features = [_feature("gender", 2), _feature("user", 5000)]
    dims = mde_dims(features, _uniform_counts(features, {"gender": 50_000, "user": 20}), {"gender": 2, "user": 100})
    assert dims["gender"] == 2  # the power law alone would give far more than the 2 categories can use
    assert dims["user"] > 1


@given(
    freq=st.lists(st.integers(1, 10_000), min_size=2, max_size=6),
    n=st.lists(st.integers(1, 5000), min_size=2, max_size=6),
)
def test_mde_dims_monotone_in_mean_frequency(freq, n):
    k = min(len(freq), len(n))
    features = [_feature(f"f{i}", n[i]) for i in range(k)]
    counts = _uniform_counts(features, {f"f{i}": freq[i] for i in range(k)})
    reference = {f.name: 16 for f in features}
    dims = mde_dims(features, counts, reference)
    # a feature seen more often per category never gets a smaller dim, unless capped at its category count
    for a in features:
        for b in features:
            fa, fb = freq[int(a.name[1:])], freq[int(b.name[1:])]
            if fa > fb and dims[a.name] < a.cardinality - 1:
                assert dims[a.name] >= dims[b.name]


def test_mean_frequency_ignores_unknown_bucket_and_checks_shape():
    f = _feature("x", 3)
    assert mean_frequency(f, {"x": np.array([1000, 2, 4, 6])}) == 4.0
    with pytest.raises(ValueError, match="counts for 'x' have shape"):
        mean_frequency(f, {"x": np.array([1, 2])})
    with pytest.raises(ValueError, match="no training counts given for feature 'x'"):
        heuristic_dims([f], {})


@pytest.mark.skipif(not (SHARED_ML100K / "ml-100k").is_dir(), reason="MovieLens 100K not available")
def test_heuristic_dims_movielens_100k():
    from pipelines import prepare
    from pipelines.movielens import load_movielens

    data = prepare(load_movielens(SHARED_ML100K / "ml-100k"))
    dims = heuristic_dims(data.features, {f.name: data.counts(f.name) for f in data.features})
    n_items = next(f.cardinality - 1 for f in data.features if f.name == "item_id")
    assert dims["sqrt"]["item_id"] == round(n_items**0.5)
    assert dims["fastai"]["item_id"] == round(1.6 * n_items**0.56)
    # gender's 2 categories are each in ~half the rows: the power law hits its cap of n = 2
    assert dims["mde"]["gender"] == 2
    assert dims["mde"]["user_id"] > dims["mde"]["item_id"]  # a user is seen more often than an item, on average


def test_baselines_keep_the_dims_the_spec_pins_and_take_the_rules_for_the_rest():
    # a pinned search used to train every baseline with the rule's dim for the pinned feature too, so its front, and
    # its recommendation, could hold a dim for that feature the user had fixed to another
    from pipelines import SyntheticSpec, generate, prepare
    from search.runner import heuristic_configs
    from search.space import DIM_PREFIX, FeatureSpec, SearchSpec, build_space

    data = prepare(generate(SyntheticSpec(rows=3000, seed=2)))
    pinned, *others = [f.name for f in data.features]
    counts = {f.name: data.counts(f.name) for f in data.features}
    rules = heuristic_dims(data.features, counts)
    assert 7 not in {d[pinned] for d in rules.values()}  # the pin differs from every rule's dim
    space = build_space(data.features, SearchSpec(features={pinned: FeatureSpec(pin=7)}))
    configs = heuristic_configs(data, space, None)
    assert list(configs) == list(HEURISTICS)
    for rule, config in configs.items():
        assert config[DIM_PREFIX + pinned] == 7
        assert {n: config[DIM_PREFIX + n] for n in others} == {n: rules[rule][n] for n in others}
    # the memory budget is judged on the pinned config: a pin large enough puts every baseline over it
    big = build_space(data.features, SearchSpec(features={pinned: FeatureSpec(pin=4000)}))
    unpinned = heuristic_configs(data, build_space(data.features, SearchSpec()), None)
    budget = max(space.bytes(c) for c in unpinned.values())
    assert heuristic_configs(data, big, budget) == {}
