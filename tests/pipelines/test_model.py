from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.dataset import FeatureInfo
from pipelines.model import Backprop, EmbeddingRecommender, validate_dims

FEATURES = (
    FeatureInfo("user", False, 50),
    FeatureInfo("item", False, 40),
    FeatureInfo("genre", False, 6),
    FeatureInfo("tags", True, 30),
    FeatureInfo("zip", False, 9),
)
SINGLE_ONLY = tuple(f for f in FEATURES if not f.multi)


def _batch(model: EmbeddingRecommender, n: int, seed: int = 0):
    """Random single-valued indices in the model's layout, bags of 1..3 values, 0/1 labels."""
    g = torch.Generator().manual_seed(seed)
    card = {f.name: f.cardinality for f in model.features}
    single = torch.stack([torch.randint(0, card[name], (n,), generator=g) for name in model.single_order], 1)
    single = single if model.single_order else torch.zeros(n, 0, dtype=torch.int64)
    bags = []
    for name in model.bag_order:
        lengths = torch.randint(1, 4, (n,), generator=g)
        offsets = torch.zeros(n + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        bags.append((torch.randint(0, card[name], (int(offsets[-1]),), generator=g), offsets, lengths))
    y = torch.randint(0, 2, (n,), generator=g).to(torch.float64)
    return single, bags, y


def _backprop_inputs(model: EmbeddingRecommender, single, bags):
    idx = [(single[:, a:b] + base).reshape(-1) for a, b, base in model.group_layout()]
    n = len(single)
    extra = [
        (values, offsets[:-1], torch.repeat_interleave(torch.arange(n), lengths),
         torch.repeat_interleave(1.0 / lengths.to(torch.float64), lengths))
        for values, offsets, lengths in bags
    ]
    return idx, extra


def test_model_forward_shapes_with_single_and_multi_valued_features():
    model = EmbeddingRecommender(FEATURES, {"user": 8, "item": 8, "genre": 4, "tags": 3, "zip": 2}, (16, 8))
    single, bags, _ = _batch(model, 7)
    out = model(single, [(v, o[:-1]) for v, o, _ in bags])
    assert out.shape == (7,)
    assert torch.isfinite(out).all()


def test_model_fuses_single_valued_features_of_equal_dim():
    model = EmbeddingRecommender(FEATURES, {"user": 8, "item": 8, "genre": 4, "tags": 3, "zip": 8}, ())
    assert len(model.groups) == 2  # dim 8 (user, item, zip) and dim 4 (genre)
    assert model.groups[1].weight.shape == (50 + 40 + 9, 8)
    assert len(model.bags) == 1


def test_model_table_is_a_view_of_each_feature_rows():
    model = EmbeddingRecommender(FEATURES, {"user": 8, "item": 8, "genre": 4, "tags": 3, "zip": 8}, (4,))
    for f in FEATURES:
        assert model.table(f.name).shape == (f.cardinality, model.dims[f.name])
    with torch.no_grad():
        model.table("item")[5] = 7.0
    fused = model.groups[1].weight
    assert (fused == 7.0).all(dim=1).nonzero().flatten().tolist() == [50 + 5]  # item's row 5 sits after user's rows
    single = torch.zeros(1, 4, dtype=torch.int64)
    single[0, model.single_order.index("item")] = 5
    before = model(single, [(torch.tensor([0]), torch.tensor([0]))])
    with torch.no_grad():
        model.table("item")[5] = -7.0
    assert model(single, [(torch.tensor([0]), torch.tensor([0]))]) != before


@pytest.mark.parametrize(
    "features, dims",
    [
        (SINGLE_ONLY, {"user": 6, "item": 6, "genre": 6, "zip": 6}),  # one table fills the input
        (SINGLE_ONLY, {"user": 5, "item": 5, "genre": 5, "zip": 5}),  # one table, input padded from 20 to 24 columns
        (SINGLE_ONLY, {"user": 8, "item": 8, "genre": 4, "zip": 2}),  # a shared table among one-feature tables
        (FEATURES, {"user": 5, "item": 5, "genre": 5, "tags": 5, "zip": 5}),  # one table plus a bag
        (FEATURES, {"user": 8, "item": 3, "genre": 4, "tags": 2, "zip": 8}),
    ],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_backprop_gradients_equal_autograd(features, dims, sparse):
    torch.manual_seed(0)
    model = EmbeddingRecommender(features, dims, (16, 8)).double()
    single, bags, y = _batch(model, 37)
    loss = nn.functional.binary_cross_entropy_with_logits(model(single, [(v, o[:-1]) for v, o, _ in bags]), y)
    loss.backward()
    bp = Backprop(model, batch_size=64, sparse=sparse)  # a partial batch: 37 of 64 rows
    logits = torch.empty(37, 1, dtype=torch.float64)
    bp.step(*_backprop_inputs(model, single, bags), y, logits)
    assert torch.allclose(nn.functional.binary_cross_entropy_with_logits(logits.view(-1), y), loss)
    for grad, p in zip(bp.grads, model.dense_parameters()):
        assert torch.allclose(grad, p.grad)
    for k, table in enumerate(model.embedding_parameters()):
        expected = table.grad.to_dense()
        if sparse:
            rows, rows_grad = bp.table_grads[k]
            got = torch.zeros_like(expected).index_copy_(0, rows, rows_grad)
            assert len(rows) == len(torch.unique(rows))
        else:
            got = bp.table_grads[k]
        assert torch.allclose(got, expected)


def test_backprop_gradients_equal_autograd_with_dropout():
    torch.manual_seed(0)
    dims = {"user": 4, "item": 4, "genre": 2, "tags": 3, "zip": 4}
    model = EmbeddingRecommender(FEATURES, dims, (16, 8), dropout=0.5).double()
    single, bags, y = _batch(model, 20)
    bp = Backprop(model, 32, generator=torch.Generator().manual_seed(1))
    bp.step(*_backprop_inputs(model, single, bags), y)
    # replay Backprop's own dropout masks in autograd's forward
    dropouts = [m for m in model.mlp if isinstance(m, nn.Dropout)]
    for layer, mask in zip(dropouts, bp.masks):
        layer.register_forward_hook(lambda mod, inp, out, mask=mask: inp[0] * mask[:20])
    loss = nn.functional.binary_cross_entropy_with_logits(model(single, [(v, o[:-1]) for v, o, _ in bags]), y)
    loss.backward()
    assert all(torch.allclose(g, p.grad) for g, p in zip(bp.grads, model.dense_parameters()))
    assert all(torch.allclose(g, t.grad) for g, t in zip(bp.table_grads, model.embedding_parameters()))
    assert 0.3 < (bp.masks[0][:20] == 0).double().mean() < 0.7


def test_validate_dims_refuses_bad_input_with_the_value_and_the_rule():
    feats = SINGLE_ONLY[:2]
    with pytest.raises(ValueError, match="dim for 'user' is 0, but must be >= 1"):
        validate_dims(feats, {"user": 0, "item": 4})
    with pytest.raises(ValueError, match="dim for 'user' is True"):
        validate_dims(feats, {"user": True, "item": 4})
    with pytest.raises(ValueError, match="unknown feature 'nope'"):
        validate_dims(feats, {"user": 2, "item": 4, "nope": 1})
    with pytest.raises(ValueError, match="no dim given for feature 'item'"):
        validate_dims(feats, {"user": 2})
    assert validate_dims(feats, {"item": 3, "user": 2}) == {"user": 2, "item": 3}


@pytest.mark.parametrize(
    "kwargs, message", [({"dropout": 1.0}, "dropout is 1.0"), ({"hidden": (8, 0)}, "hidden width 0")]
)
def test_model_refuses_bad_dropout_and_hidden(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingRecommender(SINGLE_ONLY, {"user": 2, "item": 2, "genre": 2, "zip": 2}, **kwargs)


def _first_layer_columns(model: EmbeddingRecommender) -> dict[str, torch.Tensor]:
    cols, col = {}, 0
    for name in (*model.single_order, *model.bag_order):
        cols[name] = model.linears()[0].weight[:, col : col + model.dims[name]]
        col += model.dims[name]
    return cols


def test_init_changing_one_dim_keeps_every_other_features_draws():
    dims = {"user": 8, "item": 8, "genre": 4, "tags": 4, "zip": 2}
    torch.manual_seed(3)
    a = EmbeddingRecommender(FEATURES, dims)
    torch.manual_seed(3)
    b = EmbeddingRecommender(FEATURES, {**dims, "user": 4})  # also moves user out of item's fused table
    torch.manual_seed(4)
    c = EmbeddingRecommender(FEATURES, dims)
    scale = (sum(dims.values()) / (sum(dims.values()) - 4)) ** 0.5  # first-layer bound 1/sqrt(fan_in)
    ca, cb = _first_layer_columns(a), _first_layer_columns(b)
    for f in ("item", "genre", "tags", "zip"):
        assert torch.equal(a.table(f), b.table(f))
        assert torch.allclose(cb[f], ca[f] * scale, atol=1e-6)
        assert not torch.equal(a.table(f), c.table(f))  # the global seed still decides
    assert torch.equal(a.table("user")[:, :4], b.table("user"))  # the same stream, the first columns
    assert torch.allclose(cb["user"], ca["user"][:, :4] * scale, atol=1e-6)
    for la, lb in zip(a.linears()[1:], b.linears()[1:]):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.bias, lb.bias)


def test_init_distributions_are_the_usual_ones():
    torch.manual_seed(0)
    model = EmbeddingRecommender((FeatureInfo("u", False, 20_000), FeatureInfo("i", False, 500)), {"u": 16, "i": 32})
    assert model.table("u").std().item() == pytest.approx(0.05, rel=0.02)
    assert abs(model.table("u").mean().item()) < 0.002
    for layer in model.linears():
        bound = layer.in_features ** -0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert layer.bias.abs().max() <= bound
