from __future__ import annotations

import pytest

from pipelines import FeatureInfo, ModelConfig, TrainConfig
from pipelines.recipe import Recipe, build

FEATURES = (FeatureInfo("u", False, 11), FeatureInfo("g", True, 6))


def test_recipe_roundtrip_rebuilds_exact_model(tmp_path):
    recipe = Recipe(FEATURES, ModelConfig({"u": 5, "g": 3}, (16, 8)), TrainConfig(lr=0.01), {"fingerprint": "abc"})
    path = recipe.save(tmp_path / "r.yaml")
    again = Recipe.load(path)
    model = build(again)
    assert again.model.dims == {"u": 5, "g": 3}
    assert sum(p.numel() for p in model.parameters()) * 4 == recipe.model_bytes()
    assert model.table("u").shape == (11, 5)


def test_recipe_load_refuses_foreign_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        Recipe.load(p)
    p.write_text("a: 1\n")
    with pytest.raises(ValueError, match="not an embsize recipe"):
        Recipe.load(p)
    with pytest.raises(ValueError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")


def test_write_atomic_files_get_the_umask_mode_not_0600(tmp_path):
    """Outputs are read by other users (a serving host, teammates): the mode is 0o666 less the umask, as open()'s."""
    import os
    import stat

    from pipelines.recipe import write_atomic

    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "out" / "recommended.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == "a: 1\n"
    assert [p.name for p in path.parent.iterdir()] == ["recommended.yaml"]  # no temporary file left


# A recipe as `embsize search` writes it for a table (runner's _conclude with cli._load's dataset info), and one edit
# per problem a hand edit can make: (field path, new value or DELETE, what the one-line error must say).
DELETE = object()
TABLE_FEATURES = (FeatureInfo("user_id", False, 21), FeatureInfo("item_id", False, 31), FeatureInfo("tags", True, 6))


def written_recipe(path, features=TABLE_FEATURES) -> Recipe:
    dataset = {"name": "events", "fingerprint": "3f2a9c", "source": str(path.parent / "events.csv"), "split": "random",
               "min_freq": 1, "seed": 0, "rows": 400, "label": "clicked", "features": "user_id,item_id,tags",
               "multi": "tags"}
    recipe = Recipe(features, ModelConfig({f.name: 2 + i for i, f in enumerate(features)}, (8, 4), 0.1),
                    TrainConfig(lr=0.01, max_epochs=2, patience=0), dataset,
                    expected={"val_auc": 0.61, "model_bytes": 1234, "embedding_bytes": 1000, "epochs": 2},
                    provenance={"search": "s", "trial_id": "7", "rule": "knee",
                                "mlflow": {"tracking_uri": "sqlite:///m.db", "experiment_id": "1",
                                           "parent_run_id": "abc", "trial_run_id": "def"}})
    recipe.save(path)
    return recipe


def edited(path, field: str, value) -> None:
    """Set (or delete) one field of the recipe file at ``path``: 'train.batch_size', 'features[0].multi'."""
    import yaml

    d = yaml.safe_load(path.read_text())
    keys = [int(k) if k.isdigit() else k for k in field.replace("[", ".").replace("]", "").split(".")]
    parent = d
    for k in keys[:-1]:
        parent = parent[k]
    if value is DELETE:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value
    path.write_text(yaml.safe_dump(d, sort_keys=False))


BAD_EDITS = [
    ("train.batch_size", 2.5, "train.batch_size is 2.5 in {src}, but must be an integer >= 1"),
    ("train.batch_size", True, "train.batch_size is True in {src}, but must be an integer >= 1"),
    ("train.weight_decay", "x", "train.weight_decay is 'x' in {src}, but must be a number >= 0"),
    ("train.lr", 0, "train.lr is 0 in {src}, but must be a number > 0"),
    ("train.seed", -1, "train.seed is -1 in {src}, but must be an integer >= 0"),
    ("train.sparse", "no", "train.sparse is 'no' in {src}, but must be true or false"),
    ("train.batchsize", 64, "train.batchsize in {src} is unknown: train takes only lr, batch_size"),
    ("train", DELETE, "train is missing in {src}, but must be a mapping with lr, batch_size"),
    ("train.patience", DELETE, "train.patience is missing in {src}, but must be an integer >= 0"),
    ("dataset.min_freq", "x", "dataset.min_freq is 'x' in {src}, but must be an integer >= 1"),
    ("dataset.seed", -1, "dataset.seed is -1 in {src}, but must be an integer >= 0"),
    ("dataset.split", "time", "dataset.split is 'time' in {src}, but must be 'random' or 'temporal'"),
    ("dataset", [1, 2], "dataset is [1, 2] in {src}, but must be a mapping of the data options"),
    ("dataset", DELETE, "dataset is missing in {src}, but must be a mapping of the data options"),
    ("expected", [1, 2], "expected is [1, 2] in {src}, but must be a mapping of the search's metrics"),
    ("expected.best_epoch", "x", "expected.best_epoch is 'x' in {src}, but must be an integer >= 0"),
    ("expected.val_auc", "high", "expected.val_auc is 'high' in {src}, but must be a number"),
    ("provenance", "x", "provenance is 'x' in {src}, but must be a mapping of where the recipe came from"),
    ("provenance.mlflow", "x", "provenance.mlflow is 'x' in {src}, but must be a mapping (tracking_uri"),
    ("features", DELETE, "features is missing in {src}, but must be a non-empty list of features"),
    ("features", [], "features is [] in {src}, but must be a non-empty list of features"),
    ("features[0]", "user_id", "features[0] is 'user_id' in {src}, but must be a mapping with name, multi, card"),
    ("features[0].cardinality", "abc", "features[0].cardinality is 'abc' in {src}, but must be an integer >= 1"),
    ("features[0].multi", "false", "features[0].multi is 'false' in {src}, but must be true or false"),
    ("features[1].name", "user_id", "features[1].name is 'user_id' in {src}, but must be a name no other feature has"),
    ("model.dropout", "abc", "model.dropout is 'abc' in {src}, but must be a number in [0, 1)"),
    ("model.dropout", 1.0, "model.dropout is 1.0 in {src}, but must be a number in [0, 1)"),
    ("model.hidden", "64,32", "model.hidden is '64,32' in {src}, but must be a list of integers >= 1"),
    ("model.hidden", "64", "model.hidden is '64' in {src}, but must be a list of integers >= 1"),
    ("model.hidden", [64, 0], "model.hidden is [64, 0] in {src}, but must be a list of integers >= 1"),
    ("model.dims.user_id", 2.5, "model.dims.user_id is 2.5 in {src}, but must be an integer >= 1"),
    ("model.dims.user_id", 0, "model.dims.user_id is 0 in {src}, but must be an integer >= 1"),
    ("model.dims.user_id", DELETE, "model.dims.user_id is missing in {src}, but must be an integer >= 1"),
    ("model.dims.genre", 4, "model.dims.genre in {src} is unknown: model.dims takes only user_id, item_id, tags"),
    ("model", DELETE, "model is missing in {src}, but must be a mapping with dims, hidden and dropout"),
]


@pytest.mark.parametrize("field, value, message", BAD_EDITS, ids=[f"{f}={v!r}" for f, v, _ in BAD_EDITS])
def test_recipe_load_refuses_a_bad_field_naming_it_the_value_and_the_rule(tmp_path, field, value, message):
    path = tmp_path / "cfg.yaml"
    written_recipe(path)
    Recipe.load(path)  # valid as written
    edited(path, field, value)
    with pytest.raises(ValueError) as e:
        Recipe.load(path)
    assert message.format(src=f"config file '{path.resolve()}'") in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_recipe_load_keeps_a_written_recipe_and_reads_1e_3_as_a_number(tmp_path):
    path = tmp_path / "recommended.yaml"
    recipe = written_recipe(path)
    again = Recipe.load(path)
    assert again == recipe and again.model.hidden == (8, 4) and again.features[2].multi is True
    edited(path, "train.lr", "1e-3")  # how PyYAML (YAML 1.1) reads a hand-written `lr: 1e-3`
    assert Recipe.load(path).train.lr == 0.001


# What the first version of `embsize search` (format 1, c995b3e) wrote for the synthetic data: no table options,
# planted_dims, four expected metrics. Every later writer of format 1 adds keys to dataset/expected/provenance only.
OLDEST = """\
format: 1
features:
- name: user_id
  multi: false
  cardinality: 1001
- name: genres
  multi: true
  cardinality: 19
model:
  dims:
    user_id: 16
    genres: 4
  hidden:
  - 64
  - 32
  dropout: 0.0
train:
  lr: 0.003
  batch_size: 1024
  max_epochs: 10
  patience: 3
  weight_decay: 0.0
  sparse: false
  seed: 0
dataset:
  name: synthetic
  fingerprint: 9a1b2c3d4e5f
  source: synthetic
  split: random
  min_freq: 1
  seed: 0
  rows: 100000
  planted_dims:
    user_id: 16
    genres: 4
expected:
  val_auc: .nan
  model_bytes: 80012
  embedding_bytes: 64368
  epochs: 10
provenance:
  search: embsize-20261125
  trial_id: a1b2_00003
  rule: knee
  mlflow:
    tracking_uri: sqlite:///mlruns/mlflow.db
    experiment_id: '1'
    parent_run_id: 0f1e2d
    trial_run_id: null
"""


def test_recipe_load_reads_the_oldest_format_and_what_other_writers_write(tmp_path):
    path = tmp_path / "oldest.yaml"
    path.write_text(OLDEST)
    old = Recipe.load(path)
    assert old.model.dims == {"user_id": 16, "genres": 4} and old.train == TrainConfig()
    assert old.dataset["planted_dims"] == {"user_id": 16, "genres": 4} and old.expected["epochs"] == 10
    assert build(old).table("user_id").shape == (1001, 16)
    # model.dropout absent: the first reader defaulted it, so does this one
    path.write_text(OLDEST.replace("  dropout: 0.0\n", ""))
    assert Recipe.load(path).model.dropout == 0.0
    # an export's config.yaml: a Recipe built without dataset/expected/provenance writes them empty
    bare = Recipe(FEATURES, ModelConfig({"u": 5, "g": 3}), TrainConfig()).save(tmp_path / "config.yaml")
    assert Recipe.load(bare).dataset == {}
    # confirm/refine rebuild the dataset from the search's MLflow params (text) when its recipe is not logged
    path.write_text(OLDEST.replace("  seed: 0\n  rows: 100000\n", "  seed: '3'\n  rows: '100000'\n"))
    assert (Recipe.load(path).dataset["seed"], Recipe.load(path).dataset["rows"]) == (3, 100000)

