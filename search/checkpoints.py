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
trial no state knows yet. Pruned by the driver (on a thread) after each state save, on a folder or a bucket alike:
the states and checkpoints are read and deleted through the filesystem Ray Tune writes them with (pyarrow's), and a
resume reads the states from there too, so a state only the driver's disk holds (not yet uploaded) never counts.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
from ray.tune import Callback

log = logging.getLogger(__name__)

CHECK_S = 1.0  # how often the pruner looks for a new saved state (a listing of the experiment: one LIST on a bucket)
_INDEX = re.compile(rb"checkpoint_(\d{6})")
_STATE = re.compile(r"experiment_state-.+\.json")  # not resume.repair's corrupt-experiment_state-*


@functools.lru_cache(maxsize=16)
def filesystem(experiment: Path | str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a Ray Tune experiment (a folder, or a bucket URI such as ``s3://bucket/dir/NAME``) and its
    path there, resolved as Ray Tune resolves its storage_path: ``pyarrow.fs.FileSystem.from_uri``. Resolved once per
    experiment: a look calls this several times a second, and a new S3 filesystem resolves its credentials again (an
    instance-metadata request on a cloud VM)."""
    if isinstance(experiment, Path):
        return pafs.LocalFileSystem(), str(experiment)
    return pafs.FileSystem.from_uri(experiment)


def _states(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """The experiment's saved states (``experiment_state-<start time>.json``, one per driver run), oldest first."""
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted((f for f in found if _STATE.fullmatch(f.base_name)), key=lambda f: f.base_name)


def needed(experiment: Path | str, fs: pafs.FileSystem | None = None, root: str | None = None
           ) -> tuple[dict[str, set[int] | None], set[str]] | None:
    """What the saved states of ``experiment`` need: per trial folder (relative to it), the checkpoint indices some
    state names (None: keep all its checkpoints, as a state names one this code cannot tell), and the folders of trials
    some state records as TERMINATED. None when a state file cannot be read now (being written): no prune."""
    if fs is None:
        fs, root = filesystem(experiment)
    keep: dict[str, set[int] | None] = {}
    ended: set[str] = set()
    try:
        for state in _states(fs, root):
            with fs.open_input_stream(state.path) as f:
                trials = json.loads(f.readall())["trial_data"]
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


def superseded(experiment: Path | str, found=None) -> list[str]:
    """The trials' checkpoint folders (paths on the experiment's filesystem) no saved experiment state of ``experiment``
    needs (see the module's doc); ``found``: what ``needed`` returned, when read already."""
    fs, root = filesystem(experiment)
    found = found or needed(experiment, fs, root)
    if found is None:
        return []
    keep, ended = found
    out = []
    for folder, indices in keep.items():
        if indices is None:
            continue
        newest = max(indices, default=-1)
        for ckpt in fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", allow_not_found=True)):
            m = _INDEX.fullmatch(ckpt.base_name.encode())
            if m is None or ckpt.type != pafs.FileType.Directory:
                continue
            index = int(m.group(1))
            # one a state names stays; of the rest, those before the newest named, or all once the trial has ended
            if index not in indices and (folder in ended or index < newest):
                out.append(ckpt.path)
    return sorted(out)


def delete(experiment: Path | str, paths: list[str]) -> int:
    """Remove checkpoint folders (paths on the experiment's filesystem); the bytes freed."""
    fs, _ = filesystem(experiment)
    freed = 0
    for ckpt in paths:
        try:
            size = sum(f.size or 0 for f in fs.get_file_info(pafs.FileSelector(ckpt, recursive=True)))
            fs.delete_dir(ckpt)
        except FileNotFoundError:  # removed meanwhile
            continue
        freed += size
    return freed


class Pruner(Callback):
    """Deletes ``superseded`` checkpoints while the search runs, each time Ray has saved a new experiment state: every
    ``CHECK_S`` Tune's loop starts a look on a thread of its own (unless the last one still runs), so the loop never
    waits for it. A look lists the experiment folder (one LIST request of tens of milliseconds on a bucket); reading
    the states takes milliseconds, and deleting is an unlink per checkpoint file (a batched DELETE on a bucket)."""

    def __init__(self, experiment: Path | str):
        self.experiment = experiment
        self.freed = 0
        self._next = 0.0
        self._pruned_at: tuple = ()  # the state files (name, size, mtime) the last prune read
        self._look: threading.Thread | None = None

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self._next or (self._look is not None and self._look.is_alive()):
            return
        self._next = now + CHECK_S
        self._look = threading.Thread(target=self.prune, name="embsize-checkpoint-pruner", daemon=True)
        self._look.start()

    def on_experiment_end(self, trials, **info):
        self.wait()  # before the runner's prune_all, which deletes the rest

    def wait(self) -> None:
        """Until the look under way (if any) has ended."""
        if self._look is not None:
            self._look.join()

    def prune(self) -> None:
        """One look: if the saved states changed since the last prune, delete what they no longer need."""
        try:
            fs, root = filesystem(self.experiment)
            states = tuple((f.base_name, f.size, f.mtime_ns) for f in _states(fs, root))
            if states == self._pruned_at:
                return
            found = needed(self.experiment, fs, root)
            if found is None:  # a state being written: read again at the next look
                return
            self._pruned_at = states
            freed = delete(self.experiment, superseded(self.experiment, found))
        except OSError as e:  # the disk or the bucket: a failed prune must not end the search (the next look retries)
            log.warning("could not delete superseded trial checkpoints in %s: %s", self.experiment, e)
            return
        if freed:
            self.freed += freed
            log.debug("deleted %.1f MB of superseded trial checkpoints", freed / 1e6)

    def __getstate__(self) -> dict:  # Ray pickles callbacks with its state; the next leg's pruner is its own
        return {**self.__dict__, "_next": 0.0, "_pruned_at": (), "_look": None}


def prune_all(experiment: Path | str) -> None:
    """Delete the trials' epoch checkpoints of a finished search: they serve only to resume unfinished trials."""
    try:
        fs, root = filesystem(experiment)
        trial_checkpoint = re.compile(re.escape(root.rstrip("/")) + r"/[^/]+/checkpoint_\d{6}")
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))  # one listing
        freed = delete(experiment, [f.path for f in found
                                    if f.type == pafs.FileType.Directory and trial_checkpoint.fullmatch(f.path)])
    except OSError as e:  # the search's result is written: what is left only takes space
        log.warning("could not delete the trial checkpoints of %s: %s", experiment, e)
        return
    log.info("deleted the trial checkpoints of %s (%.1f MB)", experiment, freed / 1e6)
