from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipelines import ModelConfig, SyntheticSpec, TrainConfig, generate, prepare, train
from pipelines.dataset import FeatureInfo
from pipelines.encode import Column, Encoded
from pipelines.model import Backprop, EmbeddingRecommender
from pipelines.synthetic import PlantedFeature
from pipelines.train import Adam, SplitTensors, TrainBatches, evaluate

# Small planted task (~10k rows) a model learns in a few epochs; "shelf" carries no signal, "tags" is multi-valued.
PLANTED = (
    PlantedFeature("user", 60, 4),
    PlantedFeature("item", 80, 4),
    PlantedFeature("genre", 8, 2),
    PlantedFeature("tags", 30, 2, multi=True),
    PlantedFeature("shelf", 20, 0),
)
MODEL = ModelConfig({"user": 4, "item": 4, "genre": 4, "tags": 4, "shelf": 2}, hidden=(16, 8))
FAST = TrainConfig(lr=1e-2, batch_size=256, max_epochs=4, patience=0, threads=1)


@pytest.fixture(scope="module")
def data():
    return prepare(generate(SyntheticSpec(PLANTED, rows=12_000, seed=0)))


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_learns_the_planted_task(data):
    result = train(MODEL, FAST, data)
    assert result.best_val_auc > 0.7
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(0 < h.val_logloss < 1 and h.samples_per_s > 0 and h.cpu_seconds > 0 for h in result.history)
    test_auc, _ = evaluate(result.model, SplitTensors(data.test, result.model, torch.device("cpu")))
    assert test_auc > 0.7


def test_train_returns_the_best_epochs_weights(data):
    result = train(MODEL, FAST, data)
    auc, logloss = evaluate(result.model, SplitTensors(data.val, result.model, torch.device("cpu")))
    assert auc == pytest.approx(result.best_val_auc)
    assert logloss == pytest.approx(result.best_val_logloss)
    assert result.history[result.best_epoch - 1].val_auc == result.best_val_auc


def test_train_same_seed_gives_identical_history(data):
    a, b = train(MODEL, FAST, data), train(MODEL, FAST, data)
    strip = lambda r: [(h.train_loss, h.val_auc, h.val_logloss) for h in r.history]  # noqa: E731
    assert strip(a) == strip(b)
    other = train(MODEL, TrainConfig(**{**FAST.__dict__, "seed": 1}), data)
    assert strip(other) != strip(a)


@pytest.mark.parametrize("sparse", [False, True])
def test_train_resumed_from_a_snapshot_equals_an_uninterrupted_run(data, sparse):
    cfg = TrainConfig(**{**FAST.__dict__, "sparse": sparse})
    model = ModelConfig(MODEL.dims, MODEL.hidden, dropout=0.2)  # dropout: its generator must resume too
    full = train(model, cfg, data)
    snapshots = {}

    def keep(result, snapshot):
        snapshots[result.epoch] = snapshot()
        return result.epoch < 2  # stop after epoch 2

    first = train(model, cfg, data, on_epoch=keep)
    assert first.ended == "stopped" and first.epochs == 2
    resumed = train(model, cfg, data, resume=snapshots[2])
    strip = lambda r: [(h.epoch, h.train_loss, h.val_auc, h.val_logloss) for h in r.history]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()))


def test_train_sparse_mode_learns(data):
    result = train(MODEL, TrainConfig(**{**FAST.__dict__, "sparse": True}), data)
    assert result.best_val_auc > 0.7


def test_train_patience_stops_early_as_converged(data):
    # big tables on few rows with a high lr overfit after a few epochs, so the val AUC stops improving
    dims = dict.fromkeys(MODEL.dims, 32)
    cfg = TrainConfig(lr=3e-2, batch_size=128, max_epochs=40, patience=2, threads=1)
    result = train(ModelConfig(dims, (64,)), cfg, data)
    assert result.ended == "converged"
    assert result.epochs < 40
    assert result.epochs - result.best_epoch == 2
    assert max(h.val_auc for h in result.history) == result.best_val_auc


