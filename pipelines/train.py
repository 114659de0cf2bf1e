"""The trainer: a plain function the search calls once per trial, reporting once per epoch.

Where the speed comes from (``benchmarks/throughput.py`` measures it against a standard DataLoader loop):
every split is held as tensors and batched by slicing chunks gathered in a once-per-epoch permutation (no per-row
``Dataset.__getitem__``, no collate, no copy of the dataset per trial); the step is ``model.Backprop``'s
hand-derived forward/backward into reused buffers (no autograd graph, one fused lookup per embedding dim, the
lookups and their gradient sums as C row loops where a compiler is at hand: ``native``); the update is one fused Adam
kernel call; the training loss is computed once per chunk of batches from the logits each
step left behind.
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .dataset import EncodedDataset
from .encode import Column, Encoded
from .model import Backprop, EmbeddingRecommender, ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-3  # Adam learning rate
    batch_size: int = 1024
    max_epochs: int = 10
    patience: int = 3  # stop after this many epochs without a better val AUC (0 = never)
    weight_decay: float = 0.0  # on the MLP only
    sparse: bool = False  # update only the embedding rows a batch touches (lazy Adam): pays off for ~1M-row tables
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
        if self.threads is not None and self.threads < 1:  # torch.set_num_threads raises a bare RuntimeError
            raise ValueError(f"threads is {self.threads}, but must be >= 1")


@dataclass
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    val_auc: float
    val_logloss: float
    best_val_auc: float
    seconds: float  # training time of this epoch (excluding evaluation)
    samples_per_s: float
    cpu_seconds: float = 0.0  # process CPU time of the same span: unlike ``seconds``, blind to waiting for a core


@dataclass
class TrainResult:
    model: EmbeddingRecommender
    history: list[EpochResult]
    best_epoch: int
    best_val_auc: float
    best_val_logloss: float
    ended: str  # "max_epochs" | "converged" (patience ran out) | "stopped" (on_epoch or should_stop asked to stop)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.history)


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``; on the CPU a zero-copy view. A search's arrays are read-only pages of Ray's
    object store, shared by every trial on the node: nothing here writes to them, and copying them per trial would
    multiply the dataset's memory by the trials running at once."""
    with warnings.catch_warnings():  # on a read-only array torch warns that writing would be undefined; nothing writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(device)


class SplitTensors:
    """A split as tensors in the model's input layout: (N, S) single-valued indices (int32), bags, labels."""

    def __init__(self, split: Encoded, model: EmbeddingRecommender, device: torch.device):
        cols = [split.columns[name].values for name in model.single_order]
        single = np.stack(cols, axis=1) if cols else np.zeros((len(split), 0), dtype=np.int32)
        self.single = torch.from_numpy(single).to(device)
        self.bags = [  # int64 values like the offsets: older torch's embedding_bag wants one index dtype
            (_tensor(split.columns[n].values, device).to(torch.int64), _tensor(split.columns[n].offsets, device))
            for n in model.bag_order
        ]
        self.label = _tensor(split.label, device)

    def __len__(self) -> int:
        return len(self.label)

    def permuted(self, perm: torch.Tensor) -> SplitTensors:
        out = object.__new__(SplitTensors)
        out.single, out.label = self.single.index_select(0, perm), self.label.index_select(0, perm)
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
    # index_select, not t[perm]: advanced indexing is ~15x slower on CPU
    starts, lengths = offsets[:-1].index_select(0, perm), (offsets[1:] - offsets[:-1]).index_select(0, perm)
    new = torch.zeros(len(perm) + 1, dtype=offsets.dtype, device=offsets.device)
    torch.cumsum(lengths, 0, out=new[1:])
    flat = torch.repeat_interleave(starts - new[:-1], lengths) + torch.arange(int(new[-1]), device=offsets.device)
    return values.index_select(0, flat), new


