"""embsize pipelines: data and model (load -> encode -> split -> model -> train/evaluate -> export).

Never imports ``search``.
"""
from __future__ import annotations

from .dataset import EncodedDataset, FeatureInfo, prepare
from .download import DownloadError, fetch_movielens
from .encode import UNKNOWN, Encoder, Vocabulary
from .load import describe_sources, load
from .memory import embedding_bytes, model_bytes, model_params
from .model import EmbeddingRecommender, ModelConfig, validate_dims
from .movielens import load_movielens
from .schema import Feature, LabelRule, RawDataset
from .recipe import Recipe
from .synthetic import PlantedFeature, SyntheticSpec, generate
from .tabular import load_table
from .train import EpochResult, TrainConfig, TrainResult, evaluate, train

__all__ = [
    "UNKNOWN",
    "DownloadError",
    "Recipe",
    "describe_sources",
    "fetch_movielens",
    "load",
    "load_movielens",
    "load_table",
    "EmbeddingRecommender",
    "EncodedDataset",
    "Encoder",
    "EpochResult",
    "Feature",
    "FeatureInfo",
    "LabelRule",
    "ModelConfig",
    "PlantedFeature",
    "RawDataset",
    "SyntheticSpec",
    "TrainConfig",
    "TrainResult",
    "Vocabulary",
    "embedding_bytes",
    "evaluate",
    "generate",
    "model_bytes",
    "model_params",
    "prepare",
    "train",
    "validate_dims",
]
