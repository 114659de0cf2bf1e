"""A trained model as a plain directory, for production code without MLflow, and scoring raw rows with it.

An export holds four files: ``weights.pt`` (the state dict: a plain dict of tensors, written with ``torch.save``),
``vocabularies.json`` (``Encoder.to_dict``), ``config.yaml`` (the recipe of the trained model) and ``manifest.json``
(format version, sha256 of the other three files, the model's input layout, metrics and dataset fingerprint).
Loading reads the weights with ``torch.load(..., weights_only=True)`` (no pickled Python objects) after checking
each file against its sha256, then checks the tensors against the shapes the config implies. The sha256 catches
corruption and edits made without updating the manifest; it is not a signature (whoever can write the directory can
rewrite the manifest too).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from .encode import Encoded, Encoder
from .recipe import Recipe, write_atomic

FORMAT = 1  # bump when a file's meaning changes; loaders refuse other versions
KIND = "embsize-model"
WEIGHTS, VOCABULARIES, CONFIG, MANIFEST = "weights.pt", "vocabularies.json", "config.yaml", "manifest.json"


def save_model(directory: str | Path, model, encoder: Encoder, recipe: Recipe, info: dict | None = None) -> Path:
    """Write ``model`` (an EmbeddingRecommender), its encoder and its recipe to ``directory``.

    ``recipe.features`` must describe the trained model (its cardinalities). ``info`` (metrics, fingerprint, ...) goes
    into the manifest. The directory is written beside its final place and renamed in, so a reader never sees half an
    export; an existing export there is replaced, any other non-empty directory is refused.
    """
    import torch

    target = Path(directory).expanduser().resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).is_file())):
        raise ValueError(f"export directory '{target}' exists and is not an embsize export; choose a new directory")
    _check_consistent(model, encoder, recipe, str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its folder is 0700, which the rename below would keep, and an export is read by other
    # users (a serving host, teammates); mkdir applies the umask, as write_atomic's files do
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS)
        write_atomic(tmp / VOCABULARIES, json.dumps(encoder.to_dict()))
        recipe.save(tmp / CONFIG)
        manifest = {
            "kind": KIND,
            "format": FORMAT,
            "files": {name: _sha256(tmp / name) for name in (WEIGHTS, VOCABULARIES, CONFIG)},
            "columns": [f.name for f in encoder.features],  # the raw input columns, in order
            "single_order": list(model.single_order),
            "bag_order": list(model.bag_order),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            **(info or {}),
        }
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
        if target.exists():  # replace an earlier export: move it aside first, so one rename installs the new one
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | Path) -> dict:
    """The manifest of an export, after checking it is one and of a format this code reads."""
    d = Path(directory).expanduser().resolve()
    path = d / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"'{d}' is not an embsize export (no {MANIFEST}); write one with `embsize train --config ... --export DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{MANIFEST} of export '{d}' is not valid JSON ({e}); re-export the model") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ValueError(f"{MANIFEST} of '{d}' does not describe an embsize model; re-export the model")
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"export '{d}' has format version {manifest.get('format')!r}, but this embsize reads version {FORMAT}; "
            "re-export the model with this version of embsize"
        )
    return manifest


def load_model(directory: str | Path):
    """``(model, encoder)`` from an export: the model in eval mode on the CPU, ready for ``score(model, encoder, rows)``.

    Every failure (missing file, sha256 mismatch, other format version, tensors not matching the config) raises a
    ``ValueError`` naming the file or tensor.
    """
    import torch

    from .recipe import build

    d = Path(directory).expanduser().resolve()
    manifest = read_manifest(d)
    files = manifest.get("files") or {}
    for name in (WEIGHTS, VOCABULARIES, CONFIG):
        path = d / name
        if not path.is_file():
            raise ValueError(f"export '{d}' has no {name}; re-export the model")
        if name not in files or _sha256(path) != files[name]:
            raise ValueError(
                f"{name} of export '{d}' does not match its sha256 in {MANIFEST} (modified or corrupted); "
                "re-export the model"
            )
    recipe = Recipe.load(d / CONFIG)
    try:
        encoder = Encoder.from_dict(json.loads((d / VOCABULARIES).read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{VOCABULARIES} of export '{d}' is malformed ({e}); re-export the model") from e
    try:
        state = torch.load(d / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain containers, RuntimeError if truncated
        raise ValueError(f"{WEIGHTS} of export '{d}' is not a plain dict of tensors ({_first_line(e)}); "
                         "re-export the model") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{WEIGHTS} of export '{d}' is not a dict of tensors; re-export the model")
    model = build(recipe)
    _check_consistent(model, encoder, recipe, str(d))
    if [model.single_order, model.bag_order] != [manifest.get("single_order"), manifest.get("bag_order")]:
        raise ValueError(
            f"export '{d}' was written for input layout {manifest.get('single_order')} + {manifest.get('bag_order')}, "
            f"but this embsize builds {model.single_order} + {model.bag_order}; re-export the model"
        )
    expected = model.state_dict()
    for key in sorted(set(expected) | set(state)):
        if key not in state:
            raise ValueError(f"{WEIGHTS} of export '{d}' lacks tensor '{key}' that config.yaml implies; re-export")
        if key not in expected:
            raise ValueError(f"{WEIGHTS} of export '{d}' holds tensor '{key}' that config.yaml does not; re-export")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise ValueError(
                f"tensor '{key}' in {WEIGHTS} of export '{d}' has shape {tuple(state[key].shape)}, but config.yaml "
                f"implies {tuple(expected[key].shape)}; the files do not belong together, re-export the model"
            )
    model.load_state_dict(state)
    model.eval()
    return model, encoder


def check_columns(encoder: Encoder, frame: object) -> None:
    """Refuse input that is not a DataFrame holding exactly the model's raw columns (any order)."""
    needed = [f.name for f in encoder.features]
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"input is a {type(frame).__name__}, but must be a pandas DataFrame with columns {needed}")
    have = [str(c) for c in frame.columns]
    twice = sorted({c for c in have if have.count(c) > 1})
    if twice:
        raise ValueError(f"input has column '{twice[0]}' {have.count(twice[0])} times; give each of {needed} once")
    missing = [c for c in needed if c not in have]
    if missing:
        raise ValueError(f"input is missing column '{missing[0]}'; the model needs columns {needed}")
    extra = [c for c in have if c not in needed]
    if extra:
        raise ValueError(f"input has column '{extra[0]}' that the model does not use; give only columns {needed}")


