"""The embedding recommender: per-feature embeddings -> concat -> MLP -> one logit ("liked").

The seed's BookRecommendationModel (user, book, genre embeddings -> MLP) is the case of three single-valued features.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .dataset import FeatureInfo
from .memory import check_fits


@dataclass(frozen=True)
class ModelConfig:
    dims: Mapping[str, int]  # embedding dim per feature
    hidden: tuple[int, ...] = (64, 32)  # MLP widths after the concatenated embeddings
    dropout: float = 0.0  # after each hidden layer


def validate_dims(features: Sequence[FeatureInfo], dims: Mapping[str, object]) -> dict[str, int]:
    """Check user-given dims at the edge: known features, integers >= 1."""
    names = {f.name for f in features}
    for name, d in dims.items():
        if name not in names:
            raise ValueError(f"dim given for unknown feature '{name}'; known features: {', '.join(sorted(names))}")
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"dim for '{name}' is {d!r}, but must be an integer >= 1")
        if d < 1:
            raise ValueError(f"dim for '{name}' is {d}, but must be >= 1")
    missing = names - set(dims)
    if missing:
        raise ValueError(f"no dim given for feature '{sorted(missing)[0]}'; give one for every feature")
    return {f.name: int(dims[f.name]) for f in features}


class EmbeddingRecommender(nn.Module):
    """One table per feature; single-valued features of equal dim share one fused table for a single lookup.

    Fusing is a layout choice only: the fused table is the row-wise concatenation of the per-feature tables, so
    parameter counts (and ``pipelines.memory``) are unchanged. ``table(name)`` returns a feature's own rows.
    Inputs: ``single`` is (B, S) int indices in ``single_order``; ``bags`` is one (values, offsets) per multi-valued
    feature in ``bag_order``.
    """

    def __init__(
        self,
        features: Sequence[FeatureInfo],
        dims: Mapping[str, int],
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.0,
        sparse: bool = False,
    ):
        super().__init__()
        key = int(torch.randint(0, 2**31 - 1, (1,)))  # first, before the modules' own inits use the global stream
        self.features = tuple(features)
        self.dims = validate_dims(self.features, dict(dims))
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout = float(dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout is {dropout}, but must be in [0, 1)")
        for h in self.hidden:
            if h < 1:
                raise ValueError(f"hidden width {h} in {self.hidden} must be >= 1")
        check_fits(self.features, self.dims, self.hidden)  # before the tables are allocated
        single = [f for f in self.features if not f.multi]
        by_dim: dict[int, list[FeatureInfo]] = {}
        for f in single:
            by_dim.setdefault(self.dims[f.name], []).append(f)
        self.single_order = [f.name for d in sorted(by_dim) for f in by_dim[d]]
        self.groups = nn.ModuleList()
        self._slices: list[tuple[int, int]] = []  # columns of ``single`` each group reads
        self._rows: dict[str, tuple[int, int, int]] = {}  # feature -> (group, first row, rows)
        col = 0
        for d in sorted(by_dim):
            group = by_dim[d]
            base, start = [], 0
            for f in group:
                self._rows[f.name] = (len(self.groups), start, f.cardinality)
                base.append(start)
                start += f.cardinality
            # ``_weight``: no default init, ``_init_per_feature`` draws every table
            self.groups.append(nn.Embedding(start, d, sparse=sparse, _weight=torch.empty(start, d)))
            self.register_buffer(f"base{len(self.groups) - 1}", torch.tensor(base, dtype=torch.int64), persistent=False)
            self._slices.append((col, col + len(group)))
            col += len(group)
        self.bag_order = [f.name for f in self.features if f.multi]
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(f.cardinality, self.dims[f.name], mode="mean", sparse=sparse,
                            _weight=torch.empty(f.cardinality, self.dims[f.name]))
            for f in self.features
            if f.multi
        )
        layers: list[nn.Module] = []
        width = sum(self.dims.values())
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self._init_per_feature(key)

    @torch.no_grad()
    def _init_per_feature(self, key: int) -> None:
        """Draw each feature's parameters from its own stream, keyed by the feature's name.

        The distributions are the usual ones (tables N(0, 0.05^2); Linear layers U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        as ``nn.Linear`` draws them), but under the same ``torch.manual_seed`` two configs that differ in one feature's
        dim start from the same rows for every other feature, the same first-layer columns for every feature (scaled
        by the new fan-in) and the same deeper layers. Drawn in one global stream, changing one dim would shift every
        draw after it, so trials of a search, or a config and its one-dim-halved neighbour in ``embsize confirm
        --refine``, would also differ by an unrelated fresh init: on the planted synthetic set that doubled the
        seed-to-seed spread of their AUC difference. ``key``, the global stream's first draw in ``__init__``, keys
        all the streams, so ``torch.manual_seed`` still sets everything.
        """

        def stream(name: str) -> torch.Generator:
            return torch.Generator().manual_seed(key * 1_000_003 + zlib.crc32(name.encode()))

        # one stream per column, so that a smaller dim of a feature starts from the first columns of a larger one
        # (torch's normal_ fills in blocks, so one stream over a whole table would depend on its size)
        for f in self.features:
            t = self.table(f.name)
            columns = torch.empty(t.shape[1], t.shape[0])  # drawn contiguous: 10x faster than into t's strided columns
            for j in range(t.shape[1]):
                columns[j].normal_(0.0, 0.05, generator=stream(f"table:{f.name}:{j}"))
            t.copy_(columns.t())
        linears, col = self.linears(), 0
        first, bound = linears[0], 1.0 / math.sqrt(linears[0].in_features)
        for name in (*self.single_order, *self.bag_order):  # the order of the first layer's input columns
            for j in range(self.dims[name]):
                first.weight[:, col + j].uniform_(-bound, bound, generator=stream(f"w0:{name}:{j}"))
            col += self.dims[name]
        first.bias.uniform_(-bound, bound, generator=stream("b0"))
        for i, layer in enumerate(linears[1:], 1):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=stream(f"w{i}"))
            layer.bias.uniform_(-bound, bound, generator=stream(f"b{i}"))

    def forward(self, single: torch.Tensor, bags: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor:
        parts = []
        for g, (table, (a, b)) in enumerate(zip(self.groups, self._slices)):
            idx = single[:, a:b] + getattr(self, f"base{g}")
            parts.append(table(idx).flatten(1))
        for bag, (values, offsets) in zip(self.bags, bags):
            parts.append(bag(values, offsets))
        return self.mlp(torch.cat(parts, 1)).squeeze(1)

    def table(self, name: str) -> torch.Tensor:
        """The embedding rows of feature ``name`` (a view into its fused table)."""
        if name in self._rows:
            g, start, rows = self._rows[name]
            return self.groups[g].weight[start : start + rows]
        return self.bags[self.bag_order.index(name)].weight

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.mlp.parameters())

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in (*self.groups, *self.bags)]

    def group_layout(self) -> list[tuple[int, int, torch.Tensor]]:
        """Per fused table: the columns of ``single`` it reads and the row offset of each of those features."""
        return [(a, b, getattr(self, f"base{g}")) for g, (a, b) in enumerate(self._slices)]

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.mlp if isinstance(m, nn.Linear)]


class Backprop:
    """One training step's forward and backward of an EmbeddingRecommender, derived by hand into reused buffers.

    Hand-written rather than autograd because at recommender sizes (~0.7 ms of matmuls per 1024-row batch on one
    core) autograd's graph bookkeeping, ``embedding_dense_backward`` and per-step allocations cost as much again as
    the arithmetic; ``tests/pipelines/test_model.py`` checks these gradients against autograd's. The math is the
    model's ``forward`` in training mode and the gradient of the batch's mean binary cross-entropy on the logit.

    ``step`` fills ``grads`` (per tensor of ``params``, the MLP's weights and biases) and ``table_grads`` (per table
    of ``tables``, in ``model.embedding_parameters()`` order): with ``sparse=False`` a full-size gradient; with
    ``sparse=True`` a pair (touched rows, their gradient rows), so the update can skip a large table's other rows.
    """

    def __init__(self, model: EmbeddingRecommender, batch_size: int, sparse: bool = False, generator=None):
        p = next(model.parameters())
        new = lambda *shape: torch.empty(*shape, dtype=p.dtype, device=p.device)  # noqa: E731
        self.sparse, self.dropout, self.generator = sparse, model.dropout, generator
        self.layers = [(m.weight.detach(), m.bias.detach()) for m in model.linears()]
        self.transposed = [w.t() for w, _ in self.layers]  # views: they follow in-place updates
        self.params = [t for wb in self.layers for t in wb]
        self.grads = [new(*t.shape) for t in self.params]
        self.tables = [t.detach() for t in model.embedding_parameters()]
        # dense table gradients share one buffer: one zero_() per step instead of one per table
        self.flat_grad = new(0 if sparse else sum(t.numel() for t in self.tables))
        self.table_grads: list = [None] * len(self.tables)
        start = 0
        for k, t in enumerate(self.tables):
            if not sparse:
                self.table_grads[k] = self.flat_grad[start : start + t.numel()].view_as(t)
                start += t.numel()
        self.group_cols, col = [], 0  # (first column in x, features, dim) per fused table
        for (a, b), table in zip(model._slices, model.groups):
            self.group_cols.append((col, b - a, table.embedding_dim))
            col += (b - a) * table.embedding_dim
        self.bag_cols = []
        for bag in model.bags:
            self.bag_cols.append((col, bag.embedding_dim))
            col += bag.embedding_dim
        # MKL's GEMM takes ~20% longer per column when a width is not a multiple of 8 (measured on AVX2; dims are
        # free choices of the search): x gets zero columns up to one, and the first layer a zero-padded weight copy
        self.width, padded = col, -(-col // 8) * 8
        self.x, self.gx = torch.zeros(batch_size, padded, dtype=p.dtype, device=p.device), new(batch_size, padded)
        w0 = self.layers[0][0]
        self.w0 = w0 if padded == col else torch.zeros(w0.shape[0], padded, dtype=p.dtype, device=p.device)
        self.weights = [self.w0, *(w for w, _ in self.layers[1:])]  # what each layer multiplies by
        self.transposed[0] = self.w0.t()
        self.weight_grads = [new(*self.w0.shape) if padded != col else self.grads[0], *self.grads[2::2]]
        # a table serving several features (but not all of x) looks up (rows x features, dim) here, then moves it
        self.parts = [new(batch_size * f * d) if 1 < f and f * d < padded else None for _, f, d in self.group_cols]
        self.h = [new(batch_size, w) for w in model.hidden]
        self.gh = [new(batch_size, w) for w in model.hidden]
        self.masks = [new(batch_size, w) for w in model.hidden] if self.dropout > 0 else []
        self.z, self.gz = new(batch_size, 1), new(batch_size, 1)
        self._views: dict[int, dict] = {}
        # C row loops for the lookups and their gradients (``native``; float32 on the CPU), else torch's index ops
        self.native = None
        if p.device.type == "cpu" and p.dtype == torch.float32:
            from .native import kernels

            self.native = kernels()

    @torch.no_grad()
    def step(
        self,
        idx: Sequence[torch.Tensor],
        bags: Sequence[tuple[torch.Tensor, ...]],
        y: torch.Tensor,
        logits: torch.Tensor | None = None,
    ) -> None:
        """One batch of ``n`` rows. ``idx``: per fused table the (n x features,) row ids, row-major, feature offsets
        added; ``bags``: per bag feature (values, offsets from 0, batch row of each value, 1/bag length of each
        value); ``y``: (n,) labels; ``logits``: optional (n, 1) buffer that receives the logits (the loss is left to
        the caller: computed once per epoch over all logits, it costs one op instead of ten per step)."""
        n = len(y)
        v = self._views.get(n) or self._make_views(n)
        if self.w0 is not self.layers[0][0]:
            self.w0[:, : self.width].copy_(self.layers[0][0])
        if self.native is not None:  # each table's rows straight into its block of x's columns
            for table, rows, block, (_, f, _) in zip(self.tables, idx, v["x_blocks"], self.group_cols):
                self.native.gather(table, rows, block, f)
        else:
            for table, rows, (out, into) in zip(self.tables, idx, v["lookup"]):
                torch.index_select(table, 0, rows, out=out)
                if into is not None:
                    into.copy_(out.view(into.shape))
        for table, (values, offsets, _, _), into in zip(self.tables[len(idx) :], bags, v["bag_x"]):
            if self.native is not None:
                self.native.bag_mean(table, values, offsets, into)
            else:
                into.copy_(nn.functional.embedding_bag(values, table, offsets, mode="mean"))
        a = v["x"]
        for (_, b), wt, h, mask in zip(self.layers, self.transposed, v["h"], v["masks"]):
            torch.addmm(b, a, wt, out=h)
            h.relu_()
            if mask is not None:
                mask.bernoulli_(1 - self.dropout, generator=self.generator).div_(1 - self.dropout)
                h.mul_(mask)
            a = h
        z, g = (v["z"] if logits is None else logits), v["gz"]
        torch.addmm(self.layers[-1][1], a, self.transposed[-1], out=z)
        torch.sigmoid(z, out=g)
        g.view(-1).sub_(y).div_(n)  # d(mean BCE)/d(logit)
        for i in reversed(range(len(self.layers))):
            a, prev = v["inputs"][i], v["input_grads"][i]
            torch.mm(v["output_grads_t"][i], a, out=self.weight_grads[i])
            torch.sum(g, 0, out=self.grads[2 * i + 1])
            torch.mm(g, self.weights[i], out=prev)
            if i > 0:
                if self.dropout > 0:
                    prev.mul_(v["masks"][i - 1])
                # ReLU backward in place (where dropout zeroed a unit, its gradient is zero already)
                torch.ops.aten.threshold_backward.grad_input(prev, a, 0, grad_input=prev)
            g = prev
        if self.weight_grads[0] is not self.grads[0]:
            self.grads[0].copy_(self.weight_grads[0][:, : self.width])
        if not self.sparse:
            self.flat_grad.zero_()
        if self.native is not None and not self.sparse:  # each table's block of gx's columns added in place
            for k, (rows, block, (_, f, _)) in enumerate(zip(idx, v["gx_blocks"], self.group_cols)):
                self.native.scatter_add(self.table_grads[k], rows, block, f)
        else:
            for k, (rows, (src, source)) in enumerate(zip(idx, v["table_src"])):
                if source is not None:  # the (now free) lookup buffer gathers the table's columns of gx
                    src.view(source.shape).copy_(source)
                self._accumulate(k, rows, src)
        for j, ((values, offsets, value_rows, weight), source) in enumerate(zip(bags, v["bag_gx"])):
            if self.native is not None and not self.sparse:
                self.native.bag_mean_scatter_add(self.table_grads[len(idx) + j], values, offsets, source)
                continue
            src = source.index_select(0, value_rows).mul_(weight[:, None])  # mean: 1/len per value
            self._accumulate(len(idx) + j, values, src)

    def _make_views(self, n: int) -> dict:
        """Every buffer slice a batch of ``n`` rows uses, made once (slicing per step costs ~60 us of overhead)."""
        x, gx = self.x[:n], self.gx[:n]
        h, gh = [t[:n] for t in self.h], [t[:n] for t in self.gh]
        v: dict = {"x": x, "h": h, "z": self.z[:n], "gz": self.gz[:n], "inputs": [x, *h], "input_grads": [gx, *gh]}
        v["output_grads_t"] = [t.t() for t in (*gh, self.gz[:n])]
        v["masks"] = [m[:n] for m in self.masks] if self.masks else [None] * len(self.h)
        v["lookup"], v["table_src"] = [], []
        for (c, f, d), part in zip(self.group_cols, self.parts):
            if f == 1:  # x's own strided columns: index_select and index_add_ take them as they are
                v["lookup"].append((x[:, c : c + d], None))
                v["table_src"].append((gx[:, c : c + d], None))
            elif part is None:  # the table fills x
                v["lookup"].append((x.view(n * f, d), None))
                v["table_src"].append((gx.view(n * f, d), None))
            else:
                buf = part[: n * f * d].view(n * f, d)
                v["lookup"].append((buf, x[:, c : c + f * d]))
                v["table_src"].append((buf, gx[:, c : c + f * d]))
        v["x_blocks"] = [x[:, c : c + f * d] for c, f, d in self.group_cols]
        v["gx_blocks"] = [gx[:, c : c + f * d] for c, f, d in self.group_cols]
        v["bag_x"] = [x[:, c : c + d] for c, d in self.bag_cols]
        v["bag_gx"] = [gx[:, c : c + d] for c, d in self.bag_cols]
        self._views[n] = v
        return v

    def _accumulate(self, k: int, rows: torch.Tensor, src: torch.Tensor) -> None:
        if not self.sparse:
            self.table_grads[k].index_add_(0, rows, src)
            return
        touched, inverse = torch.unique(rows, return_inverse=True)
        grad = torch.zeros(len(touched), src.shape[1], dtype=src.dtype, device=src.device)
        self.table_grads[k] = (touched.long(), grad.index_add_(0, inverse, src))  # index_copy_ takes int64 only
