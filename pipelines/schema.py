"""What a dataset is: categorical features (single- or multi-valued) plus a binary label."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Feature:
    """One categorical input column."""

    name: str
    multi: bool = False  # multi-valued ("Action|Comedy") -> EmbeddingBag(mean)
    sep: str = "|"  # separator of a multi-valued cell
    buckets: tuple[float, ...] | None = None  # numeric column bucketed at these edges before encoding


@dataclass(frozen=True)
class LabelRule:
    """How the binary label is derived from a column.

    ``threshold=None`` means the column already holds 0/1 (or two distinct values, the larger one positive);
    otherwise ``value >= threshold`` is positive (MovieLens: rating >= 4 is "liked").
    """

    column: str = "label"
    threshold: float | None = None


@dataclass
class RawDataset:
    """A loaded table, before vocabularies: feature columns as raw values, a 0/1 label, an optional timestamp."""

    name: str
    frame: pd.DataFrame  # one column per feature, raw values
    features: tuple[Feature, ...]
    label: np.ndarray  # float32 0/1, one per row
    time: np.ndarray | None = None  # for temporal splits
    meta: dict = field(default_factory=dict)  # loader facts (source path, planted dims, ...)

    def __post_init__(self) -> None:
        assert len(self.frame) == len(self.label), "label length must match the frame"
        if self.time is not None:
            assert len(self.time) == len(self.label), "time length must match the frame"

    def __len__(self) -> int:
        return len(self.label)

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)


def binarize_label(values: pd.Series, rule: LabelRule) -> np.ndarray:
    """Turn a label column into float32 0/1 following ``rule``; refuse what cannot be a binary label."""
    if values.isna().any():
        n = int(values.isna().sum())
        raise ValueError(f"label column '{rule.column}' has {n} missing values; drop those rows or fill them")
    if rule.threshold is not None:
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.isna().any():
            bad = values[numeric.isna()].iloc[0]
            raise ValueError(
                f"label column '{rule.column}' holds non-numeric value {bad!r}, so --positive-threshold cannot apply; "
                "give a numeric column"
            )
        y = (numeric.to_numpy() >= rule.threshold).astype(np.float32)
    else:
        uniq = pd.unique(values)
        if len(uniq) > 2:
            raise ValueError(
                f"label column '{rule.column}' has {len(uniq)} distinct values, not 2; "
                "give a threshold (e.g. --positive-threshold 4) to binarize it"
            )
        if set(map(_as_float, uniq)) <= {0.0, 1.0}:
            y = values.map(_as_float).to_numpy(dtype=np.float32)
        else:
            positive = max(uniq, key=_sort_key)
            y = (values == positive).to_numpy(dtype=np.float32)
    if len(y) and (y.min() == y.max()):
        raise ValueError(
            f"label column '{rule.column}' is constant ({'all positive' if y[0] else 'all negative'}) "
            f"after applying the rule; choose another column or threshold"
        )
    return y


def _as_float(v: object) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _sort_key(v: object) -> tuple[int, object]:
    f = _as_float(v)
    return (0, f) if f is not None else (1, str(v))