def score(model, encoder: Encoder, frame: pd.DataFrame, batch_size: int = 65536) -> np.ndarray:
    """Probability of a positive label for each raw row (float32); unseen values use the unknown bucket."""
    from .train import SplitTensors, predict

    check_columns(encoder, frame)
    columns = encoder.transform(frame)  # vectorised per column, no loop over rows
    rows = Encoded(columns, np.zeros(len(frame), dtype=np.float32))
    return predict(model, SplitTensors(rows, model, next(model.parameters()).device), batch_size)


def _check_consistent(model, encoder: Encoder, recipe: Recipe, where: str) -> None:
    """The recipe, the encoder and the model must describe the same features and vocabulary sizes."""
    names = [f.name for f in recipe.features]
    if list(encoder.vocabs) != names:
        raise ValueError(f"vocabularies of '{where}' are for {list(encoder.vocabs)}, but the config for {names}")
    for f in recipe.features:
        vocab = encoder.vocabs[f.name]
        if vocab.size != f.cardinality or vocab.feature.multi != f.multi:
            raise ValueError(
                f"feature '{f.name}' of '{where}' has {vocab.size} vocabulary entries (multi={vocab.feature.multi}), "
                f"but the config says {f.cardinality} (multi={f.multi}); the files do not belong together"
            )
    if [f.name for f in model.features] != names:
        raise ValueError(f"the model of '{where}' has features {[f.name for f in model.features]}, the config {names}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
