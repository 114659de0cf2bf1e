"""The recommended config as a file: everything needed to rebuild (and retrain) the model, nothing else.

A recipe is plain YAML, read with ``yaml.safe_load`` only. ``build(recipe)`` rebuilds the model from the recipe alone:
the features' names, kinds and cardinalities are part of it.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .dataset import FeatureInfo
from .memory import embedding_bytes, model_bytes
from .model import ModelConfig, validate_dims
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
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{source} is not an embsize recipe of format {FORMAT}; write it with `embsize search`")
        try:
            features = tuple(FeatureInfo(str(f["name"]), bool(f["multi"]), int(f["cardinality"])) for f in d["features"])
            m = d["model"]
            dims = validate_dims(features, dict(m["dims"]))
            model = ModelConfig(dims, tuple(int(h) for h in m["hidden"]), float(m.get("dropout", 0.0)))
            train = TrainConfig(**d.get("train", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source} is missing or has a malformed field ({e}); regenerate it with `embsize search`") from e
        return cls(features, model, train, d.get("dataset", {}), d.get("expected", {}), d.get("provenance", {}))

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
