"""One trial: decode the sampled config, train with the pipelines trainer, report once per epoch.

Shaped like the Ray Tune docs' PyTorch example: a plain function of ``config``; the dataset arrives through
``tune.with_parameters`` (put in the object store once per search, not once per trial).

Checkpoints: a report carries a checkpoint of the trainer's snapshot (model, optimizer, history, random generators;
``torch.save``) when ``TrialSettings.checkpoint_seconds`` have passed since the trial's last one (0: every epoch), and
always at its last epoch; Ray keeps them until the search has finished (runner.py says why). Writing one costs ~4% of
an epoch even at MovieLens size, and at a 1M-row table hundreds of MB per epoch (model and both Adam moments), so
they are spaced in time, as Ray Train's periodic checkpoints are. A trial that Ray retries after a lost worker, or
that a resumed search continues, loads its latest (``torch.load(weights_only=True)``: tensors and plain containers
only, never pickled code) and goes on from the epoch after it, exactly as it would have run; the epochs it trains
again are reported again with the same values (the MLflow callback logs each epoch once).

Reporting: ``tune.report`` returns only when the driver has handled the result and asked for the next (Tune's
function trainables report synchronously so a scheduler can stop a trial between two epochs), a round trip of 5-15 ms
per epoch on a busy 2-core driver. Schedulers decide mostly at their rungs (``TrialSettings.decisions``), so at other
epochs the trial hands the result to a reporting thread (``_Reporter``) and trains on; at a rung, at its last epoch
and on an error it waits for the answer. Results still reach Tune one by one and in order. A stop between rungs
(Pareto-ASHA's outrun test may stop a trial at any epoch) finds the trial training the next epoch, which it leaves at
the next batch (``train``'s ``should_stop``): Ray reuses a stopped trial's actor only if its thread ends within
``TUNE_FUNCTION_THREAD_TIMEOUT_S`` (2 s), less than an epoch on large data, and otherwise fails the trial it meant to
run there.

Fault injection is a testing hook, not a user option: ``EMBSIZE_FAULT_INJECT`` (read only here, in the trial's
process; see ``parse_faults``) makes chosen trials raise, diverge to NaN, lose their worker process, or run slowly, so
the fault tests exercise the real failure paths of Ray, Optuna and MLflow.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines import EncodedDataset, TrainConfig, model_bytes, train
from pipelines.memory import embedding_bytes

from .cluster import placement, trial_device
from .space import SearchSpace

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "trainer.pt"
FAULT_ENV = "EMBSIZE_FAULT_INJECT"
DIVERGENT_LR = 1e30  # the "nan" fault: a learning rate at which the loss becomes NaN within the first epoch


@dataclass(frozen=True)
class TrialSettings:
    max_epochs: int = 20  # the full budget of one trial
    patience: int = 3  # early-stopping patience on val AUC (0 = off)
    batch_size: int = 1024
    lr: float = 3e-3  # used when the space does not search lr
    seed: int = 0  # the same init/shuffle seed for every trial, so trials differ by config only
    cpus: float = 1  # torch threads follow the trial's CPU share
    sparse: bool = False  # sparse embedding gradients (large tables)
    # epochs at which the scheduler decides on a trial (its rungs), where a trial waits for its report to be handled
    # (a stop elsewhere interrupts the epoch under way); None: it decides at every epoch (every report waits)
    decisions: frozenset[int] | None = None
    checkpoint_seconds: float = 0.0  # at least this long between two checkpoints of a trial (0: every epoch)


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


RESTORED = ("epoch", "val_auc", "val_logloss", "train_loss", "best_val_auc")  # of each epoch a checkpoint holds


def run_trial(config: dict, data: EncodedDataset, space: SearchSpace, settings: TrialSettings) -> None:
    from ray import tune

    model_cfg, overrides = space.decode(config)
    faults = [f for f in parse_faults(os.environ.get(FAULT_ENV, "")) if f.matches(config)]
    if any(f.action == "nan" for f in faults):
        overrides = {**overrides, "lr": DIVERGENT_LR}
    cfg = train_config(settings, overrides)
    nbytes = model_bytes(data.features, model_cfg.dims, model_cfg.hidden)
    emb = sum(embedding_bytes(data.features, model_cfg.dims).values())
    where = {**placement(), "device": trial_device()}  # node IP, Ray node id, and cpu | cuda as Ray assigned
    resume, last = load_checkpoint(tune.get_checkpoint())
    _sweep_once()
    start = len(resume["history"]) if resume else 0
    best_epoch = _best_epoch(resume["history"]) if resume else 0
    _inject(faults, start, resumed=start)
    # The epochs the checkpoint holds go with the first report: a driver killed after Ray saved its state but before
    # its MLflow writer had logged them would leave them out of the run's curves (MLflow keeps each epoch once).
    restored = {"restored": [{k: h[k] for k in RESTORED} for h in resume["history"]]} if resume else {}
    if last is not None and (last["final"] or start >= cfg.max_epochs):
        # The checkpoint is of the trial's last epoch (it finished after the search's last state save): report the
        # same result again so Ray, the searcher and MLflow see the trial end as it did.
        tune.report({**last, **where, **restored})
        return

    # with faults injected every report waits, so a fault lands after exactly the reports it names
    reporter = _Reporter(settings.decisions if not faults else None)
    # a "die" fault ends the first run of a trial only: its retry must resume from the epoch before it, so every epoch
    # is checkpointed
    interval = 0.0 if any(f.action == "die" for f in faults) else settings.checkpoint_seconds
    last_checkpoint = time.monotonic()

    def on_epoch(r, snapshot) -> None:
        nonlocal best_epoch, last_checkpoint
        if r.val_auc >= r.best_val_auc:
            best_epoch = r.epoch
        converged = bool(cfg.patience) and r.epoch - best_epoch >= cfg.patience
        final = r.epoch >= cfg.max_epochs or converged
        metrics = {
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
            **where,
            **restored,
        }
        restored.clear()  # the first report only
        _inject(faults, r.epoch, resumed=start, before_report=True)
        tmp = None
        if final or time.monotonic() - last_checkpoint >= interval:
            tmp = Path(tempfile.mkdtemp(prefix=CKPT_PREFIX))
            t0 = time.monotonic()
            # written before training goes on, so the live state needs no copy; the best epoch's weights are left
            # out (only train()'s returned model needs them)
            save_checkpoint(tmp, snapshot(copied=False, best_model=False), metrics)
            last_checkpoint = time.monotonic()
            log.debug("epoch %d checkpoint: %.3f s", r.epoch, last_checkpoint - t0)
        reporter.report(metrics, tmp, final)
        _inject(faults, r.epoch, resumed=start)

    try:
        train(model_cfg, cfg, data, on_epoch=on_epoch, resume=resume, device=where["device"], keep_best=False,
              should_stop=lambda: reporter.ended)
        reporter.raise_if_ended()  # stopped mid-epoch: leave as at a report (SystemExit(0), or the reporting error)
    finally:
        reporter.close()


CKPT_PREFIX = "embsize-ckpt-"  # a trial's checkpoint folder, from its epoch's end until Tune has copied it to storage
STALE_S = 3600.0


def _sweep_stale_checkpoints(root: str | None = None, older_than: float = STALE_S) -> int:
    """Remove checkpoint folders a killed worker left in this node's temporary directory (a `kill -9` of the driver,
    a lost node: nothing ran the worker's cleanup). A folder lives seconds, so one untouched for an hour is an orphan,
    whichever search made it. Returns how many were removed."""
    cutoff, removed = time.time() - older_than, 0
    for path in Path(root or tempfile.gettempdir()).glob(f"{CKPT_PREFIX}*"):
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path)
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


@functools.cache
def _sweep_once() -> None:
    """The sweep, once per worker process: a reused actor runs many trials, and the orphans are an hour old anyway."""
    _sweep_stale_checkpoints()


class _Reporter:
    """``tune.report`` on a thread of its own, so training goes on while the driver handles an epoch's result.

    At most one result waits behind the one being reported. ``report`` returns at once unless the epoch is one where
    the scheduler may stop the trial (or the last), where it waits until Tune has handled it. When Tune stops the
    trial, ``tune.report`` ends the reporting thread (``SystemExit``, as it would the training thread), the results
    behind it are dropped, and the training thread leaves with ``SystemExit(0)`` (a clean end for Tune) at its next
    report, or sooner through ``ended`` (``train``'s ``should_stop``). An error in reporting is raised in the training
    thread the same way.
    """

    def __init__(self, decisions: frozenset[int] | None):
        self.decisions = decisions
        self._lock = threading.Condition()
        self._item: tuple[dict, Path | None] | None = None  # the result (and checkpoint) waiting to be reported
        self._busy = False  # a result is being reported
        self._stopped = False  # Tune stopped the trial
        self._error: BaseException | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    def report(self, metrics: dict, checkpoint_dir: Path | None, final: bool) -> None:
        wait = final or self.decisions is None or int(metrics["epoch"]) in self.decisions
        with self._lock:
            self._lock.wait_for(lambda: self._item is None or self.ended)
            self.raise_if_ended(checkpoint_dir)
            self._item = (metrics, checkpoint_dir)
            self._lock.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="embsize-report", daemon=True)
                self._thread.start()
            if wait:
                self._lock.wait_for(lambda: (self._item is None and not self._busy) or self.ended)
                self.raise_if_ended()

    def close(self) -> None:
        """Wait for the results handed over to be reported (or dropped, if Tune stopped the trial), end the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._item is not None:  # dropped: Tune stopped the trial first
            _remove(self._item[1])
            self._item = None

    @property
    def ended(self) -> bool:
        """Tune stopped the trial, or reporting failed; read without the lock (two plain attributes)."""
        return self._stopped or self._error is not None

    def raise_if_ended(self, checkpoint_dir: Path | None = None) -> None:
        if not self.ended:
            return
        _remove(checkpoint_dir)
        if self._error is not None:
            raise self._error
        raise SystemExit(0)

    def _run(self) -> None:
        from ray import tune

        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._item is not None or self._closing)
                if self._item is None:
                    return
                (metrics, checkpoint_dir), self._item = self._item, None
                self._busy = True
                self._lock.notify_all()
            try:
                checkpoint = None if checkpoint_dir is None else tune.Checkpoint.from_directory(checkpoint_dir)
                tune.report(metrics, checkpoint=checkpoint)
            except SystemExit:
                with self._lock:
                    self._stopped = True
                return
            except BaseException as e:  # noqa: BLE001 - anything: relayed to the training thread, which raises it
                with self._lock:
                    self._error = e
                return
            finally:
                _remove(checkpoint_dir)
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()


