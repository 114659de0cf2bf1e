"""The search space: which embedding dims (and which training knobs) a search samples, from a YAML spec.

A spec file is a mapping; every key is optional (the values shown are the defaults unless noted)::

    min_dim: 1                      # smallest dim searched for any feature
    max_dim: 64                     # largest dim searched for any feature (global cap)
    grid: log                       # log: every integer, sampled log-uniformly | pow2: powers of two only
    features:                       # per-feature overrides (names are checked against the data)
      user_id: {pin: 16}            # fixed dim, not searched (shorthand: `user_id: 16`); may lie outside the bounds
      item_id: {low: 8, high: 32}   # narrowed range, within [min_dim, max_dim]
    lr: {low: 0.001, high: 0.01}    # searched log-uniformly; a number fixes it (`lr: 0.003`)
    hidden: 64                      # MLP width w -> hidden layers (w, w//2); a list is searched (`[32, 64, 128]`)
    dropout: 0.0                    # fixed; {low: 0.0, high: 0.3} searches it uniformly

Per feature with n real categories (cardinality - 1; index 0 is the unknown bucket) the searched range is
``[low, high]`` with ``high = max(1, min(n, max_dim, feature high))`` and
``low = min(max(min_dim, feature low), high)``:
a dim above n is wasted, so the cap wins over min_dim, and a feature with a single possible dim (for example one real
category) is pinned there. On the pow2 grid the choices are the powers of two in ``[low, high]``; when there are fewer
than two, the feature is pinned (at the one power of two, or at ``low`` when there is none).

A trial config is flat, as Ray Tune + Optuna produce it: ``"dim.<feature>"`` (int) per searched feature, and ``"lr"``,
``"hidden"``, ``"dropout"`` when searched. Absent keys take the space's fixed values. Heuristic-baseline configs carry
every feature's dim and a ``"heuristic"`` label, which decoding ignores: a searched feature's dim is the rule's
(possibly outside the sampled range), a pinned feature's is its pin.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pipelines.dataset import FeatureInfo
from pipelines.memory import model_bytes
from pipelines.model import ModelConfig
from pipelines.train import TrainConfig

GRIDS = ("log", "pow2")
KNOBS = ("lr", "hidden", "dropout")
DIM_PREFIX = "dim."
_SPEC_KEYS = ("min_dim", "max_dim", "grid", "features") + KNOBS
_FEATURE_KEYS = ("pin", "low", "high")
_RANGE_KEYS = ("low", "high")
# Values heuristic baselines train with when a knob is searched (clamped into its range): the pipelines' defaults.
BASELINE_KNOBS = {"lr": TrainConfig.lr, "hidden": ModelConfig.hidden[0], "dropout": ModelConfig.dropout}


def config_from_params(params: Mapping[str, str]) -> dict:
    """A trial config back from its MLflow run's params (strings): dims and ``hidden`` as ints, ``lr`` and
    ``dropout`` as floats, anything else (a baseline's ``heuristic``) as it is."""
    def typed(key: str, value: str):
        if key.startswith(DIM_PREFIX) or key == "hidden":
            return int(float(value))
        if key in ("lr", "dropout"):
            return float(value)
        return value

    return {k: typed(k, v) for k, v in params.items()}


@dataclass(frozen=True)
class Range:
    """A searched float knob: sampled in [low, high] (inclusive)."""

    low: float
    high: float


@dataclass(frozen=True)
class FeatureSpec:
    """Override for one feature: a pin, or a narrowed range (either bound may be left to the global one)."""

    pin: int | None = None  # fixed dim; excludes low/high
    low: int | None = None  # None: the spec's min_dim
    high: int | None = None  # None: the spec's max_dim


@dataclass(frozen=True)
class SearchSpec:
    min_dim: int = 1  # smallest dim searched for any feature
    max_dim: int = 64  # global cap on any searched dim
    grid: str = "log"  # "log": all integers, log-uniform; "pow2": powers of two between the bounds
    features: Mapping[str, FeatureSpec] = field(default_factory=dict)  # per-feature pins / narrowed ranges
    lr: float | Range = Range(1e-3, 1e-2)  # searched log-uniformly; a float fixes it
    hidden: int | tuple[int, ...] = 64  # MLP width w -> layers (w, w//2); a tuple is searched as choices
    dropout: float | Range = 0.0  # fixed; a Range is searched uniformly

    def __post_init__(self) -> None:
        # The one place the rules live, so a spec built in code, parsed from YAML or changed with
        # dataclasses.replace (the CLI's --min-dim/--max-dim/--grid) is checked the same way.
        _check_int(self.min_dim, "min_dim")
        _check_int(self.max_dim, "max_dim")
        if self.max_dim < self.min_dim:
            raise ValueError(
                f"max_dim is {self.max_dim}, but must be >= min_dim ({self.min_dim}); raise max_dim or lower min_dim"
            )
        if self.grid not in GRIDS:
            raise ValueError(f"grid is {self.grid!r}, but must be one of: {', '.join(GRIDS)}")
        if not isinstance(self.features, Mapping):
            raise ValueError(f"features is {self.features!r}, but must be a mapping of feature name to override")
        object.__setattr__(self, "features", dict(self.features))
        for name, fs in self.features.items():
            self._check_feature(name, fs)
        _check_float_knob(self.lr, "lr", lambda v: v > 0, "> 0")
        _check_float_knob(self.dropout, "dropout", lambda v: 0 <= v < 1, "in [0, 1)")
        if isinstance(self.hidden, (tuple, list)):
            object.__setattr__(self, "hidden", tuple(self.hidden))
            if not self.hidden:
                raise ValueError("hidden is an empty list, but must list at least one width, e.g. [32, 64]")
            for i, w in enumerate(self.hidden):
                _check_int(w, f"hidden[{i}]")
            if len(set(self.hidden)) != len(self.hidden):
                raise ValueError(f"hidden is {list(self.hidden)}, which repeats a width; list each width once")
        else:
            _check_int(self.hidden, "hidden", "an integer >= 1 or a list of them")

    def _check_feature(self, name: str, fs: FeatureSpec) -> None:
        where = f"features.{name}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"feature name {name!r} in the search spec must be a non-empty string")
        if not isinstance(fs, FeatureSpec):
            raise ValueError(f"{where} is {fs!r}, but must be a FeatureSpec")
        if fs.pin is not None:
            _check_int(fs.pin, f"{where}.pin")
            if fs.low is not None or fs.high is not None:
                raise ValueError(f"{where} has both pin and low/high; give either a pin or a range")
            return
        for key in _RANGE_KEYS:
            if getattr(fs, key) is not None:
                _check_int(getattr(fs, key), f"{where}.{key}")
        low = self.min_dim if fs.low is None else fs.low
        high = self.max_dim if fs.high is None else fs.high
        if low < self.min_dim:
            raise ValueError(f"{where}.low is {low}, but must be >= min_dim ({self.min_dim}); raise it or min_dim")
        if high > self.max_dim:
            raise ValueError(f"{where}.high is {high}, but must be <= max_dim ({self.max_dim}); lower it or max_dim")
        if low > high:
            raise ValueError(f"{where}.low is {low}, but must be <= its high ({high}); swap or widen the bounds")

    def to_dict(self) -> dict:
        """The YAML shape of this spec (``parse_spec(spec.to_dict()) == spec``)."""

        def knob(v: Any) -> Any:
            if isinstance(v, Range):
                return {"low": v.low, "high": v.high}
            return list(v) if isinstance(v, tuple) else v

        features = {
            name: {k: getattr(fs, k) for k in _FEATURE_KEYS if getattr(fs, k) is not None}
            for name, fs in self.features.items()
        }
        return {"min_dim": self.min_dim, "max_dim": self.max_dim, "grid": self.grid, "features": features,
                **{k: knob(getattr(self, k)) for k in KNOBS}}


def load_spec(path: str | Path) -> SearchSpec:
    """Read and validate a YAML search spec; an empty file is the default spec."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"search spec '{path}' does not exist; check the --spec path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"search spec '{path}' cannot be read ({e}); give a readable UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"search spec '{path}' is not valid YAML{where}: {problem}; fix the YAML syntax") from None
    try:
        return parse_spec({} if data is None else data)
    except ValueError as e:
        raise ValueError(f"search spec '{path}': {e}") from None


def parse_spec(d: Mapping) -> SearchSpec:
    """A spec from its YAML mapping: checks keys and types here, the rules in ``SearchSpec``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"the search spec is a {type(d).__name__}, but must be a mapping of keys such as max_dim, lr")
    _check_keys(d, _SPEC_KEYS, "the search spec")
    args: dict[str, Any] = {k: d[k] for k in ("min_dim", "max_dim", "grid") if k in d}
    if "features" in d and d["features"] is not None:
        features = d["features"]
        if not isinstance(features, Mapping):
            raise ValueError(f"features is {features!r}, but must be a mapping such as {{user_id: {{pin: 16}}}}")
        args["features"] = {name: _feature(fs, f"features.{name}") for name, fs in features.items()}
    for k in ("lr", "dropout"):
        if k in d:
            args[k] = _float_knob(d[k], k)
    if "hidden" in d:
        hidden = d["hidden"]
        args["hidden"] = tuple(hidden) if isinstance(hidden, list) else hidden
    return SearchSpec(**args)