def test_train_should_stop_leaves_the_epoch_under_way(data):
    batches = math.ceil(len(data.train.label) / FAST.batch_size)  # one epoch's
    asked = []

    def should_stop() -> bool:  # True from the middle of the third epoch on
        asked.append(1)
        return len(asked) > 2 * batches + batches // 2

    result = train(MODEL, FAST, data, should_stop=should_stop)
    assert result.ended == "stopped"
    assert [h.epoch for h in result.history] == [1, 2]  # the third epoch, left unfinished, is not in the history
    assert len(asked) == 2 * batches + batches // 2 + 1  # asked before every batch, and no batch after the answer
    full = train(MODEL, FAST, data)
    assert [h.val_auc for h in full.history[:2]] == [h.val_auc for h in result.history]


def test_train_on_val_ignores_patience(data):
    cfg = TrainConfig(lr=3e-2, batch_size=128, max_epochs=5, patience=1, threads=1)
    result = train(MODEL, cfg, data, train_on_val=True)
    assert result.ended == "max_epochs" and result.epochs == 5


def test_train_diverging_learning_rate_raises_floating_point_error(data):
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(MODEL, TrainConfig(**{**FAST.__dict__, "lr": 1e30}), data)


def test_train_uses_the_configured_threads(data):
    train(MODEL, TrainConfig(**{**FAST.__dict__, "max_epochs": 1, "threads": 1}), data)
    assert torch.get_num_threads() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_train_runs_on_cuda(data):
    result = train(MODEL, FAST, data, device="cuda")
    assert next(result.model.parameters()).is_cuda
    assert result.best_val_auc > 0.7


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0.0}, "lr is 0.0, but must be > 0"),
    ({"batch_size": 0}, "batch_size is 0, but must be >= 1"),
    ({"patience": -1}, "patience is -1, but must be >= 0"),
    ({"threads": 0}, "threads is 0, but must be >= 1"),
    ({"threads": -2}, "threads is -2, but must be >= 1"),
])
def test_train_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def _one_step_setup(sparse: bool, weight_decay: float = 0.0):
    torch.manual_seed(0)
    feats = (FeatureInfo("u", False, 20), FeatureInfo("i", False, 15), FeatureInfo("t", True, 9))
    model = EmbeddingRecommender(feats, {"u": 4, "i": 4, "t": 3}, (8,), sparse=sparse)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 3, 40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    split = Encoded(
        {"u": Column(rng.integers(0, 20, 40).astype(np.int32)), "i": Column(rng.integers(0, 15, 40).astype(np.int32)),
         "t": Column(rng.integers(0, 9, offsets[-1]).astype(np.int32), offsets)},
        rng.integers(0, 2, 40).astype(np.float32),
    )
    return model, SplitTensors(split, model, torch.device("cpu")), split


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("fused", [True, False])
def test_adam_steps_equal_torch_optim_adam_on_autograd_gradients(fused, weight_decay):
    model, tensors, split = _one_step_setup(sparse=False)
    reference = EmbeddingRecommender(model.features, model.dims, model.hidden)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(
        [{"params": reference.embedding_parameters(), "weight_decay": 0.0},
         {"params": reference.dense_parameters(), "weight_decay": weight_decay}], lr=0.01,
    )
    bp = Backprop(model, 16)
    opt = Adam(bp, 0.01, weight_decay, fused=fused)
    batches = TrainBatches(split, model, torch.device("cpu"), chunk_rows=32)  # 40 rows: a chunk boundary mid-epoch
    perm = torch.randperm(len(tensors), generator=torch.Generator().manual_seed(0))
    ours = (batch for _, chunk in batches.epoch(perm, 16) for batch in chunk)
    theirs = tensors.permuted(perm).batches(16)
    for (idx, bags, y, _), (single, ref_bags, _) in zip(ours, theirs):
        bp.step(idx, bags, y)
        opt.step()
        loss = nn.functional.binary_cross_entropy_with_logits(reference(single, ref_bags), y)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_adam_sparse_rows_equal_torch_optim_sparse_adam():
    model, tensors, split = _one_step_setup(sparse=True)
    reference = EmbeddingRecommender(model.features, model.dims, model.hidden, sparse=True)
    reference.load_state_dict(model.state_dict())
    ref_sparse = torch.optim.SparseAdam(reference.embedding_parameters(), lr=0.01)
    ref_dense = torch.optim.Adam(reference.dense_parameters(), lr=0.01)
    bp = Backprop(model, 16, sparse=True)
    opt = Adam(bp, 0.01)
    perm = torch.arange(len(tensors))
    ours = (batch for _, chunk in TrainBatches(split, model, torch.device("cpu")).epoch(perm, 16) for batch in chunk)
    for (idx, bags, y, _), (single, ref_bags, _) in zip(ours, tensors.batches(16)):
        bp.step(idx, bags, y)
        opt.step()
        loss = nn.functional.binary_cross_entropy_with_logits(reference(single, ref_bags), y)
        ref_sparse.zero_grad()
        ref_dense.zero_grad()
        loss.backward()
        ref_sparse.step()
        ref_dense.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[tensors.single[:, model.single_order.index("u")]] = False
    assert untouched.any()  # rows no batch touched keep their initial values
    torch.manual_seed(0)  # as _one_step_setup built the model
    initial = EmbeddingRecommender(model.features, model.dims, model.hidden)
    assert torch.equal(model.table("u")[untouched], initial.table("u")[untouched])


