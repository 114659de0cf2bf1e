from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipelines import native
from pipelines.model import Backprop, EmbeddingRecommender

from .test_model import FEATURES, SINGLE_ONLY, _backprop_inputs, _batch


@pytest.fixture()
def kernels(tmp_path, monkeypatch):
    """The kernels built afresh into an empty cache (not the user's), as a first run on a new machine does."""
    monkeypatch.setenv("EMBSIZE_CACHE", str(tmp_path))
    native.kernels.cache_clear()
    k = native.kernels()
    yield k
    native.kernels.cache_clear()


def test_kernels_build_once_into_the_cache_keyed_by_source_and_cpu(kernels, tmp_path):
    assert kernels is not None  # CI and dev machines have cc; the fallback is tested below
    built = list((tmp_path / "native").glob("rows-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native.kernels.cache_clear()
    assert native.kernels() is not None
    assert list((tmp_path / "native").glob("*")) == built and built[0].stat().st_mtime_ns == mtime  # reused


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 50), batch=st.integers(1, 40), f=st.integers(1, 4), d=st.integers(1, 9),
       pad=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_gather_and_scatter_add_equal_torch_index_ops_on_strided_blocks(rows, batch, f, d, pad, seed):
    k = native.kernels()
    assert k is not None
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, d, generator=g)
    idx = torch.randint(0, rows, (batch * f,), generator=g)  # duplicates likely: they must add up
    x = torch.randn(batch, pad + f * d + 3, generator=g)  # the block sits between other columns
    block = x[:, pad : pad + f * d]
    before = x.clone()
    k.gather(table, idx, block, f)
    assert torch.equal(block.reshape(batch * f, d), table.index_select(0, idx))
    assert torch.equal(x[:, :pad], before[:, :pad]) and torch.equal(x[:, pad + f * d :], before[:, pad + f * d :])
    grad = torch.randn(rows, d, generator=g)
    expected = grad.clone().index_add_(0, idx, block.reshape(batch * f, d))
    k.scatter_add(grad, idx, block, f)
    assert torch.allclose(grad, expected, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), lengths=st.lists(st.integers(0, 4), min_size=1, max_size=30), d=st.integers(1, 9),
       pad=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_bag_mean_and_its_scatter_equal_embedding_bag_and_its_gradient(rows, lengths, d, pad, seed):
    k = native.kernels()
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, d, generator=g, requires_grad=True)
    values = torch.randint(0, rows, (sum(lengths),), generator=g)
    offsets = torch.tensor([0, *lengths[:-1]]).cumsum(0)  # empty bags included: they pool to zeros
    x = torch.randn(len(lengths), pad + d + 2, generator=g)
    block = x[:, pad : pad + d]
    expected = nn.functional.embedding_bag(values, table, offsets, mode="mean")
    k.bag_mean(table.detach(), values, offsets, block)
    assert torch.allclose(block, expected, atol=1e-6)
    upstream = torch.randn(len(lengths), pad + d + 2, generator=g)
    (expected * upstream[:, pad : pad + d]).sum().backward()
    grad = torch.zeros(rows, d)
    k.bag_mean_scatter_add(grad, values, offsets, upstream[:, pad : pad + d])
    assert torch.allclose(grad, table.grad, atol=1e-5)


def test_bag_offsets_out_of_order_or_past_the_values_raise():
    k = native.kernels()
    table, x = torch.zeros(5, 2), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="bag offsets are not increasing within \\[0, 3\\] at bag 1"):
        k.bag_mean(table, torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1]), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at bag 0"):
        k.bag_mean_scatter_add(table, torch.tensor([0, 1, 2]), torch.tensor([0, 4]), x)
    with pytest.raises(IndexError, match="row index 7 is out of range for a table of 5 rows"):
        k.bag_mean(table, torch.tensor([0, 7, 2]), torch.tensor([0, 1]), x)


def test_an_out_of_range_row_index_raises_instead_of_writing_past_the_table():
    k = native.kernels()
    table, x = torch.zeros(5, 2), torch.zeros(3, 2)
    for bad in (5, -1):
        with pytest.raises(IndexError, match=f"row index {bad} is out of range for a table of 5 rows"):
            k.gather(table, torch.tensor([0, bad, 1]), x, 1)
        with pytest.raises(IndexError, match=f"row index {bad} is out of range"):
            k.scatter_add(table, torch.tensor([0, 1, bad]), x, 1)


@pytest.mark.parametrize("env", [{"EMBSIZE_NATIVE": "0"}, {"CC": "no-such-compiler-embsize"}])
def test_without_a_compiler_or_when_disabled_the_trainer_falls_back_to_torch(env, monkeypatch, tmp_path):
    monkeypatch.setenv("EMBSIZE_CACHE", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None
        model = EmbeddingRecommender(SINGLE_ONLY, {"user": 4, "item": 4, "genre": 2, "zip": 4}, (8,))
        assert Backprop(model, 16).native is None
    finally:
        native.kernels.cache_clear()
    assert not (tmp_path / "native").exists() or not list((tmp_path / "native").glob("*.so"))


@pytest.mark.parametrize(
    "features, dims",
    [
        (SINGLE_ONLY, {"user": 6, "item": 6, "genre": 6, "zip": 6}),  # one table fills the input
        (SINGLE_ONLY, {"user": 5, "item": 5, "genre": 5, "zip": 5}),  # one table, input padded from 20 to 24 columns
        (SINGLE_ONLY, {"user": 8, "item": 8, "genre": 4, "zip": 2}),  # a shared table among one-feature tables
        (FEATURES, {"user": 8, "item": 3, "genre": 4, "tags": 2, "zip": 8}),  # with a bag
    ],
)
def test_backprop_with_kernels_equals_backprop_with_torch_ops(features, dims):
    torch.manual_seed(0)
    model = EmbeddingRecommender(features, dims, (16, 8))
    single, bags, y = _batch(model, 37)
    idx, extra = _backprop_inputs(model, single, bags)
    extra = [(v, o, r, w.float()) for v, o, r, w in extra]
    with_kernels, with_torch = Backprop(model, 64), Backprop(model, 64)
    with_torch.native = None
    assert with_kernels.native is not None
    logits = [torch.empty(37, 1), torch.empty(37, 1)]
    for bp, out in zip((with_kernels, with_torch), logits):
        bp.step(idx, extra, y.float(), out)
    assert torch.allclose(logits[0], logits[1], atol=1e-6)
    assert torch.allclose(with_kernels.x[:37], with_torch.x[:37])
    for a, b in zip(with_kernels.grads + with_kernels.table_grads, with_torch.grads + with_torch.table_grads):
        assert torch.allclose(a, b, atol=1e-6)
    loss = nn.functional.binary_cross_entropy_with_logits(model(single, [(v, o[:-1]) for v, o, _ in bags]), y.float())
    loss.backward()
    for grad, table in zip(with_kernels.table_grads, model.embedding_parameters()):
        assert torch.allclose(grad, table.grad.to_dense(), atol=1e-6)