def _feature(value: Any, where: str) -> FeatureSpec:
    if isinstance(value, int) and not isinstance(value, bool):
        return FeatureSpec(pin=value)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} is {value!r}, but must be a dim (pin) or a mapping such as {{low: 8, high: 32}}")
    _check_keys(value, _FEATURE_KEYS, where)
    return FeatureSpec(**{k: value[k] for k in _FEATURE_KEYS if k in value})


def _float_knob(value: Any, where: str) -> float | Range:
    if isinstance(value, Mapping):
        _check_keys(value, _RANGE_KEYS, where)
        missing = [k for k in _RANGE_KEYS if k not in value]
        if missing:
            raise ValueError(f"{where} has no {missing[0]}; give both, e.g. {where}: {{low: 0.001, high: 0.01}}")
        return Range(_number(value["low"], f"{where}.low"), _number(value["high"], f"{where}.high"))
    return _number(value, where, " or a mapping {low: ..., high: ...}")


def _number(value: Any, where: str, alt: str = "") -> float:
    # PyYAML reads 1e-3 (no dot) as a string, so numeric strings are accepted rather than refused confusingly.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not _real(value):
        raise ValueError(f"{where} is {value!r}, but must be a number{alt}")
    return float(value)


def _check_keys(d: Mapping, valid: Sequence[str], where: str) -> None:
    for key in d:
        if key not in valid:
            raise ValueError(f"unknown key {key!r} in {where}; valid keys: {', '.join(sorted(valid))}")


