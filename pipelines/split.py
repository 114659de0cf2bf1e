"""Leak-free train/validation/test splits of row indices."""
from __future__ import annotations

import numpy as np


def split_rows(
    n: int,
    method: str = "random",
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    time: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint index arrays (train, val, test) covering all ``n`` rows.

    ``random`` shuffles with ``seed``; ``temporal`` orders by ``time`` so every validation row is no earlier
    than every training row, and every test row no earlier than every validation row.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions are {fractions}, but must be three non-negative numbers summing to 1")
    if method == "random":
        order = np.random.default_rng(seed).permutation(n)
    elif method == "temporal":
        if time is None:
            raise ValueError("split 'temporal' needs a timestamp column, and this dataset has none; for a CSV/Parquet "
                             "file name its time column with --time-column, or use --split random")
        order = np.argsort(time, kind="stable")
    else:
        raise ValueError(f"split method is {method!r}, but must be 'random' or 'temporal'")
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)
