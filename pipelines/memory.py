"""Exact parameter and byte accounting of an EmbeddingRecommender, from its config alone."""
from __future__ import annotations

from typing import Mapping, Sequence

from .dataset import FeatureInfo

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def embedding_params(features: Sequence[FeatureInfo], dims: Mapping[str, int]) -> dict[str, int]:
    """Parameters of each feature's table: cardinality (incl. the unknown row) x dim."""
    return {f.name: f.cardinality * int(dims[f.name]) for f in features}


def mlp_params(input_dim: int, hidden: Sequence[int]) -> int:
    """Linear layers input -> hidden[0] -> ... -> 1, each with a bias."""
    total, width = 0, input_dim
    for h in (*hidden, 1):
        total += width * h + h
        width = h
    return total


def model_params(features: Sequence[FeatureInfo], dims: Mapping[str, int], hidden: Sequence[int]) -> int:
    emb = sum(embedding_params(features, dims).values())
    return emb + mlp_params(sum(int(dims[f.name]) for f in features), hidden)


def embedding_bytes(features: Sequence[FeatureInfo], dims: Mapping[str, int], dtype: str = "float32") -> dict[str, int]:
    size = _dtype_size(dtype)
    return {name: n * size for name, n in embedding_params(features, dims).items()}


def model_bytes(
    features: Sequence[FeatureInfo], dims: Mapping[str, int], hidden: Sequence[int], dtype: str = "float32"
) -> int:
    """Bytes of all parameters (embeddings + MLP) stored at ``dtype``."""
    return model_params(features, dims, hidden) * _dtype_size(dtype)


def _dtype_size(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype is {dtype!r}, but must be one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]
