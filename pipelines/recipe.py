"""The recommended config as a file: everything needed to rebuild (and retrain) the model, nothing else.

A recipe is plain YAML, read with ``yaml.safe_load`` only. ``build(recipe)`` rebuilds the model from the recipe alone:
the features' names, kinds and cardinalities are part of it.
"""
from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .dataset import FeatureInfo
from .memory import embedding_bytes, model_bytes
from .model import ModelConfig
from .train import TrainConfig

FORMAT = 1  # bump when a field's meaning changes


@dataclass(frozen=True)
class Recipe:
    features: tuple[FeatureInfo, ...]
    model: ModelConfig
    train: TrainConfig
    dataset: dict = field(default_factory=dict)  # name, source, fingerprint, loader options
    expected: dict = field(default_factory=dict)  # val_auc, model_bytes, ...
    provenance: dict = field(default_factory=dict)  # search name, trial, MLflow run ids, rule

    def model_bytes(self, dtype: str = "float32") -> int:
        return model_bytes(self.features, self.model.dims, self.model.hidden, dtype)

    def embedding_bytes(self, dtype: str = "float32") -> int:
        return sum(embedding_bytes(self.features, self.model.dims, dtype).values())

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "features": [{"name": f.name, "multi": f.multi, "cardinality": f.cardinality} for f in self.features],
            "model": {"dims": dict(self.model.dims), "hidden": list(self.model.hidden), "dropout": self.model.dropout},
            "train": {k: v for k, v in asdict(self.train).items() if k != "threads"},
            "dataset": self.dataset,
            "expected": self.expected,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> Recipe:
        """Check every section and field (one ValueError naming the first bad one), then build the recipe."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{source} is not an embsize recipe of format {FORMAT}; write it with `embsize search`")
        for name in SECTIONS:
            if name not in d:
                raise ValueError(f"{name} is missing in {source}, but must be {SECTIONS[name]}; regenerate the file "
                                 "with `embsize search`")
        if not isinstance(d["features"], list) or not d["features"]:
            raise ValueError(_bad("features", d["features"], source, SECTIONS["features"]))
        feats = [_fields(f, f"features[{i}]", FEATURE, source, closed=True) for i, f in enumerate(d["features"])]
        features = tuple(FeatureInfo(f["name"], f["multi"], f["cardinality"]) for f in feats)
        names = [f.name for f in features]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(_bad(f"features[{i}].name", name, source, "a name no other feature has"))
        m = _fields(d["model"], "model", MODEL, source, closed=True)
        dims = _fields(m["dims"], "model.dims", {n: Rule("an integer >= 1", _int_at_least(1)) for n in names}, source,
                       closed=True)
        model = ModelConfig({n: dims[n] for n in names}, tuple(m["hidden"]), float(m.get("dropout", 0.0)))
        train = TrainConfig(**_fields(d["train"], "train", TRAIN, source, closed=True))
        dataset = _fields(d["dataset"], "dataset", DATASET, source, required=False)
        expected = _fields(d["expected"], "expected", EXPECTED, source, required=False)
        provenance = _fields(d["provenance"], "provenance", PROVENANCE, source, required=False)
        if provenance.get("mlflow") is not None:
            provenance["mlflow"] = _fields(provenance["mlflow"], "provenance.mlflow", MLFLOW, source, required=False)
        return cls(features, model, train, dataset, expected, provenance)

    def save(self, path: str | Path) -> Path:
        return write_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        p = Path(path).resolve()
        if not p.is_file():
            what = "is a folder" if p.is_dir() else "does not exist"
            raise ValueError(f"config file '{p}' {what}; give the recommended.yaml written by `embsize search`")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file '{p}' is not valid YAML ({str(e).splitlines()[0]}); fix or regenerate it") from e
        return cls.from_dict(d, f"config file '{p}'")


# What a recipe's fields must be, section by section. Every section and the closed sections' fields (features,
# model, train) are written by every recipe of format 1, so they are required (model.dropout excepted: the first
# reader defaulted it to 0). The open sections (dataset, expected, provenance) gained keys over time: a key is checked
# when present, and keys not listed here are kept as they are.


@dataclass(frozen=True)
class Rule:
    must: str  # what the value must be, said after "but must be"
    ok: Callable[[object], bool]
    read: Callable[[object], object] = lambda v: v  # applied before ``ok``; its result is what the recipe keeps
    optional: bool = False  # may be absent from a section whose fields are required


def _int_at_least(low: int, below: int | None = None) -> Callable[[object], bool]:
    return lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= low
                      and (below is None or v < below))


def _number(low: float = -math.inf, above: bool = False, below: float = math.inf) -> Callable[[object], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > low if above else v >= low) and v < below)


def _param(v: object) -> object:
    """MLflow params are text, and confirm/refine rebuild a recipe's dataset from them when the search's recipe
    is not in MLflow: '3' reads as 3 there."""
    if isinstance(v, str):
        try:
            return int(v) if re.fullmatch(r"-?[0-9]+", v.strip()) else float(v)
        except ValueError:
            pass
    return v


def _exponent(v: object) -> object:
    """1e-3 as a float: YAML 1.2 reads it as a number, PyYAML (YAML 1.1, which wants 1.0e-3) as the text '1e-3'."""
    if isinstance(v, str) and re.fullmatch(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+", v.strip()):
        return float(v)
    return v


TEXT = Rule("a text (quote it)", lambda v: isinstance(v, str))
TEXT_OR_NULL = Rule("a text or null", lambda v: v is None or isinstance(v, str))
SECTIONS = {
    "features": "a non-empty list of features (name, multi, cardinality)",
    "model": "a mapping with dims, hidden and dropout",
    "train": "a mapping with lr, batch_size, max_epochs, patience, weight_decay, sparse and seed",
    "dataset": "a mapping of the data options the search used (it may be empty: {})",
    "expected": "a mapping of the search's metrics (it may be empty: {})",
    "provenance": "a mapping of where the recipe came from (it may be empty: {})",
}
FEATURE = {
    "name": Rule("a non-empty text", lambda v: isinstance(v, str) and v != ""),
    "multi": Rule("true or false (unquoted)", lambda v: isinstance(v, bool)),
    "cardinality": Rule("an integer >= 1", _int_at_least(1)),
}
MODEL = {
    "dims": Rule("a mapping of feature name to dim", lambda v: isinstance(v, dict)),
    "hidden": Rule("a list of integers >= 1, e.g. [64, 32]",
                   lambda v: isinstance(v, list) and all(_int_at_least(1)(h) for h in v)),
    "dropout": Rule("a number in [0, 1)", _number(0.0, below=1.0), _exponent, optional=True),
}
TRAIN = {
    "lr": Rule("a number > 0", _number(0.0, above=True), _exponent),
    "batch_size": Rule("an integer >= 1", _int_at_least(1)),
    "max_epochs": Rule("an integer >= 1", _int_at_least(1)),
    "patience": Rule("an integer >= 0", _int_at_least(0)),
    "weight_decay": Rule("a number >= 0", _number(0.0), _exponent),
    "sparse": Rule("true or false (unquoted)", lambda v: isinstance(v, bool)),
    "seed": Rule("an integer >= 0 and < 2**63", _int_at_least(0, 2**63)),
}
DATASET = {
    "name": TEXT, "source": TEXT, "fingerprint": TEXT, "search_fingerprint": TEXT_OR_NULL,
    "split": Rule("'random' or 'temporal'", lambda v: v in ("random", "temporal")),
    "seed": Rule("an integer >= 0", _int_at_least(0), _param),
    "rows": Rule("an integer >= 1", _int_at_least(1), _param),
    "min_freq": Rule("an integer >= 1", _int_at_least(1), _param),
    "positive_threshold": Rule("a number", _number(), _param),
    **{k: TEXT for k in ("label", "features", "multi", "sep", "positive_label", "time_column", "delimiter")},
}
_METRIC = Rule("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))  # NaN: not measured
_EPOCHS = Rule("an integer >= 0 or null", lambda v: v is None or _int_at_least(0)(v))
EXPECTED = {
    **{k: _METRIC for k in ("val_auc", "val_auc_sd", "single_seed_val_auc", "floor_val_auc", "test_auc",
                            "test_logloss", "model_bytes", "embedding_bytes")},
    "epochs": _EPOCHS, "best_epoch": _EPOCHS, "final_epochs": _EPOCHS,
    "seeds": Rule("a list of integers >= 0", lambda v: isinstance(v, list) and all(_int_at_least(0)(s) for s in v)),
}
PROVENANCE = {
    **{k: TEXT_OR_NULL for k in ("search", "trial_id", "rule", "confirmed", "search_recommendation", "refined_from",
                                 "final_fit")},
    "mlflow": Rule("a mapping (tracking_uri, experiment_id, parent_run_id, trial_run_id) or null",
                   lambda v: v is None or isinstance(v, dict)),
}
MLFLOW = {k: TEXT_OR_NULL for k in ("tracking_uri", "experiment_id", "parent_run_id", "trial_run_id")}


def _fields(value: object, path: str, rules: dict[str, Rule], source: str, required: bool = True,
            closed: bool = False) -> dict:
    """``value`` checked as the mapping ``path`` with ``rules``: one ValueError naming the first bad field."""
    if not isinstance(value, dict):
        raise ValueError(_bad(path, value, source, SECTIONS.get(path, f"a mapping with {', '.join(map(str, rules))}")))
    out = dict(value)
    for key, rule in rules.items():
        if key not in value:
            if required and not rule.optional:
                raise ValueError(f"{path}.{key} is missing in {source}, but must be {rule.must}; add it or "
                                 "regenerate the file with `embsize search`")
            continue
        out[key] = rule.read(value[key])
        if not rule.ok(out[key]):
            raise ValueError(_bad(f"{path}.{key}", value[key], source, rule.must))
    unknown = [k for k in value if k not in rules]
    if closed and unknown:
        raise ValueError(f"{path}.{unknown[0]} in {source} is unknown: {path} takes only {', '.join(map(str, rules))}")
    return out


def _bad(path: str, value: object, source: str, must: str) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{path} is {shown} in {source}, but must be {must}"


def build(recipe: Recipe):
    """The untrained model the recipe describes (exactly its dims and bytes)."""
    from .model import EmbeddingRecommender

    return EmbeddingRecommender(recipe.features, recipe.model.dims, recipe.model.hidden, recipe.model.dropout)


def write_atomic(path: Path, text: str | bytes) -> Path:
    """Write via a temporary file in the same folder and a rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with mode 0o666, not tempfile.mkstemp: mkstemp makes the file 0600, which the rename would keep, and
    # a search's outputs and exports are read by other users (a serving host, teammates); here the umask applies.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
