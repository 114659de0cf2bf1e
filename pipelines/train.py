"""The trainer: a plain function the search calls once per trial, reporting once per epoch.

Speed comes from holding every split as tensors and batching by slicing a once-per-epoch permuted copy: there is no
per-row ``Dataset.__getitem__`` and no collate step.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from .dataset import EncodedDataset
from .encode import Encoded
from .model import EmbeddingRecommender, ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-3  # Adam learning rate
    batch_size: int = 1024
    max_epochs: int = 10
    patience: int = 3  # stop after this many epochs without a better val AUC (0 = never)
    weight_decay: float = 0.0  # on the MLP only
    sparse: bool = False  # sparse embedding gradients + SparseAdam: pays off for tables of ~1M rows
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}, but must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr is {self.lr}, but must be > 0")
        if self.patience < 0:
            raise ValueError(f"patience is {self.patience}, but must be >= 0")


@dataclass
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    val_auc: float
    val_logloss: float
    best_val_auc: float
    seconds: float  # training time of this epoch (excluding evaluation)
    samples_per_s: float


@dataclass
class TrainResult:
    model: EmbeddingRecommender
    history: list[EpochResult]
    best_epoch: int
    best_val_auc: float
    best_val_logloss: float
    ended: str  # "max_epochs" | "converged" (patience ran out) | "stopped" (on_epoch asked to stop)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.history)


class SplitTensors:
    """A split as tensors in the model's input layout: (N, S) single-valued indices, bags, labels."""

    def __init__(self, split: Encoded, model: EmbeddingRecommender, device: torch.device):
        cols = [split.columns[name].values for name in model.single_order]
        single = np.stack(cols, axis=1) if cols else np.zeros((len(split), 0), dtype=np.int32)
        self.single = torch.from_numpy(single.astype(np.int64)).to(device)
        self.bags = [
            (
                torch.from_numpy(split.columns[n].values.astype(np.int64)).to(device),
                torch.from_numpy(split.columns[n].offsets).to(device),
            )
            for n in model.bag_order
        ]
        self.label = torch.from_numpy(split.label).to(device)

    def __len__(self) -> int:
        return len(self.label)

    def permuted(self, perm: torch.Tensor) -> SplitTensors:
        out = object.__new__(SplitTensors)
        out.single, out.label = self.single[perm], self.label[perm]
        out.bags = [_permute_bag(v, o, perm) for v, o in self.bags]
        return out

    def batches(self, size: int):
        """Contiguous slices (views) of ``size`` rows."""
        n = len(self)
        for a in range(0, n, size):
            b = min(a + size, n)
            bags = [(v[o[a] : o[b]], o[a:b] - o[a]) for v, o in self.bags]
            yield self.single[a:b], bags, self.label[a:b]


def _permute_bag(values: torch.Tensor, offsets: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    starts, lengths = offsets[:-1][perm], (offsets[1:] - offsets[:-1])[perm]
    new = torch.zeros(len(perm) + 1, dtype=offsets.dtype, device=offsets.device)
    torch.cumsum(lengths, 0, out=new[1:])
    flat = torch.repeat_interleave(starts - new[:-1], lengths) + torch.arange(int(new[-1]), device=offsets.device)
    return values[flat], new


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(data_features, model_cfg: ModelConfig, sparse: bool = False) -> EmbeddingRecommender:
    return EmbeddingRecommender(data_features, model_cfg.dims, model_cfg.hidden, model_cfg.dropout, sparse=sparse)


def make_optimizers(model: EmbeddingRecommender, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    fused = {"fused": True} if _fused_ok(model) else {}
    if cfg.sparse:
        return [
            torch.optim.SparseAdam(model.embedding_parameters(), lr=cfg.lr),
            torch.optim.Adam(model.dense_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused),
        ]
    groups = [
        {"params": model.embedding_parameters(), "weight_decay": 0.0},
        {"params": model.dense_parameters(), "weight_decay": cfg.weight_decay},
    ]
    return [torch.optim.Adam(groups, lr=cfg.lr, **fused)]


def _fused_ok(model: nn.Module) -> bool:
    # fused Adam runs the whole update in one kernel per dtype/device; CPU support arrived in torch 2.4
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


@torch.inference_mode()
def predict(model: EmbeddingRecommender, tensors: SplitTensors, batch_size: int = 65536) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(s, b)) for s, b, _ in tensors.batches(batch_size)]
    model.train()
    return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate(model: EmbeddingRecommender, tensors: SplitTensors) -> tuple[float, float]:
    """(AUC, logloss) on a split; AUC is NaN when the split holds one class only."""
    p = predict(model, tensors)
    y = tensors.label.cpu().numpy()
    eps = 1e-7
    logloss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) if len(y) else math.nan
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan
    return auc, logloss


