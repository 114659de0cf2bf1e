"""From a raw table to the encoded, split dataset that the trainer and the search consume."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from .encode import Encoded, Encoder
from .schema import RawDataset
from .split import split_rows


@dataclass(frozen=True)
class FeatureInfo:
    """What the model and the search need to know about one encoded feature."""

    name: str
    multi: bool
    cardinality: int  # vocabulary size including the unknown bucket (index 0)


@dataclass
class EncodedDataset:
    """Compact integer arrays per split, the fitted encoder, and a content fingerprint."""

    name: str
    features: tuple[FeatureInfo, ...]
    encoder: Encoder
    train: Encoded
    val: Encoded
    test: Encoded
    fingerprint: str
    meta: dict

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def for_training(self) -> EncodedDataset:
        """What a training run reads: the features, the train and validation splits. No vocabularies (a 1M-category
        vocabulary is ~100 MB of Python strings that every Ray worker would unpickle into its own memory) and no
        test split (never shipped to the trials)."""
        return dataclasses.replace(self, encoder=None, test=self.test.take(np.zeros(0, dtype=np.int64)))

    def counts(self, name: str) -> np.ndarray:
        """Training frequency per index of feature ``name``."""
        return self.encoder.vocabs[name].counts

    def summary(self) -> str:
        parts = ", ".join(f"{f.name}={f.cardinality}{'*' if f.multi else ''}" for f in self.features)
        return (
            f"{self.name}: {len(self.train)}/{len(self.val)}/{len(self.test)} rows (train/val/test), "
            f"positive rate {self.train.label.mean():.3f}; cardinalities {parts} (* = multi-valued)"
        )


def prepare(
    raw: RawDataset,
    split: str = "random",
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_freq: int = 1,
) -> EncodedDataset:
    """Split rows, fit vocabularies on the training rows only, and encode every split."""
    if len(raw) == 0:
        raise ValueError(f"dataset '{raw.name}' has no rows after loading and filtering; check the filters and the file")
    train_rows, val_rows, test_rows = split_rows(len(raw), split, fractions, seed, raw.time)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(
            f"dataset '{raw.name}' has {len(raw)} rows, too few for a train and a validation split; give more data"
        )
    encoder = Encoder.fit(raw.frame.iloc[train_rows], raw.features, min_freq)
    columns = encoder.transform(raw.frame)
    full = Encoded(columns, raw.label)
    train, val, test = full.take(train_rows), full.take(val_rows), full.take(test_rows)
    if train.label.min() == train.label.max():
        raise ValueError(f"the training split of '{raw.name}' has a constant label; give data with both classes")
    if val.label.min() == val.label.max():  # validation AUC, what every trial is judged by, would be undefined
        raise ValueError(f"the validation split of '{raw.name}' ({len(val_rows)} of {len(raw)} rows) holds one label "
                         "class only, so its AUC is undefined; give more rows (e.g. --rows 1000)")
    features = tuple(FeatureInfo(f.name, f.multi, encoder.vocabs[f.name].size) for f in raw.features)
    return EncodedDataset(raw.name, features, encoder, train, val, test, fingerprint(encoder, (train, val, test)), raw.meta)


def fingerprint(encoder: Encoder, splits: tuple[Encoded, ...]) -> str:
    """sha256 over vocabularies and every split's arrays: equal fingerprints mean identical training input."""
    h = hashlib.sha256()
    for name, v in encoder.vocabs.items():
        h.update(name.encode())
        h.update("\x00".join(v.categories).encode())
    for s in splits:
        s.digest(h)
    return h.hexdigest()[:16]