class TrainBatches:
    """The training split in ``Backprop``'s input layout, gathered in permutation order one chunk at a time.

    The encoded int32 columns are read where they are (``_tensor``: in a search, the object store's shared pages),
    never copied whole: each epoch gathers ``chunk_rows`` rows at a time, per fused table its row ids (feature
    offsets added) and per bag feature the batch row and 1/length of every value, and slices batches (views) out of
    that chunk. A trial's own memory is then O(chunk), not O(rows); a chunk of 64 batches keeps the gathers' per-op
    overhead off the steps.
    """

    def __init__(self, split: Encoded, model: EmbeddingRecommender, device: torch.device, chunk_rows: int = 1 << 16):
        self.tables = [
            ([_tensor(split.columns[n].values, device) for n in model.single_order[a:b]], base.to(device))
            for a, b, base in model.group_layout()
        ]
        self.bags = [
            (_tensor(split.columns[n].values, device), _tensor(split.columns[n].offsets, device))
            for n in model.bag_order
        ]
        self.label = _tensor(split.label, device)
        self.chunk_rows = chunk_rows

    def __len__(self) -> int:
        return len(self.label)

    def epoch(self, perm: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, Iterator[tuple]]]:
        """The epoch in ``perm`` order, chunk by chunk: per chunk its labels, and its batches of ``size`` rows, each
        (row ids per table, bags, labels, the batch's slice of the chunk)."""
        chunk = max(1, self.chunk_rows // size) * size  # whole batches per chunk
        widths = [len(cols) for cols, _ in self.tables]
        for c in range(0, len(perm), chunk):
            p = perm[c : c + chunk]
            # flat, row-major (a batch is one slice), int64: index_add_ is ~4x slower with int32 row ids
            idx = [torch.stack([col.index_select(0, p) for col in cols], 1).to(torch.int64).add_(base).view(-1)
                   for cols, base in self.tables]
            bags = []
            for values, offsets in self.bags:
                values, offsets = _permute_bag(values, offsets, p)
                values = values.to(torch.int64)  # as above
                lengths = offsets[1:] - offsets[:-1]
                rows = torch.repeat_interleave(torch.arange(len(p), device=p.device), lengths)
                weight = torch.repeat_interleave(1.0 / lengths.to(torch.float32), lengths)
                bags.append((values, offsets, offsets.cpu().numpy(), rows, weight))  # host: slicing without a sync
            label = self.label.index_select(0, p)
            yield label, self._batches(idx, widths, bags, label, size)

    @staticmethod
    def _batches(idx, widths, bags, label, size):
        for a in range(0, len(label), size):
            b = min(a + size, len(label))
            batch_bags = []
            for values, offsets, host, rows, weight in bags:
                s, e = int(host[a]), int(host[b])
                batch_bags.append((values[s:e], offsets[a:b] - s, rows[s:e] - a, weight[s:e]))
            yield [t[a * w : b * w] for t, w in zip(idx, widths)], batch_bags, label[a:b], slice(a, b)


class Adam:
    """Adam over ``Backprop``'s gradients: dense tensors in one fused kernel call, sparse tables row by row.

    Not ``torch.optim.Adam``: its per-step Python bookkeeping (~90 us) is as long as the update of a 60k-parameter
    model itself, so we call the kernel it runs, ``torch._fused_adam_``, directly (or, where that kernel is missing,
    its functional form ``torch.optim.adam.adam``). Sparse tables follow ``torch.optim.SparseAdam``: only the rows
    a batch touched move, and only their moments decay.
    """

    def __init__(
        self, bp: Backprop, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
        fused: bool | None = None,
    ):
        self.bp, self.lr, self.betas, self.eps = bp, lr, betas, eps
        dense_tables = [] if bp.sparse else list(zip(bp.tables, bp.table_grads))
        mlp = list(zip(bp.params, bp.grads))
        # one kernel call when the tables and the MLP share hyper-parameters; else the MLP gets its weight decay
        groups = [(dense_tables + mlp, 0.0)] if weight_decay == 0 else [(dense_tables, 0.0), (mlp, weight_decay)]
        self.groups = [([p for p, _ in pairs], [g for _, g in pairs], wd) for pairs, wd in groups if pairs]
        dev = bp.x.device
        self.fused = _fused_adam_supported(dev) and bp.x.dtype == torch.float32 if fused is None else fused
        self.moments = [(_zeros(ps), _zeros(ps)) for ps, _, _ in self.groups]
        self.sparse_moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in bp.tables] if bp.sparse else []
        self.t = 0  # steps taken; every tensor steps together
        self._t = torch.zeros((), dtype=torch.float32, device=dev)  # the same count, where the fused kernel reads it

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        kw = dict(amsgrad=False, beta1=b1, beta2=b2, lr=self.lr, eps=self.eps, maximize=False)
        if self.fused:
            self._t.add_(1)
        for (params, grads, wd), (m, v) in zip(self.groups, self.moments):
            if self.fused:
                torch._fused_adam_(params, grads, m, v, [], [self._t] * len(params), weight_decay=wd, **kw)
            else:
                from torch.optim.adam import adam

                steps = [torch.tensor(float(self.t - 1)) for _ in params]  # adam() advances them by one
                adam(params, grads, m, v, [], steps, foreach=None, weight_decay=wd, **kw)
        for table, (m, v), (rows, grad) in zip(self.bp.tables, self.sparse_moments, self.bp.table_grads):
            self._rows(table, m, v, rows, grad)

    def _rows(self, table, m, v, rows, grad) -> None:
        b1, b2 = self.betas
        m_rows = m.index_select(0, rows).lerp_(grad, 1 - b1)  # index_select: advanced indexing is slower on CPU
        v_rows = v.index_select(0, rows).mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m.index_copy_(0, rows, m_rows)
        v.index_copy_(0, rows, v_rows)
        size = self.lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)  # SparseAdam's bias correction and eps
        table.index_add_(0, rows, m_rows.div_(v_rows.sqrt_().add_(self.eps)).mul_(-size))

    def state_dict(self, copied: bool = True) -> dict:
        state = {"moments": self.moments, "sparse": self.sparse_moments, "t": self.t}
        return copy.deepcopy(state) if copied else state

    def load_state_dict(self, state: dict) -> None:
        for mine, theirs in zip(_flat([self.moments, self.sparse_moments]), _flat([state["moments"], state["sparse"]])):
            mine.copy_(theirs)
        self.t = int(state["t"])
        self._t.fill_(self.t)