Snapshot = Callable[[], dict]


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data: EncodedDataset,
    on_epoch: Callable[[EpochResult, Snapshot], bool | None] | None = None,
    device: str | torch.device | None = None,
    resume: dict | None = None,
    train_on_val: bool = False,
) -> TrainResult:
    """Train one config; after each epoch call ``on_epoch(result, snapshot)``, which may return False to stop.

    ``snapshot()`` returns the state to checkpoint (model, optimizers, epoch, history, best); pass it back as
    ``resume`` to continue from that epoch. With ``train_on_val`` the validation rows join training (final
    production fit) and early stopping is off. The returned model holds the best epoch's weights.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    model = build_model(data.features, model_cfg, cfg.sparse).to(dev)
    optimizers = make_optimizers(model, cfg)
    train_split = data.train
    if train_on_val:
        train_split = _concat(data.train, data.val)
    tr = SplitTensors(train_split, model, dev)
    va = SplitTensors(data.val, model, dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = nn.BCEWithLogitsLoss()
    history: list[EpochResult] = []
    best = (-math.inf, math.nan, 0)  # (auc, logloss, epoch)
    best_state: dict | None = None
    if resume:
        model.load_state_dict(resume["model"])
        for opt, st in zip(optimizers, resume["optimizers"]):
            opt.load_state_dict(st)
        history = [EpochResult(**h) for h in resume["history"]]
        best = tuple(resume["best"])  # type: ignore[assignment]
        best_state = resume.get("best_model")
        gen.set_state(resume["generator"])

    def snapshot() -> dict:
        return {
            "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers],
            "history": [h.__dict__ for h in history],
            "best": list(best),
            "best_model": best_state,
            "generator": gen.get_state(),
        }

    started, ended = time.perf_counter(), "max_epochs"
    model.train()
    for epoch in range(len(history) + 1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(tr), generator=gen).to(dev)
        total, batches = torch.zeros((), device=dev), 0
        for single, bags, y in tr.permuted(perm).batches(cfg.batch_size):
            loss = loss_fn(model(single, bags), y)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            total += loss.detach()
            batches += 1
        seconds = time.perf_counter() - t0
        train_loss = float(total) / max(batches, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} at epoch {epoch}; lower the learning rate")
        auc, logloss = evaluate(model, va)
        improved = auc > best[0]
        if improved:
            best = (auc, logloss, epoch)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = EpochResult(epoch, train_loss, auc, logloss, best[0], seconds, len(tr) / seconds)
        history.append(result)
        log.debug("epoch %d: loss %.4f val_auc %.4f", epoch, train_loss, auc)
        if on_epoch is not None and on_epoch(result, snapshot) is False:
            ended = "stopped"
            break
        if not train_on_val and cfg.patience and epoch - best[2] >= cfg.patience:
            ended = "converged"
            break
    if best_state is not None and not train_on_val:
        model.load_state_dict(best_state)
    return TrainResult(model, history, best[2], best[0], best[1], ended, time.perf_counter() - started)


def _concat(a: Encoded, b: Encoded) -> Encoded:
    from .encode import Column

    cols = {}
    for name, ca in a.columns.items():
        cb = b.columns[name]
        if ca.offsets is None:
            cols[name] = Column(np.concatenate([ca.values, cb.values]))
        else:
            cols[name] = Column(
                np.concatenate([ca.values, cb.values]), np.concatenate([ca.offsets, cb.offsets[1:] + ca.offsets[-1]])
            )
    return Encoded(cols, np.concatenate([a.label, b.label]))