def _remove(checkpoint_dir: Path | None) -> None:
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def save_checkpoint(directory: Path, snapshot: dict, metrics: dict) -> Path:
    """The trainer's snapshot and the epoch's reported metrics, as one torch file in ``directory``."""
    import torch

    path = directory / CHECKPOINT_FILE
    torch.save({"snapshot": snapshot, "metrics": metrics}, path)
    return path


def load_checkpoint(checkpoint) -> tuple[dict | None, dict | None]:
    """(trainer snapshot, last reported metrics) of a Ray checkpoint, or (None, None) without one."""
    import torch

    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as d:
        # tensors of a GPU trial load on the CPU first: a retried trial may run on a node without that GPU
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return state["snapshot"], state["metrics"]


def _best_epoch(history: list[dict]) -> int:
    """The epoch the trial's convergence counts from, by the same rule ``on_epoch`` applies (ties move it)."""
    best = 0
    for h in history:
        if h["val_auc"] >= h["best_val_auc"]:
            best = h["epoch"]
    return best


@dataclass(frozen=True)
class Fault:
    """One injected fault (a testing hook). ``action``: raise | nan | die | sleep."""

    action: str
    key: str = ""  # config key a trial must match ("" = every trial), e.g. "heuristic" or "hidden"
    value: str = ""  # ... and its value, compared as text
    epoch: int = 0  # raise/die: after this epoch's report (0 = before training)
    seconds: float = 0.0  # sleep: pause after every epoch

    def matches(self, config: dict) -> bool:
        return not self.key or str(config.get(self.key)) == self.value


