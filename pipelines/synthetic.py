"""Synthetic data with planted per-feature latent dimensions: the embedded default dataset (no download).

Every feature ``f`` has a true latent dim ``k_f``. Category ``c`` of ``f`` gets ``z_c ~ N(0, I_{k_f})``, placed in a
shared interaction space by a fixed random isometry ``A_f`` (K x k_f). The logit is the sum of pairwise dot products
``<A_f z_f, A_g z_g>`` over feature pairs (a factorization machine), scaled, plus Gaussian noise; the label is a
Bernoulli draw. A feature with ``k_f = 0`` carries no signal (a planted irrelevant feature). Categories are drawn with
Zipf-like frequencies, so rare categories exist as in real logs. Multi-valued features average the vectors of
1..max_bag distinct draws, as EmbeddingBag(mean) does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .schema import Feature, RawDataset


@dataclass(frozen=True)
class PlantedFeature:
    name: str
    cardinality: int  # number of distinct categories
    dim: int  # planted latent dim (0 = irrelevant)
    multi: bool = False  # multi-valued: 1..max_bag categories per row
    max_bag: int = 3
    zipf: float = 1.05  # frequency exponent: p(rank r) ~ r^-zipf


# Mirrors the seed's library (users, books, genres), plus a multi-valued tag field and one irrelevant feature.
DEFAULT_FEATURES = (
    PlantedFeature("user_id", 2000, 12),
    PlantedFeature("book_id", 3000, 8),
    PlantedFeature("genre", 24, 3),
    PlantedFeature("tags", 300, 4, multi=True),
    PlantedFeature("shelf", 500, 0),
)


@dataclass(frozen=True)
class SyntheticSpec:
    features: tuple[PlantedFeature, ...] = DEFAULT_FEATURES
    rows: int = 100_000  # interactions
    noise: float = 0.5  # std of Gaussian logit noise, relative to the unit-variance signal
    signal: float = 2.5  # scale of the normalized signal logit; larger -> higher achievable AUC
    seed: int = 0
    chunk: int = 1_000_000  # rows generated at a time, bounding memory at millions of rows

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"synthetic rows is {self.rows}, but must be >= 1")
        for f in self.features:
            if f.cardinality < 1 or f.dim < 0:
                raise ValueError(f"synthetic feature '{f.name}' needs cardinality >= 1 and dim >= 0")


def generate(spec: SyntheticSpec = SyntheticSpec()) -> RawDataset:
    rng = np.random.default_rng(spec.seed)
    space = max(1, sum(f.dim for f in spec.features))
    latents = []
    for f in spec.features:
        if f.dim == 0:
            latents.append(np.zeros((f.cardinality, space), dtype=np.float32))
            continue
        iso = np.linalg.qr(rng.standard_normal((space, f.dim)))[0]  # K x k_f with orthonormal columns
        z = rng.standard_normal((f.cardinality, f.dim)).astype(np.float32)
        latents.append((z @ iso.T.astype(np.float32)) / np.sqrt(f.dim))
    probs = [_zipf(f.cardinality, f.zipf) for f in spec.features]
    columns: dict[str, list] = {f.name: [] for f in spec.features}
    logits = []
    for start in range(0, spec.rows, spec.chunk):
        n = min(spec.chunk, spec.rows - start)
        vecs = []
        for f, lat, p in zip(spec.features, latents, probs):
            if f.multi:
                codes, vec = _bags(rng, n, p, f.max_bag, lat)
                columns[f.name].append(codes)
            else:
                idx = rng.choice(f.cardinality, size=n, p=p)
                columns[f.name].append(idx)
                vec = lat[idx]
            vecs.append(vec)
        total = np.sum(vecs, axis=0)
        # sum_{f<g} <v_f, v_g> = (|sum v|^2 - sum |v|^2) / 2, without a Python loop over pairs
        pair = 0.5 * (np.einsum("ij,ij->i", total, total) - sum(np.einsum("ij,ij->i", v, v) for v in vecs))
        logits.append(pair)
    logit = np.concatenate(logits)
    logit = (logit - logit.mean()) / (logit.std() + 1e-12)
    logit = spec.signal * logit + spec.noise * spec.signal * rng.standard_normal(spec.rows)
    label = (rng.random(spec.rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    frame = pd.DataFrame(
        {
            f.name: (np.concatenate(columns[f.name]) if not f.multi else np.concatenate(columns[f.name]))
            for f in spec.features
        }
    )
    for f in spec.features:
        if not f.multi:
            frame[f.name] = _names(f.name, frame[f.name].to_numpy())
    features = tuple(Feature(f.name, multi=f.multi) for f in spec.features)
    meta = {
        "source": "synthetic",
        "planted_dims": {f.name: f.dim for f in spec.features},
        "seed": spec.seed,
        "rows": spec.rows,
    }
    return RawDataset("synthetic", frame, features, label, time=np.arange(spec.rows, dtype=np.int64), meta=meta)


def _zipf(n: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return p / p.sum()


def _names(prefix: str, idx: np.ndarray) -> np.ndarray:
    """Category labels like 'user_id_17', built once per category, then gathered."""
    labels = np.array([f"{prefix}_{i}" for i in range(int(idx.max()) + 1)], dtype=object)
    return labels[idx]


def _bags(rng: np.random.Generator, n: int, p: np.ndarray, max_bag: int, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``n`` cells of 1..max_bag categories ("a|b"), and the mean latent vector of each cell."""
    sizes = rng.integers(1, max_bag + 1, size=n)
    draws = rng.choice(len(p), size=(n, max_bag), p=p)
    mask = np.arange(max_bag)[None, :] < sizes[:, None]
    vec = (lat[draws] * mask[..., None]).sum(1) / sizes[:, None]
    labels = np.array([f"t{i}" for i in range(len(p))], dtype=object)
    parts = labels[draws]
    cells = parts[:, 0].copy()
    for j in range(1, max_bag):  # loop over bag positions (<= max_bag), vectorised over rows
        cells = np.where(mask[:, j], cells + "|" + parts[:, j], cells)
    return cells, vec.astype(np.float32)
