from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pipelines import EmbeddingRecommender, model_bytes
from pipelines.dataset import FeatureInfo
from search.space import (
    FeatureSpec,
    Range,
    SearchSpace,
    SearchSpec,
    build_space,
    hidden_layers,
    load_spec,
    parse_spec,
)

FEATURES = (
    FeatureInfo("user_id", False, 944),
    FeatureInfo("item_id", False, 1683),
    FeatureInfo("gender", False, 3),
    FeatureInfo("genres", True, 20),
)
EXAMPLE = """
min_dim: 2
max_dim: 64
grid: pow2
features: {user_id: {pin: 16}, item_id: {low: 8, high: 32}}
lr: {low: 0.001, high: 0.01}
hidden: [32, 64, 128]
dropout: {low: 0.0, high: 0.3}
"""


def _sample(space: SearchSpace, seed: int = 0) -> dict:
    """A config drawn by Optuna itself from the space's distributions."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return study.ask(space.distributions()).params


# --- the spec ---------------------------------------------------------------------------------------------------


def test_load_spec_docstring_example(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(EXAMPLE)
    spec = load_spec(path)
    assert spec == SearchSpec(
        min_dim=2,
        max_dim=64,
        grid="pow2",
        features={"user_id": FeatureSpec(pin=16), "item_id": FeatureSpec(low=8, high=32)},
        lr=Range(0.001, 0.01),
        hidden=(32, 64, 128),
        dropout=Range(0.0, 0.3),
    )


def test_parse_spec_defaults_and_fixed_knobs():
    assert parse_spec({}) == SearchSpec()
    spec = parse_spec({"lr": 0.003, "hidden": 128, "dropout": 0.1, "features": {"gender": 1}})
    assert (spec.lr, spec.hidden, spec.dropout) == (0.003, 128, 0.1)
    assert spec.features == {"gender": FeatureSpec(pin=1)}  # a bare number pins


def test_parse_spec_accepts_exponent_without_dot():
    # PyYAML reads 1e-3 as the string "1e-3" (YAML 1.1 needs a dot); the spec takes it as the number it means
    spec = parse_spec(yaml.safe_load("lr: {low: 1e-3, high: 1e-2}"))
    assert spec.lr == Range(1e-3, 1e-2)


def test_load_spec_empty_file_is_default(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_spec(path) == SearchSpec()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"max_dims": 32}, "unknown key 'max_dims' in the search spec; valid keys: dropout, features, grid, hidden"),
        ({"features": {"user_id": {"pinned": 4}}}, "unknown key 'pinned' in features.user_id; valid keys: high, low"),
        ({"lr": {"low": 0.001, "hi": 0.01}}, "unknown key 'hi' in lr; valid keys: high, low"),
        ({"lr": {"low": "abc", "high": 0.01}}, "lr.low is 'abc', but must be a number"),
        ({"lr": {"low": 0.001}}, "lr has no high"),
        ({"lr": {"low": 0.01, "high": 0.001}}, "lr.low is 0.01, but must be <= lr.high"),
        ({"lr": 0}, "lr is 0.0, but must be > 0"),
        ({"lr": None}, "lr is None, but must be a number or a mapping"),
        ({"dropout": 1.0}, "dropout is 1.0, but must be in [0, 1)"),
        ({"dropout": {"low": -0.1, "high": 0.2}}, "dropout.low is -0.1, but must be in [0, 1)"),
        ({"hidden": []}, "hidden is an empty list"),
        ({"hidden": [64, 64]}, "hidden is [64, 64], which repeats a width"),
        ({"hidden": [64, "big"]}, "hidden[1] is 'big', but must be an integer >= 1"),
        ({"hidden": 0}, "hidden is 0, but must be >= 1"),
        ({"min_dim": 0}, "min_dim is 0, but must be >= 1"),
        ({"min_dim": 2.5}, "min_dim is 2.5, but must be an integer >= 1"),
        ({"max_dim": True}, "max_dim is True, but must be an integer >= 1"),
        ({"min_dim": 16, "max_dim": 8}, "max_dim is 8, but must be >= min_dim (16)"),
        ({"grid": "linear"}, "grid is 'linear', but must be one of: log, pow2"),
        ({"features": ["user_id"]}, "features is ['user_id'], but must be a mapping"),
        ({"features": {"user_id": {"pin": 0}}}, "features.user_id.pin is 0, but must be >= 1"),
        ({"features": {"user_id": {"pin": 4, "low": 2}}}, "features.user_id has both pin and low/high"),
        ({"features": {"user_id": {"low": 40, "high": 8}}}, "features.user_id.low is 40, but must be <= its high (8)"),
        ({"features": {"user_id": {"high": 128}}}, "features.user_id.high is 128, but must be <= max_dim (64)"),
        ({"min_dim": 4, "features": {"user_id": {"low": 2}}}, "features.user_id.low is 2, but must be >= min_dim (4)"),
        ({"features": {"user_id": "big"}}, "features.user_id is 'big', but must be a dim (pin) or a mapping"),
        (["lr", 0.01], "the search spec is a list, but must be a mapping"),
    ],
)
def test_parse_spec_refuses_bad_input(spec, message):
    with pytest.raises(ValueError) as e:
        parse_spec(spec)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_load_spec_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_dim: 32\nlr: {low: 0.001, high: 0.01\ngrid: log\n")
    with pytest.raises(ValueError, match=r"search spec '.*bad\.yaml' is not valid YAML at line \d+"):
        load_spec(path)


def test_load_spec_errors_name_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"search spec '.*s\.yaml': the search spec is a list"):
        load_spec(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_search_spec_replace_is_validated():
    # the CLI applies --min-dim/--max-dim/--grid with dataclasses.replace and relies on this ValueError
    spec = parse_spec({"features": {"item_id": {"high": 32}}})
    with pytest.raises(ValueError, match="features.item_id.high is 32, but must be <= max_dim \\(16\\)"):
        dataclasses.replace(spec, max_dim=16)


_dim = st.integers(1, 300)
_lr = st.floats(1e-6, 1.0, allow_nan=False)
_drop = st.floats(0.0, 0.99, allow_nan=False)


@st.composite
def _specs(draw) -> SearchSpec:
    min_dim = draw(st.integers(1, 16))
    max_dim = draw(st.integers(min_dim, 300))
    features = {}
    for name in draw(st.lists(st.sampled_from([f.name for f in FEATURES]), unique=True)):
        if draw(st.booleans()):
            features[name] = FeatureSpec(pin=draw(_dim))
        else:
            low = draw(st.none() | st.integers(min_dim, max_dim))
            high = draw(st.none() | st.integers(low or min_dim, max_dim))
            features[name] = FeatureSpec(low=low, high=high)

    def frange(values):
        a, b = sorted(draw(st.tuples(values, values)))
        return Range(a, b)

    return SearchSpec(
        min_dim=min_dim,
        max_dim=max_dim,
        grid=draw(st.sampled_from(["log", "pow2"])),
        features=features,
        lr=draw(_lr | st.builds(lambda: frange(_lr))),
        hidden=draw(st.integers(1, 512) | st.lists(_dim, min_size=1, max_size=4, unique=True).map(tuple)),
        dropout=draw(_drop | st.builds(lambda: frange(_drop))),
    )


@given(_specs())
def test_parse_spec_round_trips_through_yaml(spec):
    text = yaml.safe_dump(spec.to_dict())
    assert parse_spec(yaml.safe_load(text)) == spec


_scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=8)
_junk = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)
_keys = st.sampled_from(["min_dim", "max_dim", "grid", "features", "lr", "hidden", "dropout", "low", "high", "pin"])
_spec_like = st.dictionaries(
    _keys,
    _junk | st.dictionaries(_keys | st.text(max_size=4), _junk | st.dictionaries(_keys, _junk, max_size=3), max_size=3),
    max_size=5,
)


@settings(max_examples=300)
@given(_spec_like | _junk)
def test_parse_spec_junk_raises_only_value_error(d):
    try:
        spec = parse_spec(d)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(spec, SearchSpec)
        assert parse_spec(spec.to_dict()) == spec


# --- the space --------------------------------------------------------------------------------------------------


def test_build_space_default_bounds_and_distributions():
    space = build_space(FEATURES)
    assert space.ranges == {"user_id": (1, 64), "item_id": (1, 64), "gender": (1, 2), "genres": (1, 19)}
    assert space.pins == {}
    d = space.distributions()
    assert d["dim.user_id"] == IntDistribution(1, 64, log=True)
    assert d["dim.genres"] == IntDistribution(1, 19, log=True)  # 19 real categories cap the range
    assert d["lr"] == FloatDistribution(1e-3, 1e-2, log=True)
    assert set(d) == {"dim.user_id", "dim.item_id", "dim.gender", "dim.genres", "lr"}  # hidden, dropout fixed


def test_build_space_pow2_example_spec():
    space = build_space(FEATURES, parse_spec(yaml.safe_load(EXAMPLE)))
    d = space.distributions()
    assert "dim.user_id" not in d and space.pins["user_id"] == 16
    assert d["dim.item_id"] == CategoricalDistribution((8, 16, 32))
    assert d["dim.genres"] == CategoricalDistribution((2, 4, 8, 16))
    assert space.pins["gender"] == 2  # two real categories, min_dim 2: one possible dim
    assert d["hidden"] == CategoricalDistribution((32, 64, 128))
    assert d["dropout"] == FloatDistribution(0.0, 0.3)


@pytest.mark.parametrize(
    "cardinality, spec, expected",
    [
        (1, SearchSpec(), ("pin", 1)),  # only the unknown bucket
        (2, SearchSpec(), ("pin", 1)),  # one real category
        (4, SearchSpec(min_dim=8), ("pin", 3)),  # n=3 < min_dim: a dim above n is wasted, the cap wins
        (4, SearchSpec(), ("range", (1, 3))),
        (10_000, SearchSpec(max_dim=32), ("range", (1, 32))),
        (10_000, SearchSpec(min_dim=5, max_dim=7, grid="pow2"), ("pin", 5)),  # no power of two in [5, 7]
        (10_000, SearchSpec(min_dim=3, max_dim=6, grid="pow2"), ("pin", 4)),  # one power of two
        (100, SearchSpec(grid="pow2"), ("range", (1, 64))),
        (100, SearchSpec(features={"x": FeatureSpec(pin=500)}), ("pin", 500)),  # a pin is taken as given
    ],
)
def test_build_space_feature_bounds(cardinality, spec, expected):
    space = build_space([FeatureInfo("x", False, cardinality)], spec)
    kind, value = expected
    assert (space.pins if kind == "pin" else space.ranges)["x"] == value
    assert "x" not in (space.ranges if kind == "pin" else space.pins)


def test_build_space_unknown_feature_lists_known_ones():
    with pytest.raises(ValueError, match="unknown feature 'age'; known features: user_id, item_id, gender, genres"):
        build_space(FEATURES, parse_spec({"features": {"age": {"pin": 4}}}))


def test_decode_fills_pins_and_fixed_knobs():
    space = build_space(FEATURES, parse_spec({"features": {"user_id": 16}, "hidden": 1, "lr": 0.002}))
    model, train = space.decode({"dim.item_id": 8, "dim.gender": 2, "dim.genres": 3, "heuristic": "sqrt"})
    assert dict(model.dims) == {"user_id": 16, "item_id": 8, "gender": 2, "genres": 3}
    assert model.hidden == (1, 1) and model.dropout == 0.0
    assert train == {"lr": 0.002}
    assert hidden_layers(64) == (64, 32)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"dim.user_id": 4, "dim.gender": 1, "dim.genres": 1, "lr": 0.003}, "config has no 'dim.item_id'"),
        ({"dim.user_id": 0, "dim.item_id": 1, "dim.gender": 1, "dim.genres": 1, "lr": 0.003}, "dim for 'user_id' is 0"),
        ({"dim.user_id": 2.5, "dim.item_id": 1, "dim.gender": 1, "dim.genres": 1, "lr": 0.003}, "'user_id' is 2.5"),
        ({"dim.user_id": 4, "dim.item_id": 1, "dim.gender": 1, "dim.genres": 1}, "config has no 'lr'"),
        ({"dim.age": 4}, "config key 'dim.age' names an unknown feature"),
    ],
)
def test_decode_refuses_bad_configs(config, message):
    with pytest.raises(ValueError, match=message):
        build_space(FEATURES).decode(config)


def test_encode_heuristic_dims_outside_range_and_baseline_knobs():
    space = build_space(FEATURES, parse_spec({"hidden": [32, 48, 128], "lr": {"low": 0.005, "high": 0.01}}))
    dims = {"user_id": 100, "item_id": 41, "gender": 1, "genres": 4}  # 100 > max_dim: a baseline may exceed it
    config = space.encode(dims)
    expected = {"dim.user_id": 100, "dim.item_id": 41, "dim.gender": 1, "dim.genres": 4}
    assert config == {**expected, "lr": 0.005, "hidden": 48}
    assert not space.contains(config)
    assert space.contains({**config, "dim.user_id": 64})
    model, train = space.decode(config)
    assert dict(model.dims) == dims and model.hidden == (48, 24) and train == {"lr": 0.005}
    with pytest.raises(ValueError, match="no dim given for feature 'genres'"):
        space.encode({"user_id": 4, "item_id": 4, "gender": 1})
    with pytest.raises(ValueError, match="unknown knob 'width'"):
        space.encode(dims, width=4)


def test_bytes_match_the_real_model():
    space = build_space(FEATURES, parse_spec({"hidden": [16, 64]}))
    config = space.encode({"user_id": 7, "item_id": 12, "gender": 2, "genres": 5}, hidden=16)
    model_cfg, _ = space.decode(config)
    model = EmbeddingRecommender(FEATURES, model_cfg.dims, model_cfg.hidden, model_cfg.dropout)
    assert space.bytes(config) == 4 * sum(p.numel() for p in model.parameters())


def test_min_max_bytes_bound_sampled_configs():
    space = build_space(FEATURES, parse_spec({"grid": "pow2", "hidden": [16, 64, 128], "features": {"gender": 1}}))
    low = {"dim.user_id": 1, "dim.item_id": 1, "dim.genres": 1, "hidden": 16}
    high = {"dim.user_id": 64, "dim.item_id": 64, "dim.genres": 16, "hidden": 128}
    assert space.min_bytes() == model_bytes(FEATURES, {"user_id": 1, "item_id": 1, "gender": 1, "genres": 1}, (16, 8))
    assert space.max_bytes() == space.bytes({**high, "lr": 0.003})
    assert space.contains({**low, "lr": 0.001}) and space.contains({**high, "lr": 0.01})
    for seed in range(20):
        config = _sample(space, seed)
        assert space.contains(config)
        assert space.min_bytes() <= space.bytes(config) <= space.max_bytes()


@pytest.mark.parametrize(
    "change",
    [
        {"dim.user_id": 128},  # above max_dim
        {"dim.user_id": 24},  # not a power of two
        {"dim.gender": 2},  # gender is pinned at 1
        {"hidden": 32},  # not a choice
        {"lr": 0.1},  # outside the lr range
        {"dropout": 0.2},  # dropout is fixed at 0.0
        {"dim.age": 4},  # unknown feature
        {"dim.user_id": True},  # a bool is no dim
    ],
)
def test_contains_refuses_points_outside(change):
    space = build_space(FEATURES, parse_spec({"grid": "pow2", "hidden": [16, 64], "features": {"gender": 1}}))
    config = {"dim.user_id": 16, "dim.item_id": 8, "dim.genres": 4, "hidden": 64, "lr": 0.003}
    assert space.contains(config)
    assert not space.contains({**config, **change})


@pytest.mark.parametrize("grid", ["log", "pow2"])
@pytest.mark.parametrize("budget", [30_000, 60_000, 200_000, 10**7])
def test_shrink_fits_budget_inside_space(grid, budget):
    space = build_space(FEATURES, parse_spec({"grid": grid, "hidden": [32, 64, 128]}))
    config = {"dim.user_id": 64, "dim.item_id": 64, "dim.gender": 2, "dim.genres": 16, "hidden": 128, "lr": 0.005}
    shrunk = space.shrink(config, budget)
    assert space.contains(shrunk) and space.bytes(shrunk) <= budget
    assert shrunk["lr"] == 0.005
    assert all(shrunk[k] <= config[k] for k in config if k.startswith("dim."))
    if space.bytes(config) <= budget:
        assert shrunk == config


def test_shrink_below_min_bytes_refused():
    space = build_space(FEATURES)
    with pytest.raises(ValueError, match="below the smallest model in the space"):
        space.shrink(_sample(space), space.min_bytes() - 1)


@st.composite
def _spaces(draw) -> SearchSpace:
    cards = draw(st.lists(st.integers(1, 5000), min_size=1, max_size=5))
    features = [FeatureInfo(f"f{i}", draw(st.booleans()), c) for i, c in enumerate(cards)]
    min_dim = draw(st.integers(1, 8))
    spec = SearchSpec(
        min_dim=min_dim,
        max_dim=draw(st.integers(min_dim, 128)),
        grid=draw(st.sampled_from(["log", "pow2"])),
        hidden=draw(st.integers(1, 64) | st.lists(st.integers(1, 256), min_size=2, max_size=3, unique=True).map(tuple)),
        dropout=draw(st.sampled_from([0.0, Range(0.0, 0.5)])),
    )
    return build_space(features, spec)


@settings(max_examples=60, deadline=None)
@given(_spaces(), st.integers(0, 1000))
def test_space_bounds_and_encode_decode_round_trip(space, seed):
    for f in space.features:
        low, high = space.ranges.get(f.name, (space.pins.get(f.name),) * 2)
        assert 1 <= low <= high <= max(1, min(f.cardinality - 1, 128))
    config = _sample(space, seed)
    model, train = space.decode(config)
    assert set(model.dims) == {f.name for f in space.features}
    knobs = {"lr": train["lr"], "hidden": model.hidden[0], "dropout": model.dropout}
    again = space.encode(model.dims, **knobs)
    assert {k: again[k] for k in config} == config
    assert space.decode(again) == (model, train)
    assert space.contains(again)
    assert math.isclose(space.bytes(again), model_bytes(space.features, model.dims, model.hidden))


_yaml_tokens = st.sampled_from([
    "max_dim", "min_dim", "grid", "features", "user_id", "item_id", "pin", "low", "high", "lr", "hidden", "dropout",
    ":", ": ", "\n", "\n  ", "- ", "{", "}", "[", "]", ",", "'", '"', "#", "\t", "0", "1", "16", "-3", "1e-3", "0.5",
    "pow2", "log", "null", "true", "~", "&a ", "*a", "!!str ", "!!python/object/apply:os.system ", "%YAML 1.2\n---\n",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(_yaml_tokens, max_size=30).map("".join) | st.text(max_size=60))
def test_load_spec_any_file_text_raises_only_value_errors_naming_the_file(text):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(text)
        try:
            spec = load_spec(path)
        except ValueError as e:
            assert str(e).startswith(f"search spec '{path}'") and "\n" not in str(e)
        else:
            assert isinstance(spec, SearchSpec)


def test_load_spec_refuses_python_tags_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "spec.yaml"
    path.write_text(f"max_dim: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_spec(path)
    assert not marker.exists()


def test_spec_readme_example_is_a_valid_spec():
    """The `--spec` example in the README's "Shaping the search" parses and does what its comments say."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**Shaping the search.**"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    block = section[start:section.index("```", start)]
    features = (FeatureInfo("user_id", False, 301), FeatureInfo("item_id", False, 501),
                FeatureInfo("country", False, 6), FeatureInfo("tags", True, 9))
    space = build_space(features, parse_spec(yaml.safe_load(block)))
    assert space.pins == {"country": 4}
    assert space.ranges["user_id"] == (8, 32) and space.ranges["item_id"][-1] == 32
    assert space.lr == 0.003 and space.hidden == (32, 64)
