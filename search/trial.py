"""One trial: decode the sampled config, train with the pipelines trainer, report once per epoch.

Shaped like the Ray Tune docs' PyTorch example: a plain function of ``config``; the dataset arrives through
``tune.with_parameters`` (put in the object store once per search, not once per trial).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from pipelines import EncodedDataset, TrainConfig, model_bytes, train
from pipelines.memory import embedding_bytes

from .space import SearchSpace


@dataclass(frozen=True)
class TrialSettings:
    max_epochs: int = 20  # the full budget of one trial
    patience: int = 3  # early-stopping patience on val AUC (0 = off)
    batch_size: int = 1024
    lr: float = 3e-3  # used when the space does not search lr
    seed: int = 0  # the same init/shuffle seed for every trial, so trials differ by config only
    cpus: float = 1  # torch threads follow the trial's CPU share
    sparse: bool = False  # sparse embedding gradients (large tables)


def train_config(settings: TrialSettings, overrides: dict) -> TrainConfig:
    base = TrainConfig(
        lr=settings.lr,
        batch_size=settings.batch_size,
        max_epochs=settings.max_epochs,
        patience=settings.patience,
        sparse=settings.sparse,
        seed=settings.seed,
        threads=max(1, int(settings.cpus)),
    )
    return replace(base, **overrides)


def run_trial(config: dict, data: EncodedDataset, space: SearchSpace, settings: TrialSettings) -> None:
    import ray
    from ray import tune

    model_cfg, overrides = space.decode(config)
    cfg = train_config(settings, overrides)
    nbytes = model_bytes(data.features, model_cfg.dims, model_cfg.hidden)
    emb = sum(embedding_bytes(data.features, model_cfg.dims).values())
    node = ray.util.get_node_ip_address()
    best_epoch = 0

    def on_epoch(r, snapshot) -> None:
        nonlocal best_epoch
        if r.val_auc >= r.best_val_auc:
            best_epoch = r.epoch
        converged = bool(cfg.patience) and r.epoch - best_epoch >= cfg.patience
        final = r.epoch >= cfg.max_epochs or converged
        tune.report(
            {
                "epoch": r.epoch,
                "val_auc": r.val_auc,
                "val_logloss": r.val_logloss,
                "train_loss": r.train_loss,
                "best_val_auc": r.best_val_auc,
                "model_bytes": nbytes,
                "embedding_bytes": emb,
                "epoch_seconds": r.seconds,
                "final": final,
                "ended": ("converged" if converged else "max_epochs") if final else "",
                "node": node,
            }
        )

    train(model_cfg, cfg, data, on_epoch=on_epoch)
