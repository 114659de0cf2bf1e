"""Fail fast: check that the MLflow store and the Ray cluster answer before any trial is launched.

Each check takes a bounded time (``timeout`` seconds, name resolution included) and writes nothing. A failure is a
``ValueError`` with one line naming the URI or address (credentials removed) and the fix.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

TIMEOUT = 5.0  # seconds per check
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # default ports of SQLAlchemy stores MLflow supports

T = TypeVar("T")


DEFAULT_STORE = "mlruns"  # relative to the current directory: sqlite db + artifacts, no server


def default_tracking_uri(root: Path | None = None) -> str:
    base = (root or Path.cwd()) / DEFAULT_STORE
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded store under ./mlruns (here rather than in
    tracking.py, which imports Ray: the CLI resolves and checks the store before any heavy import)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if path and path != ":memory:" and not Path(path).expanduser().is_absolute():
        # sqlite:///rel.db is relative to the current folder: made absolute, so that a search resumed (or reviewed)
        # from another folder finds the same store instead of starting a second one there
        uri = f"sqlite:///{Path(path).expanduser().resolve()}"
    return uri


def check(tracking_uri: str, address: str | None, timeout: float = TIMEOUT) -> None:
    """Both checks: the tracking store, then the Ray address (None: a local Ray will be started)."""
    check_tracking(tracking_uri, timeout)
    check_ray_address(address, timeout)


def redact(uri: str) -> str:
    """``uri`` without user:password@ (safe to print, log or write to a file)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def check_tracking(uri: str, timeout: float = TIMEOUT, existing: bool = False) -> None:
    """The store answers (a server or database) or can be written (a SQLite file). ``existing``: a command that only
    reads runs (report, confirm) needs a SQLite store that exists, and must not create an empty one."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        _within(timeout, lambda: _http_answers(uri, timeout), f"tracking server '{redact(uri)}'",
                "start the server or pass a reachable --tracking-uri")
    elif scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise ValueError(f"tracking URI '{redact(uri)}' is an in-memory SQLite store, which MLflow's threads and "
                             "a later review cannot share; give a file, e.g. --tracking-uri sqlite:///mlruns/mlflow.db")
        if "%" in path:  # SQLAlchemy reads %XX in a URL's path as an escape: '%41' would open 'A'
            raise ValueError(f"the MLflow store path '{path}' holds '%', which a SQLite URI cannot carry; run from a "
                             "folder without '%' or pass --tracking-uri sqlite:///PATH (or a server)")
        if path:
            if existing and not Path(path).expanduser().is_file():
                raise ValueError(f"no MLflow store at '{path}' (tracking URI '{redact(uri)}'); run `embsize search` "
                                 "here first, or pass the --tracking-uri the search used")
            _check_store_path(Path(path), uri)
    elif scheme in ("", "file"):  # a folder: MLflow's file store
        folder = Path(urlsplit(uri).path if scheme else uri)
        if _mlflow_major() >= 3:
            raise ValueError(f"tracking URI '{redact(uri)}' is a folder, MLflow's file store, which MLflow 3 no "
                             f"longer opens; pass --tracking-uri sqlite:///{folder.expanduser().resolve() / 'mlflow.db'}"
                             " (`mlflow migrate-filestore` converts an existing one)")
        _check_store_path(folder, uri)
    elif scheme.split("+")[0] in DB_PORTS:
        parts = urlsplit(uri)
        host, port = parts.hostname or "localhost", parts.port or DB_PORTS[scheme.split("+")[0]]
        _within(timeout, lambda: _connect(host, port, timeout), f"tracking database '{redact(uri)}'",
                "start the database or pass a reachable --tracking-uri")
    elif scheme not in _mlflow_schemes():
        raise ValueError(f"tracking URI '{redact(uri)}' has scheme '{scheme}', for which MLflow has no store; pass "
                         "sqlite:///PATH, http(s)://HOST:PORT or postgresql://..., or install the MLflow plugin "
                         "that provides it")
    # other schemes MLflow knows (databricks, ...) are checked by MLflow itself when the search opens its run


def _mlflow_major() -> int:
    from importlib.metadata import version

    return int(version("mlflow").split(".")[0])


def _mlflow_schemes() -> set[str]:
    """The URI schemes MLflow's tracking-store registry serves, plugins included (imported only for a scheme not
    handled above: importing MLflow takes a second)."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # no public accessor

    return set(_tracking_store_registry._registry)


