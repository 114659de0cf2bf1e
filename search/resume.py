"""Resuming a search: what identifies one, and how an interrupted one is found again.

A search named NAME lives in OUT/NAME. Its first start writes OUT/NAME/search.json: the settings that define the
search (everything but where and how fast it runs), the dataset fingerprint, the search space, the tracking URI
(credentials removed) and the command-line options that started it. Running a search whose folder holds a
search.json continues it:

- the Ray Tune experiment in OUT/NAME/ray/NAME is restored (``Tuner.restore``): finished trials are kept, trials that
  were running continue from their last epoch checkpoint, and new trials are sampled up to the requested count;
- the Optuna study is the journal OUT/NAME/optuna.journal, which every tell reached at once;
- the MLflow parent run (tag ``embsize.name`` = NAME) is reused and set RUNNING again; trial runs the interrupted
  driver left RUNNING are closed KILLED (outcome ``interrupted``), and the ones Ray continues are reopened.

A run with the same name but a different defining setting is refused with the setting named: a search is one
experiment, and Ray and Optuna cannot change its space or budget midway. A search that another process is running is
refused too (OUT/NAME/.running.lock, held while a driver runs it): two drivers would interleave their trials in one
Ray experiment, one Optuna study and one MLflow parent run. Where it runs may change: the Ray address,
the number of local CPUs and ``--max-failures``; so may the recommendation rule (``--knee``, ``--epsilon``), which is
applied afresh to all the trials.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .preflight import redact

if TYPE_CHECKING:
    from pipelines import EncodedDataset

    from .runner import SearchSettings
    from .space import SearchSpace

FORMAT = 1
STATE_FILE = "search.json"
LOCK_FILE = ".running.lock"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# May change between the start and a resume of a search: where and with how many failures it runs, and the rule that
# picks the recommendation from the trials (applied afresh at the end).
MAY_CHANGE = ("address", "num_cpus", "max_failures", "checkpoint_seconds", "rule", "epsilon", "tracking_uri",
              "output_dir", "name")


def check_name(name: str) -> str:
    """A search name is a folder name in the output directory: letters, digits, '.', '_', '-' (no path)."""
    if not _NAME.fullmatch(name or ""):
        raise ValueError(
            f"search name {name!r} is not a plain name; use letters, digits, '.', '_' and '-' (at most 100, "
            "starting with a letter or digit)"
        )
    return name


class SearchRunning(ValueError):
    """Another process is running this search now."""


class NameTaken(ValueError):
    """A search that must be new (a dated default name) found a search of its name."""


@contextmanager
def claimed(out: Path, name: str):
    """Hold OUT/NAME for this process while the body runs, or raise ``SearchRunning`` at once if another holds it.

    An OS file lock (filelock's fcntl/msvcrt lock): the OS releases it when its process ends, killed or not, so an
    interrupted search never leaves a stale claim behind, and the lock file may stay."""
    from filelock import FileLock, Timeout

    lock = FileLock(out / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SearchRunning(
            f"search '{name}' is running in another process now (it holds '{out / LOCK_FILE}'); wait for it to end "
            "or stop it, or give this search another --name"
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_not_running(out: Path, name: str) -> None:
    """Raise ``SearchRunning`` if another process holds OUT/NAME now (a check before printing; ``claimed`` holds it)."""
    if (out / LOCK_FILE).is_file():
        with claimed(out, name):
            pass


def identity(settings: SearchSettings, data: EncodedDataset, space: SearchSpace, uri: str) -> dict:
    """What defines a search: compared key by key when it is run again."""
    return {
        "settings": {k: v for k, v in asdict(settings).items() if k not in MAY_CHANGE},
        "dataset": {"name": data.name, "fingerprint": data.fingerprint},
        "space": {
            "ranges": {k: list(v) for k, v in space.ranges.items()},
            "pins": dict(space.pins),
            "grid": space.grid,
            **{k: repr(getattr(space, k)) for k in ("lr", "hidden", "dropout")},
        },
        "tracking_uri": redact(uri),
    }


def load(out: Path) -> dict | None:
    """The search.json of OUT/NAME, or None when no search was started there."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"'{path}' cannot be read ({e}); remove the folder '{out}' to start the search afresh") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not an embsize search state; remove the folder '{out}' to start afresh")
    return state