_FAULT = re.compile(r"^(raise|nan|die|sleep)(?:=(\d+(?:\.\d*)?))?(?:@([^=:@]+)=([^:@]*))?(?::(\d+))?$")


def parse_faults(text: str) -> list[Fault]:
    """Rules separated by ';', each ``ACTION[=SECONDS][@KEY=VALUE][:EPOCH]``:

    - ``raise@heuristic=sqrt:1``: the sqrt baseline raises after reporting epoch 1 (and again whenever retried);
    - ``nan@hidden=32``: trials with hidden=32 train at a divergent learning rate (the trainer's NaN check fires);
    - ``die@heuristic=fastai:1``: the fastai baseline's worker process exits during epoch 2, once (its retry, which
      starts from the epoch-1 checkpoint, runs on);
    - ``sleep=0.5``: every trial pauses 0.5 s after each epoch (slow enough to interrupt).
    """
    faults = []
    for rule in (r.strip() for r in text.split(";")):
        if not rule:
            continue
        m = _FAULT.match(rule)
        if not m:
            raise ValueError(f"{FAULT_ENV} rule {rule!r} is not ACTION[=SECONDS][@KEY=VALUE][:EPOCH]")
        action, seconds, key, value, epoch = m.groups()
        faults.append(Fault(action, key or "", value or "", int(epoch or 0), float(seconds or 0)))
    return faults


def _inject(faults: list[Fault], epoch: int, resumed: int, before_report: bool = False) -> None:
    """Apply the faults due now: at start (``epoch == resumed``), or around the report of ``epoch``."""
    for f in faults:
        if f.action == "raise" and not before_report and (epoch == f.epoch or (epoch == resumed and resumed >= f.epoch)):
            raise RuntimeError(f"injected fault: trial raised at epoch {epoch}")
        if f.action == "die" and before_report and epoch == f.epoch + 1 and resumed == 0:
            os._exit(17)  # like a lost worker: no exception, no cleanup; the epoch-f.epoch checkpoint is reported
        if f.action == "sleep" and not before_report and epoch > resumed:
            time.sleep(f.seconds)