def check_storage_uri(uri: str, timeout: float = TIMEOUT) -> None:
    """A remote Ray Tune storage path (``s3://bucket/dir``, ``gs://...``) answers: its filesystem (pyarrow's, as Ray
    Tune uses) can look the path up. An absent path is fine (Tune creates it); no answer, no access or no such bucket
    is not (Tune creates folders, not buckets: it failed with pyarrow's traceback after the output folder existed)."""
    def probe() -> None:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        fs.get_file_info(path)
        bucket = path.split("/", 1)[0]
        if fs.type_name in ("s3", "gcs") and fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise _WrongService(f"names bucket '{bucket}', which does not exist",
                                f"create it (e.g. `aws s3 mb s3://{bucket}`) or fix --storage-path")

    _within(timeout, probe, f"Ray Tune storage '{redact(uri)}'",
            "check the bucket, its credentials and endpoint, or pass --storage-path a folder every node mounts")


def check_ray_address(address: str | None, timeout: float = TIMEOUT) -> None:
    """``HOST:PORT`` or ``ray://HOST:PORT``: a TCP connect; ``auto``: Ray's own lookup of a running local cluster,
    then a connect to it; None or ``local``: nothing (a new local Ray is started)."""
    if address is None or address == "local":
        return
    if address == "auto":
        found = _within(timeout, _find_local_cluster, "--address auto",
                        "start one with `ray start --head`, or drop --address to start a local Ray")
        where = f"Ray cluster at '{found}' (found by --address auto)"
    else:
        found = address[len("ray://"):] if address.startswith("ray://") else address
        where = f"Ray cluster at '{address}'"
    host, _, port = found.rpartition(":")
    if "://" in found:  # http://HEAD:8265 is the dashboard's address, which `ray job submit` takes
        raise ValueError(f"Ray address '{address}' is not HOST:PORT, ray://HOST:PORT or auto (a URL such as "
                         "http://HEAD:8265 is the dashboard's, for `ray job submit`); fix --address")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Ray address '{address}' is not HOST:PORT, ray://HOST:PORT or auto; fix --address")
    _within(timeout, lambda: _connect(host.strip("[]"), int(port), timeout), where,
            "start it (`ray start --head --port PORT`) or fix --address")
    if not address.startswith("ray://"):  # a Ray client server speaks its own protocol; ray.init checks it
        _gcs_admits(found, where, timeout + GCS_IMPORT_S)


GCS_IMPORT_S = 10.0  # added to the GCS probe's bound: a fresh Python importing Ray's native module on a loaded machine
_GCS_PROBE = """
import sys
from ray._raylet import GcsClient  # Ray's client of a head's GCS; ray.init offers no bounded way to ask
try:
    GcsClient(address=sys.argv[1]).cluster_id
except Exception as e:
    print(type(e).__name__ + ": " + (str(e).splitlines() or [""])[0])
    sys.exit(1)
"""


def _gcs_admits(address: str, where: str, timeout: float) -> None:
    """The port is a Ray head's GCS and lets this process in. Asked from a child process, killed after ``timeout``:
    ray.init retries a port that is not a GCS (the dashboard's, 8265) for minutes, and a cluster with token
    authentication it cannot join for ~20 s of C++ warnings before a traceback."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _GCS_PROBE, address], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{where} answers, but not as a Ray head's GCS within {timeout:g} s; give --address the "
                         "port of `ray start --head --port PORT` (6379 by default; the dashboard's 8265 is for "
                         "`ray job submit`)") from None
    if done.returncode == 0:
        return
    reason = done.stdout.strip() or (done.stderr.strip().splitlines() or ["no output"])[-1]
    if reason.startswith("AuthenticationError") or "InvalidAuthToken" in reason:
        raise ValueError(f"{where} refuses this client: it uses token authentication, and "
                         + ("the token here is not the head's" if os.environ.get("RAY_AUTH_MODE") == "token"
                            else "RAY_AUTH_MODE is not 'token' here")
                         + "; export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the head's `ray get-auth-token`> "
                           "(or put it in ~/.ray/auth_token)")
    raise ValueError(f"{where} answers, but not as a Ray head's GCS ({reason.rstrip('.')}); give --address the port "
                     "of `ray start --head --port PORT`")


def _check_store_path(path: Path, uri: str) -> None:
    """The store's file (or folder) must be writable where it exists, else its nearest existing parent folder: the
    check creates nothing, so a refused search leaves no empty store behind."""
    path = path.expanduser().resolve()
    probe = _existing(path)
    if probe != path and not probe.is_dir():
        raise ValueError(f"tracking store '{redact(uri)}' cannot be created: '{probe}' is a file, not a folder; "
                         "pass another --tracking-uri")
    folder = probe if probe.is_dir() else probe.parent
    if not os.access(probe, os.W_OK) or not writable_folder(folder):
        raise ValueError(f"tracking store '{redact(uri)}' is not writable ('{probe}' denies writing); "
                         "pass a writable --tracking-uri")


def check_writable(folder: Path, what: str = "output directory", flag: str = "--output-dir") -> None:
    """``folder`` exists and takes files, or can be made: refused before any work (its nearest existing parent is
    tried, nothing is created)."""
    folder = Path(folder).expanduser().resolve()
    probe = _existing(folder)
    if not probe.is_dir() or not writable_folder(probe):
        raise ValueError(f"{what} '{folder}' is not writable; choose another with {flag}")


FREE_FLOOR = 64 * 2**20  # bytes a search writes besides checkpoints: Ray's experiment state, the study, MLflow rows


def check_free_space(folders: dict[str, tuple[Path, str]], largest_model: int) -> None:
    """Each folder's disk has room for a search's writes: refused when it holds less than ``FREE_FLOOR`` plus two
    checkpoints of the largest model (weights and Adam's two moments, 3x its bytes each: the one being written while
    the last is kept). ``folders``: what -> (folder, the flag that moves it). A floor, not an estimate of the whole
    search: it catches a disk that is full before the first trial, where a search died mid-way with a traceback and
    left its state files truncated."""
    import shutil

    need = FREE_FLOOR + 6 * int(largest_model)
    seen = set()
    for what, (folder, flag) in folders.items():
        probe = _existing(Path(folder).expanduser().resolve())
        device = probe.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        free = shutil.disk_usage(probe).free
        if free < need:
            raise ValueError(f"the disk of the {what} '{folder}' has {free / 2**20:.0f} MB free, and a search needs at "
                             f"least {need / 2**20:.0f} MB there (checkpoints of its largest model, Ray's state, the "
                             f"study); free some space, or pass {flag} on another disk")


def _existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists."""
    while not path.exists():
        path = path.parent
    return path


