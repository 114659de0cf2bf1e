from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines import Feature, ModelConfig, RawDataset, TrainConfig, load_model, prepare, save_model, score, train
from pipelines.export import CONFIG, MANIFEST, VOCABULARIES, WEIGHTS, _sha256, read_manifest
from pipelines.recipe import Recipe


def _raw(n: int = 400, seed: int = 0) -> RawDataset:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "user_id": rng.integers(1, 30, n),
        "occupation": rng.choice(["technician", "writer", "artist"], n),
        "genres": rng.choice(["Action|Comedy", "Drama", "Comedy|Drama|War"], n),
    })
    label = (rng.random(n) < 0.5).astype(np.float32)
    features = (Feature("user_id"), Feature("occupation"), Feature("genres", multi=True))
    return RawDataset("tiny", frame, features, label)


@pytest.fixture(scope="module")
def trained():
    raw = _raw()
    data = prepare(raw)
    model_cfg = ModelConfig({"user_id": 4, "occupation": 2, "genres": 3}, (8,))
    result = train(model_cfg, TrainConfig(max_epochs=1, batch_size=64), data, train_on_val=True)
    return raw, data, result.model, Recipe(data.features, model_cfg, TrainConfig(max_epochs=1))


@pytest.fixture
def exported(trained, tmp_path):
    _, data, model, recipe = trained
    return save_model(tmp_path / "export", model, data.encoder, recipe, {"fingerprint": data.fingerprint})


def test_load_model_scores_like_the_trained_model(trained, exported):
    raw, data, model, _ = trained
    loaded, encoder = load_model(exported)
    rows = raw.frame.head(50)
    expected = score(model, data.encoder, rows)
    assert expected.shape == (50,) and expected.dtype == np.float32
    assert np.array_equal(score(loaded, encoder, rows), expected)
    assert not loaded.training
    assert read_manifest(exported)["fingerprint"] == data.fingerprint


def test_export_weights_are_a_plain_tensor_dict(exported):
    state = torch.load(exported / WEIGHTS, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert json.loads((exported / VOCABULARIES).read_text())["genres"]["multi"] is True
    assert read_manifest(exported)["files"][WEIGHTS] == _sha256(exported / WEIGHTS)


def test_score_unseen_and_missing_values_use_the_unknown_bucket(trained):
    _, data, model, _ = trained
    rows = pd.DataFrame({
        "user_id": [999, 1000, None],
        "occupation": ["astronaut", "pilot", None],
        "genres": ["Western|Noir", "Musical", None],
    })
    s = score(model, data.encoder, rows)
    assert np.isfinite(s).all()
    assert s[0] == s[1] == s[2]  # every value unseen or missing: all three rows are the all-unknown input


def test_score_normalizes_raw_values_like_training(trained):
    raw, data, model, _ = trained
    row = raw.frame.head(1)
    as_text = row.assign(user_id=row["user_id"].astype(str))
    as_float = row.assign(user_id=row["user_id"].astype(float))
    reordered = row[["genres", "user_id", "occupation"]]
    s = [score(model, data.encoder, r)[0] for r in (row, as_text, as_float, reordered)]
    assert s[0] == s[1] == s[2] == s[3]


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns="occupation"), "missing column 'occupation'"),
    (lambda f: f.assign(rating=4), "column 'rating' that the model does not use"),
    (lambda f: pd.concat([f, f["user_id"]], axis=1), r"column 'user_id' 2 times; give each of \['user_id', "),
])
def test_score_refuses_missing_or_extra_columns(trained, change, message):
    raw, data, model, _ = trained
    with pytest.raises(ValueError, match=message):
        score(model, data.encoder, change(raw.frame.head(3)))


def test_score_refuses_non_frames(trained):
    raw, data, model, _ = trained
    with pytest.raises(ValueError, match="must be a pandas DataFrame"):
        score(model, data.encoder, raw.frame.head(3).to_dict("records"))


def test_load_model_refuses_modified_weights(exported):
    blob = bytearray((exported / WEIGHTS).read_bytes())
    blob[-100] ^= 0xFF
    (exported / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="weights.pt .* does not match its sha256"):
        load_model(exported)


