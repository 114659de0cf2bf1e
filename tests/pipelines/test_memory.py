from __future__ import annotations

import pytest

from pipelines.dataset import FeatureInfo
from pipelines.memory import (
    available_bytes,
    check_fits,
    embedding_bytes,
    embedding_params,
    mlp_params,
    model_bytes,
    model_params,
)
from pipelines.model import EmbeddingRecommender

FEATURES = (
    FeatureInfo("user", False, 101),
    FeatureInfo("item", False, 57),
    FeatureInfo("genres", True, 19),
    FeatureInfo("age", False, 8),
    FeatureInfo("tags", True, 33),
)


@pytest.mark.parametrize(
    "dims, hidden",
    [
        ({"user": 16, "item": 16, "genres": 16, "age": 16, "tags": 16}, (64, 32)),  # one fused table
        ({"user": 32, "item": 8, "genres": 4, "age": 2, "tags": 1}, (64, 32)),  # no two alike
        ({"user": 3, "item": 3, "genres": 5, "age": 7, "tags": 5}, ()),  # no hidden layer
        ({"user": 1, "item": 1, "genres": 1, "age": 1, "tags": 1}, (7,)),
    ],
)
def test_model_params_equals_the_built_models_parameter_count(dims, hidden):
    model = EmbeddingRecommender(FEATURES, dims, hidden)
    assert model_params(FEATURES, dims, hidden) == sum(p.numel() for p in model.parameters())
    for f in FEATURES:  # per feature too, through the fused tables' views
        assert embedding_params(FEATURES, dims)[f.name] == model.table(f.name).numel()


def test_mlp_params_counts_weights_and_biases():
    assert mlp_params(10, (4,)) == 10 * 4 + 4 + 4 * 1 + 1
    assert mlp_params(10, ()) == 11


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("float16", 2), ("bfloat16", 2), ("int8", 1)])
def test_embedding_bytes_scale_with_the_dtype(dtype, size):
    dims = {"user": 4, "item": 2, "genres": 3, "age": 1, "tags": 2}
    got = embedding_bytes(FEATURES, dims, dtype)
    assert got == {"user": 101 * 4 * size, "item": 57 * 2 * size, "genres": 19 * 3 * size, "age": 8 * size,
                   "tags": 33 * 2 * size}
    assert model_bytes(FEATURES, dims, (8,), dtype) == model_params(FEATURES, dims, (8,)) * size


def test_unknown_dtype_is_refused_with_the_choices():
    dims = dict.fromkeys((f.name for f in FEATURES), 2)
    with pytest.raises(ValueError, match=r"dtype is 'float8', but must be one of \['bfloat16', 'float16'"):
        embedding_bytes(FEATURES, dims, "float8")
    with pytest.raises(ValueError, match="dtype is 'double'"):
        model_bytes(FEATURES, dims, (4,), "double")


def test_model_refuses_parameters_beyond_the_machines_memory_before_allocating():
    have = available_bytes()
    assert have is not None and have > 0
    features = (FeatureInfo("user_id", False, 21), FeatureInfo("item_id", False, 31))
    assert check_fits(features, {"user_id": 4, "item_id": 4}, (8,)) == 4 * (21 * 4 + 31 * 4 + 8 * 8 + 8 + 8 + 1)
    dims = {"user_id": 10**12, "item_id": 4}
    with pytest.raises(ValueError, match=r"its largest dim is user_id=1000000000000; lower it") as e:
        EmbeddingRecommender(features, dims, (8,))
    assert f"need {(21 * 10**12 + 31 * 4 + (10**12 + 4) * 8 + 8 + 9) * 4:,} bytes" in str(e.value)
    with pytest.raises(ValueError, match=r"its widest hidden layer is 1000000000000; give narrower ones"):
        EmbeddingRecommender(features, {"user_id": 4, "item_id": 4}, (10**12,))
