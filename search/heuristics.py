"""Rule-of-thumb embedding dims, run as labelled baselines next to the searched configs.

Each rule maps a feature's number of real categories ``n`` (cardinality - 1; index 0 is the unknown bucket) to a dim,
at least 1:

- ``sqrt``: round(√n).
- ``half50``: min(50, ceil(n / 2)), the seed project's rule (fast.ai's old rule of thumb).
- ``fastai``: min(600, round(1.6 · n^0.56)), fastai's ``emb_sz_rule``.
- ``google``: round(n^0.25), the fourth-root rule of Google's "Introducing TensorFlow Feature Columns" (2017).
- ``mde``: the power-law rule of Mixed Dimension Embeddings (Ginart et al., 2021), applied per feature (a "block"):
  ``d_i = λ · p_i^α`` with α = 0.3 and ``p_i`` the mean training frequency of feature i's real categories, so a
  feature whose categories are each seen often gets a larger dim than one spread over many rare categories. ``λ`` gives
  the same total embedding parameters (Σ cardinality · dim) as the fastai rule, the memory-matched comparison of the
  paper (the ``B`` argument of DLRM's ``md_solver``); the rule then only decides how that memory is shared. Each dim is
  rounded and capped at ``max(1, n)``: with n + 1 rows, a dim above n adds nothing the first linear layer could not.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from pipelines.dataset import FeatureInfo

MDE_ALPHA = 0.3  # popularity exponent (dim skew); 0 gives every feature the same dim

HEURISTICS: dict[str, str] = {
    "sqrt": "√n",
    "half50": "min(50, n/2)",
    "fastai": "fastai 1.6·n^0.56",
    "google": "n^0.25",
    "mde": "MDE power-law",
}

# Rules of n alone; "mde" also needs the training counts.
RULES: dict[str, Callable[[int], int]] = {
    "sqrt": lambda n: max(1, round(math.sqrt(n))),
    "half50": lambda n: max(1, min(50, math.ceil(n / 2))),
    "fastai": lambda n: max(1, min(600, round(1.6 * n**0.56))),
    "google": lambda n: max(1, round(n**0.25)),
}


def heuristic_dims(features: Sequence[FeatureInfo], counts: Mapping[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Every rule's dims: {rule: {feature: dim}}, rules in ``HEURISTICS`` order.

    ``counts[name]`` is the training frequency per index of the feature (``EncodedDataset.counts(name)``), index 0
    the unknown bucket; only "mde" reads it.
    """
    out = {rule: {f.name: fn(real_categories(f)) for f in features} for rule, fn in RULES.items()}
    out["mde"] = mde_dims(features, counts, out["fastai"])
    return {rule: out[rule] for rule in HEURISTICS}


def real_categories(f: FeatureInfo) -> int:
    return max(0, f.cardinality - 1)


def mde_dims(
    features: Sequence[FeatureInfo],
    counts: Mapping[str, np.ndarray],
    reference: Mapping[str, int],
    alpha: float = MDE_ALPHA,
) -> dict[str, int]:
    """MDE power-law dims at the embedding parameters of ``reference`` dims (module docstring)."""
    weight = {f.name: mean_frequency(f, counts) ** alpha for f in features}
    budget = sum(f.cardinality * reference[f.name] for f in features)
    mass = sum(f.cardinality * weight[f.name] for f in features)
    scale = budget / mass if mass > 0 else 0.0
    return {
        f.name: max(1, min(max(1, real_categories(f)), round(scale * weight[f.name]))) for f in features
    }


def mean_frequency(f: FeatureInfo, counts: Mapping[str, np.ndarray]) -> float:
    """Mean training count of the feature's real categories (0 when it has none)."""
    if f.name not in counts:
        raise ValueError(f"no training counts given for feature '{f.name}'; give counts for every feature")
    c = np.asarray(counts[f.name])
    if c.ndim != 1 or len(c) != f.cardinality:
        raise ValueError(
            f"counts for '{f.name}' have shape {c.shape}, but must have one entry per index ({f.cardinality})"
        )
    return float(c[1:].mean()) if len(c) > 1 else 0.0