def _zeros(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) for t in tensors]


def _fused_adam_supported(device: torch.device) -> bool:
    if not hasattr(torch, "_fused_adam_"):
        return False
    return device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= "2.4")  # CPU kernel since 2.4


def _flat(nested) -> list[torch.Tensor]:
    if isinstance(nested, torch.Tensor):
        return [nested]
    return [t for item in nested for t in _flat(item)]


# From here dense Adam spends most of each step on the rows the batch did not touch. Measured (1 thread, 400k rows,
# the table at 16 dims): sparse vs dense 1.06x at 30k rows, 1.55x at 100k, 2.9x at 300k; ~30x at 665k x 29 dims.
SPARSE_HINT_ROWS = 100_000


def sparse_hint(features) -> str | None:
    """A note for a run with dense gradients on a table of ``SPARSE_HINT_ROWS`` rows or more, else None."""
    big = max(features, key=lambda f: f.cardinality, default=None)
    if big is None or big.cardinality < SPARSE_HINT_ROWS:
        return None
    return (f"note: feature '{big.name}' has {big.cardinality:,} categories, and dense Adam updates every row of its "
            f"table at every step; --sparse updates only the rows a batch touches (lazy Adam), several times faster "
            f"on a table this large (it learns a little differently: compare on a short run)")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(data_features, model_cfg: ModelConfig, sparse: bool = False) -> EmbeddingRecommender:
    return EmbeddingRecommender(data_features, model_cfg.dims, model_cfg.hidden, model_cfg.dropout, sparse=sparse)


@torch.inference_mode()
def predict(model: EmbeddingRecommender, tensors: SplitTensors, batch_size: int = 16384) -> np.ndarray:
    was_training = model.training
    if was_training:  # eval()/train() walk every module: a fifth of a one-row request's time, for a no-op
        model.eval()
    out = [torch.sigmoid(model(s, b)) for s, b, _ in tensors.batches(batch_size)]
    if was_training:
        model.train()
    return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate(model: EmbeddingRecommender, tensors: SplitTensors) -> tuple[float, float]:
    """(AUC, logloss) on a split; AUC is NaN when the split holds one class only."""
    p = predict(model, tensors)
    if not np.isfinite(p).all():
        raise FloatingPointError("the model predicts NaN; training diverged, lower the learning rate")
    y = tensors.label.cpu().numpy()
    eps = 1e-7
    logloss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) if len(y) else math.nan
    auc = roc_auc(y, p)
    return auc, logloss


Snapshot = Callable[[], dict]