def writable_folder(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: tried (and removed at once), since permission bits do not tell
    for root, read-only mounts or /proc."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _http_answers(uri: str, timeout: float) -> None:
    """An MLflow server answers ``/health`` (200), or its REST API when a proxy hides that; 401/403 count as answers
    (the server wants the credentials MLflow will send). The REST API is asked even when ``/health`` answers:
    MLflow 3 refuses a Host header that is not localhost or a private IP (its DNS-rebinding check) on the API only,
    so a search would pass ``/health`` and fail at its first MLflow call."""
    import urllib.error
    import urllib.request

    parts = urlsplit(redact(uri))  # credentials are not needed to tell whether a server is there
    base = parts.path.rstrip("/")
    status, healthy = 0, False
    for path, query in (("/health", ""), ("/api/2.0/mlflow/experiments/search", "max_results=1")):
        url = urlunsplit(parts._replace(path=base + path, query=query, fragment=""))
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
            if status == 403 and b"Invalid Host header" in e.read(4096):
                raise _WrongService(
                    f"refuses the host name '{parts.hostname}' (HTTP 403 'Invalid Host header', MLflow 3's "
                    "DNS-rebinding check)",
                    f"start it with --allowed-hosts '{parts.hostname},{parts.hostname}:*' (mlflow server --help)",
                ) from None
        except urllib.error.URLError as e:
            raise ConnectionError(str(e.reason)) from None
        if path == "/health":
            healthy = status < 300
        elif healthy or status < 300 or status in (401, 403):  # a proxy may hide the API from an unauthenticated probe
            return
    raise _WrongService(f"answers HTTP {status}, not as an MLflow tracking server")


def _connect(host: str, port: int, timeout: float) -> None:
    with socket.create_connection((host, port), timeout=timeout):
        return


def _find_local_cluster() -> str:
    """The address ``ray.init(address="auto")`` would use ($RAY_ADDRESS, the last `ray start`, a running GCS)."""
    from ray._private.services import canonicalize_bootstrap_address  # Ray's own lookup; no public equivalent

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise ConnectionError("no running Ray cluster found")
    return found


def _within(timeout: float, fn: Callable[[], T], what: str, fix: str) -> T:
    """``fn()`` on a daemon thread, given up after ``timeout`` seconds (socket timeouts do not bound name lookups,
    and a daemon thread left hanging does not hold up the process's exit)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, name="embsize-preflight", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise ValueError(f"{what} does not answer within {timeout:g} s; {fix}")
    if isinstance(box.get("error"), _WrongService):
        raise ValueError(f"{what} {box['error']}; {box['error'].fix or fix}")
    if "error" in box:
        raise ValueError(f"{what} does not answer ({_reason(box['error'])}); {fix}") from None
    return box.get("value")


class _WrongService(Exception):
    """Something answers, but not the service expected (or not to us); ``fix`` replaces the caller's advice."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return "unknown host"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.strip().rstrip(".")