@pytest.mark.parametrize("chunk_rows", [16, 32, 1 << 16])
def test_train_batches_read_the_columns_in_place_and_chunks_change_nothing(chunk_rows):
    model, tensors, split = _one_step_setup(sparse=False)
    for col in split.columns.values():  # as Ray's object store hands them to a trial
        col.values.flags.writeable = False
    split.label.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning either
        batches = TrainBatches(split, model, torch.device("cpu"), chunk_rows=chunk_rows)
    cols = [c for cols, _ in batches.tables for c in cols] + [v for v, _ in batches.bags]
    names = model.single_order + model.bag_order
    assert all(c.data_ptr() == split.columns[n].values.ctypes.data for c, n in zip(cols, names))  # no copy
    perm = torch.randperm(len(tensors), generator=torch.Generator().manual_seed(1))
    chunks = list(batches.epoch(perm, 16))
    assert len(chunks) == -(-len(perm) // max(16, chunk_rows // 16 * 16))  # chunks of whole batches
    ours = [(labels, batch) for labels, chunk in chunks for batch in chunk]
    whole = [b for _, chunk in TrainBatches(split, model, torch.device("cpu"), chunk_rows=len(perm)).epoch(perm, 16)
             for b in chunk]
    reference = tensors.permuted(perm)
    assert torch.equal(torch.cat([labels for labels, _ in chunks]), reference.label)
    rows = 0
    for (labels, (idx, bags, y, where)), (idx2, bags2, y2, _), (single, ref_bags, y3) in zip(
            ours, whole, reference.batches(16)):
        assert torch.equal(y, y2) and torch.equal(y, y3) and torch.equal(labels[where], y)
        assert all(torch.equal(a, b) for a, b in zip(idx, idx2))
        for (v, o, r, w), (v2, o2, r2, w2), (v3, o3) in zip(bags, bags2, ref_bags):
            assert torch.equal(v, v3) and torch.equal(o, o3)
            assert torch.equal(v, v2) and torch.equal(r, r2) and torch.equal(w, w2)
        first, _, base = model.group_layout()[0]
        assert torch.equal(idx[0].view(len(y), -1), single[:, first : first + idx[0].numel() // len(y)] + base)
        rows += len(y)
    assert rows == len(perm)


def test_evaluate_reports_nan_auc_for_one_class(data):
    model = EmbeddingRecommender(data.features, MODEL.dims, MODEL.hidden)
    tensors = SplitTensors(data.val, model, torch.device("cpu"))
    tensors.label = torch.ones_like(tensors.label)
    auc, logloss = evaluate(model, tensors)
    assert math.isnan(auc) and math.isfinite(logloss)


@settings(deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=60))
def test_roc_auc_equals_sklearn_with_ties(pairs):
    from sklearn.metrics import roc_auc_score

    from pipelines.train import roc_auc

    y = np.array([a for a, _ in pairs])
    p = np.array([b for _, b in pairs], dtype=np.float32) / 6
    if y.all() or not y.any():
        assert math.isnan(roc_auc(y, p))
    else:
        assert math.isclose(roc_auc(y, p), roc_auc_score(y, p), rel_tol=1e-12, abs_tol=1e-12)
