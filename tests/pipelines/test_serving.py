from __future__ import annotations

from importlib import metadata

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from pipelines import ModelConfig, TrainConfig, prepare, save_model, score, train
from pipelines.recipe import Recipe
from pipelines.serving import json_safe, log_model, requirements

from .test_export import _raw


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    (tmp / "mlruns").mkdir()
    raw = _raw()
    data = prepare(raw)
    model_cfg = ModelConfig({"user_id": 4, "occupation": 2, "genres": 3}, (8,))
    model = train(model_cfg, TrainConfig(max_epochs=1, batch_size=64), data, train_on_val=True).model
    export = save_model(tmp / "export", model, data.encoder, Recipe(data.features, model_cfg, TrainConfig()))
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("serving-test")
    with mlflow.start_run(experiment_id=exp.experiment_id):
        info = log_model(export, raw.frame.head(3), registered_model_name="tiny", metadata={"embsize": {"k": 1}})
    loaded = mlflow.pyfunc.load_model("models:/tiny/1")
    return raw, data, model, info, loaded


def test_pyfunc_from_registry_scores_like_the_model(registered):
    raw, data, model, info, loaded = registered
    assert info.registered_model_version == 1
    rows = raw.frame.sample(60, random_state=1)
    out = loaded.predict(rows)
    assert list(out.columns) == ["score"] and len(out) == 60
    assert out.index.equals(rows.index)
    assert np.array_equal(out["score"].to_numpy(), score(model, data.encoder, rows))


def test_pyfunc_scores_unseen_categories(registered):
    _, _, _, _, loaded = registered
    rows = pd.DataFrame({"user_id": [10**6, 3], "occupation": ["astronaut", None], "genres": ["Noir|Western", ""]})
    out = loaded.predict(rows)["score"].to_numpy()
    assert out.shape == (2,) and np.isfinite(out).all() and ((out > 0) & (out < 1)).all()


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns="genres"), "missing column 'genres'"),
    (lambda f: f.assign(timestamp=0), "column 'timestamp' that the model does not use"),
])
def test_pyfunc_refuses_missing_or_extra_columns(registered, change, message):
    raw, _, _, _, loaded = registered
    with pytest.raises(MlflowException, match=message):
        loaded.predict(change(raw.frame.head(2)))


def test_log_model_records_signature_input_example_and_metadata(registered):
    raw, _, _, _, loaded = registered
    meta = loaded.metadata
    assert meta.signature.outputs.input_names() == ["score"]
    assert meta.metadata == {"embsize": {"k": 1}}
    example = meta.load_input_example(mlflow.artifacts.download_artifacts("models:/tiny/1"))
    assert list(example.columns) == list(raw.frame.columns) and len(example) == 3
    assert example["user_id"].tolist() == raw.frame["user_id"].head(3).tolist()  # raw values, not indices


def test_json_safe_turns_missing_values_into_none():
    frame = pd.DataFrame({"year": pd.array([1997, None], dtype="Int64"), "g": ["a", None]})
    safe = json_safe(frame)
    assert safe["year"].tolist() == [1997, None] and safe["g"].tolist() == ["a", None]


def test_requirements_pin_the_installed_versions():
    reqs = requirements()
    assert f"pandas=={metadata.version('pandas')}" in reqs
    assert any(r.startswith("torch==") and "+" not in r for r in reqs)


def test_log_model_says_nothing_at_info_and_leaves_mlflows_logging_as_it_was(registered, tmp_path):
    """MLflow's "Validating input example against model signature" INFO line, in a format of its own, came out among
    `embsize train --config`'s lines."""
    import logging

    raw, data, model, _, _ = registered
    export = save_model(tmp_path / "export", model, data.encoder,
                        Recipe(data.features, ModelConfig({"user_id": 4, "occupation": 2, "genres": 3}, (8,)),
                               TrainConfig()))
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    pyfunc_log.addHandler(handler)
    before = pyfunc_log.level
    try:
        assert pyfunc_log.isEnabledFor(logging.INFO)  # MLflow's default: the line would be said
        with mlflow.start_run(experiment_id=mlflow.set_experiment("serving-quiet").experiment_id):
            log_model(export, raw.frame.head(3))
    finally:
        pyfunc_log.removeHandler(handler)
    assert [r.getMessage() for r in seen if r.levelno < logging.WARNING] == []
    assert pyfunc_log.level == before