def _check_int(value: Any, where: str, what: str = "an integer >= 1") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} is {value!r}, but must be {what}")
    if value < 1:
        raise ValueError(f"{where} is {value}, but must be >= 1")


def _check_float_knob(value: Any, where: str, ok, rule: str) -> None:
    if isinstance(value, Range):
        bounds = ((f"{where}.low", value.low), (f"{where}.high", value.high))
    else:
        bounds = ((where, value),)
    for name, v in bounds:
        if not _real(v):
            raise ValueError(f"{name} is {v!r}, but must be a number")
        if not ok(v):
            raise ValueError(f"{name} is {v}, but must be {rule}")
    if isinstance(value, Range) and value.low > value.high:
        raise ValueError(f"{where}.low is {value.low}, but must be <= {where}.high ({value.high}); swap the bounds")


def _real(value: Any) -> bool:
    """A finite real number that is not a bool (True == 1 in Python, but is no dim)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def pow2_choices(low: int, high: int) -> tuple[int, ...]:
    """The powers of two in [low, high]."""
    return tuple(2**e for e in range(high.bit_length()) if low <= 2**e <= high)


def build_space(features: Sequence[FeatureInfo], spec: SearchSpec = SearchSpec()) -> SearchSpace:
    """Each feature's dim range (or pin) and the knobs, from the data's features and a spec (module docstring)."""
    names = [f.name for f in features]
    unknown = [n for n in spec.features if n not in names]
    if unknown:
        raise ValueError(
            f"search spec names unknown feature '{unknown[0]}'; known features: {', '.join(names) or '(none)'}"
        )
    ranges: dict[str, tuple[int, int]] = {}
    pins: dict[str, int] = {}
    for f in features:
        fs = spec.features.get(f.name, FeatureSpec())
        if fs.pin is not None:
            pins[f.name] = fs.pin
            continue
        high = max(1, min(f.cardinality - 1, spec.max_dim if fs.high is None else fs.high))
        low = min(spec.min_dim if fs.low is None else fs.low, high)
        if spec.grid == "pow2":
            choices = pow2_choices(low, high)
            low, high = (choices[0], choices[-1]) if choices else (low, low)
        if low == high:
            pins[f.name] = low
        else:
            ranges[f.name] = (low, high)
    return SearchSpace(
        tuple(features), ranges, pins, spec.grid, _collapse(spec.lr), _collapse(spec.hidden), _collapse(spec.dropout)
    )


def _collapse(knob: Any) -> Any:
    """A range or choice list with a single value is that fixed value."""
    if isinstance(knob, Range) and knob.low == knob.high:
        return knob.low
    if isinstance(knob, tuple) and len(knob) == 1:
        return knob[0]
    return knob


@dataclass(frozen=True)
class SearchSpace:
    """What a search samples: per-feature dim ranges, pinned dims, and the knobs (fixed value, Range or choices)."""

    features: tuple[FeatureInfo, ...]
    ranges: Mapping[str, tuple[int, int]]  # searched features: inclusive (low, high) dims
    pins: Mapping[str, int]  # features with a fixed dim
    grid: str = "log"  # "log" | "pow2" (the choices are the powers of two in each range)
    lr: float | Range = Range(1e-3, 1e-2)  # float: fixed; Range: log-uniform
    hidden: int | tuple[int, ...] = 64  # int: fixed width; tuple: categorical choices
    dropout: float | Range = 0.0  # float: fixed; Range: uniform

    def searched(self, knob: str) -> bool:
        return isinstance(getattr(self, knob), (Range, tuple))

    def dim_choices(self, name: str) -> tuple[int, ...] | None:
        """The pow2 choices of a searched feature; None on the log grid."""
        return pow2_choices(*self.ranges[name]) if self.grid == "pow2" else None

    def distributions(self) -> dict:
        """Optuna distributions of every searched value: the ``space`` of Ray's OptunaSearch."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out: dict = {}
        for f in self.features:
            if f.name in self.ranges:
                low, high = self.ranges[f.name]
                choices = self.dim_choices(f.name)
                out[DIM_PREFIX + f.name] = (
                    CategoricalDistribution(choices) if choices else IntDistribution(low, high, log=True)
                )
        if isinstance(self.lr, Range):
            out["lr"] = FloatDistribution(self.lr.low, self.lr.high, log=True)
        if isinstance(self.hidden, tuple):
            out["hidden"] = CategoricalDistribution(self.hidden)
        if isinstance(self.dropout, Range):
            out["dropout"] = FloatDistribution(self.dropout.low, self.dropout.high)
        return out

    def decode(self, config: Mapping) -> tuple[ModelConfig, dict]:
        """A trial config -> (ModelConfig with every feature's dim, TrainConfig overrides such as {"lr": ...})."""
        names = {f.name for f in self.features}
        for key in config:
            if key.startswith(DIM_PREFIX) and key[len(DIM_PREFIX):] not in names:
                raise ValueError(f"config key '{key}' names an unknown feature; known: {', '.join(sorted(names))}")
        dims = {}
        for f in self.features:
            key = DIM_PREFIX + f.name
            if key in config:
                dims[f.name] = _as_int(config[key], f"dim for '{f.name}'")
            elif f.name in self.pins:
                dims[f.name] = self.pins[f.name]
            else:
                raise ValueError(f"config has no '{key}', but '{f.name}' is searched; give its dim")
        lr = _as_float(self._knob(config, "lr"), "lr")
        if not lr > 0:
            raise ValueError(f"lr is {lr}, but must be > 0")
        width = _as_int(self._knob(config, "hidden"), "hidden")
        dropout = _as_float(self._knob(config, "dropout"), "dropout")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout is {dropout}, but must be in [0, 1)")
        return ModelConfig(dims, hidden_layers(width), dropout), {"lr": lr}

    def _knob(self, config: Mapping, knob: str) -> Any:
        if knob in config:
            return config[knob]
        if self.searched(knob):
            raise ValueError(f"config has no '{knob}', but the space searches it; give a value")
        return getattr(self, knob)

    def encode(self, dims: Mapping[str, int], **knobs: Any) -> dict:
        """The config of given dims (and knobs): the inverse of ``decode``, used for heuristic baselines.

        Pinned features default to their pin; searched knobs not given take ``BASELINE_KNOBS`` clamped into the
        space; fixed knobs are written only when given.
        """
        bad = [k for k in knobs if k not in KNOBS]
        if bad:
            raise ValueError(f"unknown knob '{bad[0]}'; knobs are: {', '.join(KNOBS)}")
        names = {f.name for f in self.features}
        unknown = [n for n in dims if n not in names]
        if unknown:
            raise ValueError(f"dim given for unknown feature '{unknown[0]}'; known: {', '.join(sorted(names))}")
        config: dict = {}
        for f in self.features:
            d = dims.get(f.name, self.pins.get(f.name))
            if d is None:
                raise ValueError(f"no dim given for feature '{f.name}'; give one for every searched feature")
            config[DIM_PREFIX + f.name] = d
        for knob in KNOBS:
            value = knobs.get(knob)
            if value is None and self.searched(knob):
                value = self._baseline(knob)
            if value is not None:
                config[knob] = value
        self.decode(config)  # refuses bad values now rather than inside a trial
        return config

    def _baseline(self, knob: str) -> float | int:
        value, space = BASELINE_KNOBS[knob], getattr(self, knob)
        if isinstance(space, Range):
            return min(max(value, space.low), space.high)
        return min(space, key=lambda w: (abs(w - value), w))

    def bytes(self, config: Mapping) -> int:
        """fp32 bytes of the model the config describes (embeddings + MLP)."""
        model, _ = self.decode(config)
        return model_bytes(self.features, model.dims, model.hidden)

    def min_bytes(self) -> int:
        """The smallest model in the space (model bytes grow with every dim and with the MLP width)."""
        return self._extreme_bytes(0)

    def max_bytes(self) -> int:
        """The largest model the space can sample."""
        return self._extreme_bytes(-1)

    def _extreme_bytes(self, end: int) -> int:
        dims = {f.name: self.pins[f.name] if f.name in self.pins else self.ranges[f.name][end] for f in self.features}
        widths = sorted(self.hidden) if isinstance(self.hidden, tuple) else [self.hidden]
        return model_bytes(self.features, dims, hidden_layers(widths[end]))

    def contains(self, config: Mapping) -> bool:
        """Whether the config is a point of the sampled space (searched values inside their distributions, fixed
        values, when present, equal to the space's)."""
        dists = self.distributions()
        names = {f.name for f in self.features}
        for key, value in config.items():
            if key.startswith(DIM_PREFIX) and key[len(DIM_PREFIX):] not in names:
                return False
        for key, dist in dists.items():
            if key not in config or not _inside(dist, config[key]):
                return False
        fixed = {DIM_PREFIX + n: d for n, d in self.pins.items()}
        fixed.update({k: getattr(self, k) for k in KNOBS if not self.searched(k)})
        return all(config[k] == v for k, v in fixed.items() if k in config)

    def shrink(self, config: Mapping, budget: int) -> dict:
        """A config of the space within ``budget`` bytes, close to ``config``: every searched dim moves toward its low
        bound by one common log-scale factor, the largest that fits; a searched MLP width narrows only as far as that
        lets the dims stay larger."""
        if self.min_bytes() > budget:
            raise ValueError(f"memory budget {budget:,} bytes is below the smallest model in the space "
                             f"({self.min_bytes():,} bytes); raise the budget")
        dists = self.distributions()
        base = {k: config[k] for k in dists if k in config and _inside(dists[k], config[k])}
        for name, (_, high) in self.ranges.items():
            base.setdefault(DIM_PREFIX + name, high)
        for knob in KNOBS:
            if self.searched(knob):
                base.setdefault(knob, self._baseline(knob))
        if not self.searched("hidden"):
            return self._fit(base, budget)
        widths = sorted((w for w in self.hidden if w <= base["hidden"]), reverse=True)
        best = self._fit({**base, "hidden": widths[-1]}, budget)  # the smallest width fits: min_bytes() <= budget
        for width in widths[:-1]:
            fit = self._fit({**base, "hidden": width}, budget)
            if fit is not None and all(fit[k] == best[k] for k in fit if k != "hidden"):
                return fit
        return best

    def _fit(self, config: Mapping, budget: int) -> dict | None:
        """``config`` with its dims scaled by the largest factor in [0, 1] that fits the budget (None if none)."""
        if self.bytes(self._scaled(config, 0.0)) > budget:
            return None
        lo, hi = 0.0, 1.0
        if self.bytes(self._scaled(config, 1.0)) <= budget:
            return self._scaled(config, 1.0)
        for _ in range(40):  # bytes grow monotonically with the factor: bisect
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.bytes(self._scaled(config, mid)) <= budget else (lo, mid)
        return self._scaled(config, lo)

    def _scaled(self, config: Mapping, s: float) -> dict:
        out = dict(config)
        for name, (low, high) in self.ranges.items():
            d = config[DIM_PREFIX + name]
            target = low * (d / low) ** s
            choices = self.dim_choices(name)
            out[DIM_PREFIX + name] = (
                max(c for c in choices if c <= target + 1e-9) if choices else max(low, math.floor(target + 1e-9))
            )
        return out


def hidden_layers(width: int) -> tuple[int, int]:
    """MLP width w -> hidden layers (w, w // 2), the second at least 1."""
    return (width, max(1, width // 2))


def _inside(dist: Any, value: Any) -> bool:
    from optuna.distributions import CategoricalDistribution

    if not _real(value):
        return False
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(dist.low, int) and value != int(value):
        return False
    return dist.low <= value <= dist.high


def _as_int(value: Any, what: str) -> int:
    if not _real(value) or value != int(value):
        raise ValueError(f"{what} is {value!r}, but must be an integer >= 1")
    if value < 1:
        raise ValueError(f"{what} is {value}, but must be >= 1")
    return int(value)


def _as_float(value: Any, what: str) -> float:
    if not _real(value):
        raise ValueError(f"{what} is {value!r}, but must be a finite number")
    return float(value)

