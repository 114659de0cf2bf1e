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