def check_same(state: dict, current: dict, name: str) -> None:
    """Refuse to continue ``state``'s search with a different defining setting, naming the first difference."""
    for section in ("settings", "dataset", "space"):
        before, now = state["identity"].get(section, {}), current[section]
        for key in sorted(set(before) | set(now)):
            if _norm(before.get(key)) != _norm(now.get(key)):
                what = key if section == "settings" else f"{section} {key}"
                raise ValueError(
                    f"search '{name}' was started with {what}={_show(before.get(key))}, but this run has "
                    f"{_show(now.get(key))}; rerun with the original settings (`--resume {name}` reuses them) or "
                    "choose a new --name"
                )
    if state["identity"].get("tracking_uri") != current["tracking_uri"]:
        raise ValueError(
            f"search '{name}' is tracked in '{state['identity'].get('tracking_uri')}', but this run uses "
            f"'{current['tracking_uri']}'; pass --tracking-uri (or $MLFLOW_TRACKING_URI) of the original store"
        )


def save(out: Path, current: dict, command: dict | None) -> Path:
    from pipelines.recipe import write_atomic

    return write_atomic(out / STATE_FILE, json.dumps({"format": FORMAT, "identity": current,
                                                      "command": command or {}}, indent=2, default=str))


def stored_command(out: Path, name: str) -> dict:
    """The command-line options that started the search OUT/NAME (for ``--resume NAME``)."""
    state = load(out)
    if state is None:
        raise ValueError(
            f"no search named '{name}' in '{out.parent}' (no {STATE_FILE}); check --resume and --output-dir"
        )
    return dict(state.get("command") or {})


def _norm(value):
    return json.loads(json.dumps(value, default=str))


def _show(value) -> str:
    return "(none)" if value is None else (json.dumps(value) if isinstance(value, (dict, list)) else str(value))


SNAPSHOT_FILES = ("experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl",
                  "callback-states-{}.pkl")  # what Ray Tune saves of one driver's run, named by its start time


def repair(out: Path, experiment: Path | str) -> list[str]:
    """Undo what a write cut short (a full disk, a kill mid-write) leaves in a search's state, before it is resumed;
    returns what was done, one line each.

    - The Optuna journal: a record cut short is dropped. Left in place, the next record was appended to it, and Optuna
      refuses a journal with a bad line before its last ("Invalid log format", or a JSON error, at every tell). A line
      already glued that way keeps its whole second record.
    - Ray Tune's experiment state: Ray restores the newest snapshot, and when that one does not load (a truncated
      experiment_state-*.json or pickle) it "restarts the experiment" in the same folder, where every resume then
      stopped after one trial. Such a snapshot is moved aside (prefix ``corrupt-``), so Ray takes the one before it,
      or none (the trials start afresh; the study and the MLflow run go on).
    """
    done = []
    journal = Path(out) / "optuna.journal"
    if journal.is_file():
        data = journal.read_bytes()
        lines = data.split(b"\n")  # the last item is what follows the last newline: empty, or a record cut short
        kept = [_record(line) for line in lines[:-1]]
        repaired = b"".join(line + b"\n" for line in kept if line is not None)
        if repaired != data:
            tmp = journal.with_name(journal.name + ".repair")
            tmp.write_bytes(repaired)
            tmp.replace(journal)
            cut = sum(line != whole for line, whole in zip(kept, lines)) + bool(lines[-1])
            done.append(f"the Optuna journal {journal}: {cut} record(s) cut short dropped")
    if isinstance(experiment, Path) and experiment.is_dir():
        for state in sorted(experiment.glob(SNAPSHOT_FILES[0].format("*")), reverse=True):
            stamp = state.name[len("experiment_state-"):-len(".json")]
            files = [experiment / f.format(stamp) for f in SNAPSHOT_FILES]
            if all(_loads(f) for f in files if f.exists()):
                break
            for f in files:
                if f.exists():
                    f.rename(f.with_name("corrupt-" + f.name))
            done.append(f"Ray Tune's state of {stamp} in {experiment} does not load: moved aside")
    return done


def _record(line: bytes) -> bytes | None:
    """A journal line that parses, the whole record at its end when a cut-short one was glued before it, or None."""
    for start in (0, line.rfind(b'{"op_code"')):
        if start < 0:
            continue
        try:
            json.loads(line[start:])
            return line[start:]
        except ValueError:
            continue
    return None


def _loads(path: Path) -> bool:
    import pickle

    try:
        with open(path, "rb") as f:
            if path.name.startswith("experiment_state-"):
                json.load(f)
            else:
                pickle.load(f)  # Ray's own files, in the search's own folder
        return True
    except Exception:  # noqa: BLE001 - any way a cut-short file fails to load
        return False
