"""embsize pipelines: data and model (load -> encode -> split -> model -> train/evaluate -> export).

Never imports ``search``.
"""
from __future__ import annotations

from .dataset import EncodedDataset, FeatureInfo, prepare
from .encode import UNKNOWN, Encoder, Vocabulary
from .memory import embedding_bytes, model_bytes, model_params
from .model import EmbeddingRecommender, ModelConfig, validate_dims
from .schema import Feature, LabelRule, RawDataset
from .synthetic import PlantedFeature, SyntheticSpec, generate
from .train import EpochResult, TrainConfig, TrainResult, evaluate, train

__all__ = [
    "UNKNOWN",
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
