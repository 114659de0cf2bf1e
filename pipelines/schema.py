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

    ``threshold`` set: ``value >= threshold`` is positive (MovieLens: rating >= 4 is "liked"). ``positive`` set: rows
    whose value equals it (as text, stripped) are positive, the rest negative, however many distinct values there are.
    Neither: the column holds 0/1 or two numbers/booleans (the larger one positive), or a text pair whose meaning is
    known (true/false, yes/no, y/n, t/f, positive/negative, pos/neg; any case); any other text is refused, not guessed.
    """

    column: str = "label"
    threshold: float | None = None
    positive: str | None = None


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
    check_label_options(rule.threshold, rule.positive)
    if rule.positive is not None:
        text = values.astype(str).str.strip()
        want = str(rule.positive).strip()
        if not (text == want).any():
            present = sorted(pd.unique(text))
            shown = ", ".join(repr(v) for v in present[:10])
            if len(present) > 10:
                shown += f", ... ({len(present)} in all)"
            raise ValueError(f"--positive-label {rule.positive!r} is not a value of label column '{rule.column}'; "
                             f"its values are {shown}")
        y = (text == want).to_numpy(dtype=np.float32)
    elif rule.threshold is not None:
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
        numeric = all(_as_float(v) is not None for v in uniq)
        known = None if numeric else _known_pair(uniq)
        if known is not None:
            y = values.map(lambda v: str(v).strip().lower() in known).to_numpy(dtype=np.float32)
        elif len(uniq) > 2 and numeric:
            raise ValueError(
                f"label column '{rule.column}' has {len(uniq)} distinct values, not 2; "
                "give a threshold (e.g. --positive-threshold 4) to binarize it"
            )
        elif len(uniq) > 2:
            raise ValueError(
                f"label column '{rule.column}' has {len(uniq)} distinct text values, not 2; say which one is positive "
                f"with --positive-label VALUE (rows equal to it are positive, the rest negative)"
            )
        elif numeric and set(map(_as_float, uniq)) <= {0.0, 1.0}:
            y = values.map(_as_float).to_numpy(dtype=np.float32)
        elif numeric or len(uniq) < 2:
            positive = max(uniq, key=_sort_key)  # two numbers/booleans: the larger is positive; one value: constant
            y = (values == positive).to_numpy(dtype=np.float32)
        else:
            a, b = sorted(map(str, uniq))
            raise ValueError(
                f"label column '{rule.column}' has the text values {a!r} and {b!r}; say which one is positive with "
                f"--positive-label {a}"
            )
    if len(y) and (y.min() == y.max()):
        raise ValueError(
            f"label column '{rule.column}' is constant ({'all positive' if y[0] else 'all negative'}) "
            f"after applying the rule; choose another column or threshold"
        )
    return y


def check_label_options(threshold: float | None, positive: str | None) -> None:
    """A label is binarized by a threshold (numbers) or by its positive value (text), not by both."""
    if threshold is not None and positive is not None:
        raise ValueError("--positive-threshold and --positive-label both given; use the threshold for a numeric "
                         "label or the label value for a text one, not both")


# text label pairs whose positive value is known (compared stripped and lower-cased): positive first
_KNOWN_PAIRS = (("true", "false"), ("yes", "no"), ("y", "n"), ("t", "f"), ("positive", "negative"), ("pos", "neg"),
                ("1", "0"))


def _known_pair(uniq) -> set[str] | None:
    """The positive spellings when every value belongs to one known pair, else None."""
    seen = {str(v).strip().lower() for v in uniq}
    for pos, neg in _KNOWN_PAIRS:
        if seen <= {pos, neg}:
            return {pos}
    return None


def _as_float(v: object) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _sort_key(v: object) -> tuple[int, object]:
    f = _as_float(v)
    return (0, f) if f is not None else (1, str(v))
