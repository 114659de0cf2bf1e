"""embsize pipelines: data and model (load -> encode -> split -> model -> train/evaluate -> export).

Never imports ``search``.
"""
from __future__ import annotations

from .dataset import EncodedDataset, FeatureInfo, prepare
from .download import DownloadError, fetch_movielens
from .encode import UNKNOWN, Encoder, Vocabulary
from .export import load_model, save_model, score
from .load import describe_sources, load
from .memory import embedding_bytes, model_bytes, model_params
from .model import EmbeddingRecommender, ModelConfig, validate_dims
from .movielens import load_movielens
from .recipe import Recipe
from .schema import Feature, LabelRule, RawDataset
from .synthetic import PlantedFeature, SyntheticSpec, generate
from .tabular import load_table
from .train import EpochResult, TrainConfig, TrainResult, evaluate, train

__all__ = [
    "UNKNOWN",
    "DownloadError",
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
    "Recipe",
    "SyntheticSpec",
    "TrainConfig",
    "TrainResult",
    "Vocabulary",
    "describe_sources",
    "embedding_bytes",
    "evaluate",
    "fetch_movielens",
    "generate",
    "load",
    "load_model",
    "load_movielens",
    "load_table",
    "model_bytes",
    "model_params",
    "prepare",
    "save_model",
    "score",
    "train",
    "validate_dims",
]
