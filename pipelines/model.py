"""The embedding recommender: per-feature embeddings -> concat -> MLP -> one logit ("liked").

The seed's BookRecommendationModel (user, book, genre embeddings -> MLP) is the case of three single-valued features.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from .dataset import FeatureInfo


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
        self.features = tuple(features)
        self.dims = validate_dims(self.features, dict(dims))
        self.hidden = tuple(int(h) for h in hidden)
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
            self.groups.append(nn.Embedding(start, d, sparse=sparse))
            self.register_buffer(f"base{len(self.groups) - 1}", torch.tensor(base, dtype=torch.int64), persistent=False)
            self._slices.append((col, col + len(group)))
            col += len(group)
        self.bag_order = [f.name for f in self.features if f.multi]
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(f.cardinality, self.dims[f.name], mode="mean", sparse=sparse)
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
        for table in (*self.groups, *self.bags):
            nn.init.normal_(table.weight, std=0.05)

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
