"""Which trial checkpoints a running search still needs, and deleting the rest as it goes.

A trial reports a checkpoint at most every ``--checkpoint-every`` seconds and at its last epoch, and Ray keeps them all
(``CheckpointConfig(num_to_keep=None)``): a search over a 1M-category table writes hundreds of MB per checkpoint,
so a long search used to fill its disk with checkpoints nothing would read again.

Why not Ray's ``num_to_keep``: a resume restores the trials from Ray's last saved experiment state, which names each
trial's latest checkpoint *as of that save* (about every 10 s, written asynchronously). Ray deletes a trial's oldest
checkpoint as it registers a newer one, and forces a state save only after that (``sync_every_n_trial_checkpoints``),
so a driver killed in between leaves a state naming a deleted checkpoint, and that trial cannot resume ("Could not
recover from checkpoint as it does not exist").

So a checkpoint is deleted here only once no saved experiment state can ask for it: every state file in the experiment
folder that knows its trial names a newer checkpoint of it, or records the trial as ended (TERMINATED: a restore never
runs it again). Every state file counts, not only the newest: a resume moves a newest state that does not load aside
for the one before it (``resume.repair``). A checkpoint newer than every saved state's is kept, as is everything of a
trial no state knows yet. Pruned on the driver after each state save; remote storage (a URI) is left alone.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from ray.tune import Callback

log = logging.getLogger(__name__)

CHECK_S = 1.0  # how often the pruner looks for a new saved state (a stat of the state files)
_INDEX = re.compile(rb"checkpoint_(\d{6})")


def needed(experiment: Path) -> tuple[dict[str, set[int] | None], set[str]] | None:
    """What the saved states of ``experiment`` need: per trial folder (relative to it), the checkpoint indices some
    state names (None: keep all its checkpoints, as a state names one this code cannot tell), and the folders of trials
    some state records as TERMINATED. None when a state file cannot be read now (being written): no prune."""
    keep: dict[str, set[int] | None] = {}
    ended: set[str] = set()
    for state in sorted(experiment.glob("experiment_state-*.json")):
        try:
            trials = json.loads(state.read_text())["trial_data"]
            for trial_json, metadata_json in trials:
                trial, metadata = json.loads(trial_json), json.loads(metadata_json)
                folder = trial["relative_logdir"]
                indices = keep.setdefault(folder, set())
                if trial["status"] == "TERMINATED":
                    ended.add(folder)
                elif indices is not None:
                    latest = _latest(metadata)
                    keep[folder] = None if latest is None else indices | {latest}
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return keep, ended


def _latest(metadata: dict) -> int | None:
    """The index of the trial's latest checkpoint in Ray's pickled checkpoint manager (checkpoint_000003 -> 3); -1
    when it has none yet (a restore starts the trial afresh); None when the manager is not in the form read here."""
    manager = metadata.get("checkpoint_manager")
    if not isinstance(manager, dict) or manager.get("_type") != "CLOUDPICKLE_FALLBACK":
        return None
    # The manager is a cloudpickle in hex (Ray's TuneFunctionEncoder); its checkpoints' paths are plain strings in it.
    # Reading the names rather than unpickling keeps this off Ray's private classes. Ray numbers a trial's checkpoints
    # in the order they are registered, so the highest is the latest.
    try:
        found = _INDEX.findall(bytes.fromhex(manager["value"]))
    except (ValueError, TypeError, KeyError):
        return None
    return max((int(i) for i in found), default=-1)


def superseded(experiment: Path, found=None) -> list[Path]:
    """The trials' checkpoint folders no saved experiment state of ``experiment`` needs (see the module's doc);
    ``found``: what ``needed`` returned, when read already."""
    found = found or needed(experiment)
    if found is None:
        return []
    keep, ended = found
    out = []
    for folder, indices in keep.items():
        if indices is None:
            continue
        newest = max(indices, default=-1)
        for ckpt in (experiment / folder).glob("checkpoint_*"):
            m = _INDEX.fullmatch(ckpt.name.encode())
            if m is None or not ckpt.is_dir():
                continue
            index = int(m.group(1))
            # one a state names stays; of the rest, those before the newest named, or all once the trial has ended
            if index not in indices and (folder in ended or index < newest):
                out.append(ckpt)
    return sorted(out)


def delete(paths: list[Path]) -> int:
    """Remove checkpoint folders; the bytes freed."""
    freed = 0
    for ckpt in paths:
        try:
            freed += sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        except OSError:  # removed meanwhile
            continue
        shutil.rmtree(ckpt, ignore_errors=True)
    return freed


class Pruner(Callback):
    """Deletes ``superseded`` checkpoints while the search runs, on Tune's driver loop, each time Ray has saved a new
    experiment state: it looks every ``CHECK_S`` (a stat of the state files); reading them takes milliseconds, and
    deleting is an unlink per checkpoint file."""

    def __init__(self, experiment: Path):
        self.experiment = experiment
        self.freed = 0
        self._next = 0.0
        self._pruned_at: tuple = ()  # the state files (name, size, mtime) the last prune read

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + CHECK_S
        try:
            states = tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns)
                           for p in sorted(self.experiment.glob("experiment_state-*.json")))
            if states == self._pruned_at:
                return
            found = needed(self.experiment)
            if found is None:  # a state being written: read again at the next look
                return
            self._pruned_at = states
            freed = delete(superseded(self.experiment, found))
        except OSError as e:  # the folder's disk: a failed prune must not end the search (the next one tries again)
            log.warning("could not delete superseded trial checkpoints in %s: %s", self.experiment, e)
            return
        if freed:
            self.freed += freed
            log.debug("deleted %.1f MB of superseded trial checkpoints", freed / 1e6)

    def __getstate__(self) -> dict:  # Ray pickles callbacks with its state; the next leg's pruner is its own
        return {**self.__dict__, "_next": 0.0, "_pruned_at": ()}


def prune_all(experiment: Path | str) -> None:
    """Delete the trials' epoch checkpoints of a finished search: they serve only to resume unfinished trials."""
    if not isinstance(experiment, Path):  # remote storage (URI): left to the bucket's lifecycle rules
        return
    freed = delete([ckpt for ckpt in experiment.glob("*/checkpoint_*") if ckpt.is_dir()])
    log.info("deleted the trial checkpoints of %s (%.1f MB)", experiment, freed / 1e6)