def test_load_model_refuses_other_format_versions(exported):
    manifest = json.loads((exported / MANIFEST).read_text())
    manifest["format"] = 99
    (exported / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99, but this embsize reads version 1"):
        load_model(exported)


def _rewrite(exported, name: str, write) -> None:
    """Replace one file and fix its sha256, as a careless hand edit (or another version) would leave it."""
    write(exported / name)
    manifest = json.loads((exported / MANIFEST).read_text())
    manifest["files"][name] = _sha256(exported / name)
    (exported / MANIFEST).write_text(json.dumps(manifest))


def test_load_model_refuses_weights_that_do_not_match_the_config(exported):
    state = torch.load(exported / WEIGHTS, weights_only=True)
    key = next(k for k in state if k.startswith("mlp.") and k.endswith("weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    _rewrite(exported, WEIGHTS, lambda p: torch.save(state, p))
    with pytest.raises(ValueError, match=rf"tensor '{key}' .* has shape .* but config.yaml implies"):
        load_model(exported)


def test_load_model_refuses_config_with_other_dims(exported):
    recipe = Recipe.load(exported / CONFIG)
    dims = {**recipe.model.dims, "user_id": recipe.model.dims["user_id"] + 1}
    changed = Recipe(recipe.features, ModelConfig(dims, recipe.model.hidden), recipe.train)
    _rewrite(exported, CONFIG, changed.save)
    with pytest.raises(ValueError, match="has shape .* but config.yaml implies"):
        load_model(exported)


def test_load_model_refuses_pickled_objects(exported):
    _rewrite(exported, WEIGHTS, lambda p: torch.save({"x": os.path.join, "t": torch.zeros(1)}, p))
    with pytest.raises(ValueError, match="not a plain dict of tensors"):
        load_model(exported)


def test_load_model_refuses_a_directory_without_manifest(tmp_path):
    with pytest.raises(ValueError, match="is not an embsize export"):
        load_model(tmp_path)


def test_save_model_replaces_an_export_but_not_other_folders(trained, exported, tmp_path):
    _, data, model, recipe = trained
    before = read_manifest(exported)["created"]
    save_model(exported, model, data.encoder, recipe, {"note": "again"})
    assert read_manifest(exported)["note"] == "again" and before
    assert sorted(p.name for p in exported.iterdir()) == sorted([WEIGHTS, VOCABULARIES, CONFIG, MANIFEST])
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an embsize export"):
        save_model(other, model, data.encoder, recipe)
    assert (other / "keep.txt").read_text() == "mine"


def test_export_scores_padded_values_as_training_spelled_them(tmp_path):
    """A CSV with ' 5', '5 ' and '5' trains one category; the export (what the pyfunc model serves) maps a served
    ' 5' to training's '5', on both the small-frame and the vectorised path."""
    from pipelines.tabular import load_table

    rng = np.random.default_rng(0)
    n = 300
    path = tmp_path / "w.csv"
    pd.DataFrame({"item": rng.choice([" 5", "5 ", "5", "6", " 7"], n), "user": rng.choice(["a", "b", "c"], n),
                  "y": (rng.random(n) < 0.5).astype(int)}).to_csv(path, index=False)
    data = prepare(load_table(path, label="y", features=["item", "user"]))
    assert data.encoder.vocabs["item"].categories == ["5", "6", "7"]
    model_cfg = ModelConfig({"item": 2, "user": 2}, (4,))
    model = train(model_cfg, TrainConfig(max_epochs=1, batch_size=64), data, train_on_val=True).model
    export = save_model(tmp_path / "export", model, data.encoder, Recipe(data.features, model_cfg, TrainConfig()), {})
    loaded, encoder = load_model(export)
    rows = pd.DataFrame({"item": [" 5", "5", "5 ", "\t5 ", "7", " 7"], "user": ["a"] * 6})
    assert encoder.transform(rows)["item"].values.tolist() == [1, 1, 1, 1, 3, 3]
    encoder.SMALL_FRAME = -1  # the vectorised path, as a large batch takes
    assert encoder.transform(rows)["item"].values.tolist() == [1, 1, 1, 1, 3, 3]
    s = score(loaded, encoder, rows)
    assert s[0] == s[1] == s[2] == s[3] and s[4] == s[5]


def test_export_folder_takes_the_umask_like_its_files(trained, tmp_path):
    # a serving host or a teammate (another user) reads the export: not the 0700 of a temporary folder
    _, data, model, recipe = trained
    old = os.umask(0o022)
    try:
        out = save_model(tmp_path / "shared-export", model, data.encoder, recipe)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert {(f.stat().st_mode & 0o777) for f in out.iterdir()} == {0o644}