class _Stopped(Exception):
    """``should_stop`` said so: out of an epoch's two loops at once."""


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data: EncodedDataset,
    on_epoch: Callable[[EpochResult, Snapshot], bool | None] | None = None,
    device: str | torch.device | None = None,
    resume: dict | None = None,
    train_on_val: bool = False,
    keep_best: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train one config; after each epoch call ``on_epoch(result, snapshot)``, which may return False to stop.
    ``should_stop()``, asked before every batch, stops training at once when it returns True, leaving the epoch under
    way unfinished (and out of the history): a caller whose answer to an epoch comes while the next one trains.

    ``snapshot()`` returns a copy of the state to checkpoint (model, optimizer, epoch, history, best, random
    generators); pass it back as ``resume`` to continue exactly as an uninterrupted run would. With ``train_on_val``
    the validation rows join training (final production fit) and early stopping is off. The returned model holds the
    best epoch's weights; with ``keep_best=False`` (a caller that needs only the metrics, like a search trial) the
    last epoch's, and no copy of the model is kept. A NaN or infinite loss raises ``FloatingPointError``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    model = build_model(data.features, model_cfg, cfg.sparse).to(dev)
    dropout_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    bp = Backprop(model, cfg.batch_size, sparse=cfg.sparse, generator=dropout_gen)
    opt = Adam(bp, cfg.lr, cfg.weight_decay)
    train_split = _concat(data.train, data.val) if train_on_val else data.train
    tr = TrainBatches(train_split, model, dev)
    logits = torch.empty(min(len(tr), tr.chunk_rows + cfg.batch_size), 1, device=dev)  # one chunk's
    va = SplitTensors(data.val, model, dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[EpochResult] = []
    best = (-math.inf, math.nan, 0)  # (auc, logloss, epoch)
    best_state: dict | None = None
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        history = [EpochResult(**h) for h in resume["history"]]
        best = tuple(resume["best"])  # type: ignore[assignment]
        best_state = resume.get("best_model")
        gen.set_state(resume["generator"])
        dropout_gen.set_state(resume["dropout_generator"])

    def snapshot(copied: bool = True, best_model: bool = True) -> dict:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(copied=False),  # copied below, once
            "history": [h.__dict__ for h in history],
            "best": list(best),
            "best_model": best_state if best_model else None,
            "generator": gen.get_state(),
            "dropout_generator": dropout_gen.get_state(),
        }
        # copied=False: the live tensors, for a caller that serializes them before on_epoch returns (no copy of a
        # model and its optimizer state, which at 1M-row tables is hundreds of MB)
        return copy.deepcopy(state) if copied else state

    started, ended = time.perf_counter(), "max_epochs"
    model.train()
    for epoch in range(len(history) + 1, cfg.max_epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(len(tr), generator=gen, dtype=torch.int32).to(dev)  # half the memory of int64
        loss = torch.zeros((), device=dev)
        try:
            for labels, batches in tr.epoch(perm, cfg.batch_size):
                for idx, bags, y, rows in batches:
                    if should_stop is not None and should_stop():
                        raise _Stopped
                    bp.step(idx, bags, y, logits[rows])
                    opt.step()
                # the chunk's loss from its logits as they were at each step: one op per chunk, not ten per step
                chunk_logits = logits[: len(labels)].view(-1)
                loss += nn.functional.binary_cross_entropy_with_logits(chunk_logits, labels, reduction="sum")
        except _Stopped:
            ended = "stopped"
            break
        train_loss = float(loss) / len(tr) if len(tr) else 0.0  # the epoch's one host sync
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} at epoch {epoch}; lower the learning rate")
        auc, logloss = evaluate(model, va)
        if auc > best[0]:
            best = (auc, logloss, epoch)
            if keep_best:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = EpochResult(epoch, train_loss, auc, logloss, best[0], seconds, len(tr) / seconds, cpu_seconds)
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


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (ties count half): the Mann-Whitney U statistic over average ranks.

    Written here instead of calling sklearn's roc_auc_score because importing sklearn costs every Ray trial worker
    1-2 s of start-up; tests check it against sklearn. NaN when ``y`` holds one class only.
    """
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    sorted_p = np.asarray(p)[order]
    first = np.r_[True, sorted_p[1:] != sorted_p[:-1]]  # start of each run of tied scores
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(p)]
    avg_rank = (starts + ends + 1) / 2.0  # 1-based average rank of each tie run
    ranks = np.empty(len(p))
    ranks[order] = np.repeat(avg_rank, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
