"""Fail-fast checks of the tracking store and the Ray address, against real sockets and HTTP servers."""
from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from search.preflight import check, check_ray_address, check_tracking, redact, writable_folder

from ..ports import free_port


@pytest.fixture
def http_server():
    """Start a local HTTP server answering every GET with ``status``; yields a starter returning its URL."""
    servers = []

    def start(status: int, paths: tuple[str, ...] = ()) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                code = status if not paths or self.path.split("?")[0] in paths else 404
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers: HTTP requests to it hang until their timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


def test_check_tracking_accepts_a_server_answering_health(http_server):
    check_tracking(http_server(200, ("/health",)), timeout=2)


def test_check_tracking_accepts_rest_api_behind_a_proxy_and_auth(http_server):
    check_tracking(http_server(200, ("/api/2.0/mlflow/experiments/search",)), timeout=2)
    check_tracking(http_server(401), timeout=2)


def test_check_tracking_refuses_a_server_that_is_not_mlflow(http_server):
    url = http_server(404)
    with pytest.raises(ValueError, match=r"answers HTTP 404, not as an MLflow tracking server"):
        check_tracking(url, timeout=2)


class _HostCheck(BaseHTTPRequestHandler):
    """MLflow 3's answers to a Host header it does not allow: /health 200, the REST API 403 with its message."""

    def do_GET(self):
        health = self.path.startswith("/health")
        self.send_response(200 if health else 403)
        self.end_headers()
        self.wfile.write(b"OK" if health else b"Invalid Host header - possible DNS rebinding attack detected")

    def log_message(self, *args):
        pass


def test_check_tracking_refuses_a_server_that_refuses_the_host_name():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostCheck)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ValueError) as e:
            check_tracking(f"http://127.0.0.1:{server.server_address[1]}", timeout=2)
    finally:
        server.shutdown()
        server.server_close()
    assert "refuses the host name '127.0.0.1'" in str(e.value) and "--allowed-hosts '127.0.0.1,127.0.0.1:*'" in str(e.value)


@pytest.mark.slow
def test_check_tracking_names_allowed_hosts_for_a_real_mlflow_server_refusing_the_host(tmp_path):
    """A real `mlflow server --allowed-hosts` that does not list 127.0.0.1: /health answers, the API refuses."""
    from .local_cluster import LocalCluster

    with LocalCluster("es-hosts-", {}) as cl:
        uri = cl.mlflow(allowed_hosts="mlflow.example.com")
        with pytest.raises(ValueError, match=r"refuses the host name '127\.0\.0\.1'.*--allowed-hosts"):
            check_tracking(uri, timeout=10)


def test_check_tracking_refused_connection_names_uri_and_fix():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError) as e:
        check_tracking(uri, timeout=2)
    message = str(e.value)
    assert f"tracking server '{uri}' does not answer" in message and "--tracking-uri" in message
    assert "\n" not in message


def test_check_tracking_silent_server_fails_within_the_timeout(silent_server):
    started = time.perf_counter()
    with pytest.raises(ValueError, match="does not answer"):
        check_tracking(f"http://127.0.0.1:{silent_server}", timeout=1)
    assert time.perf_counter() - started < 5  # bounded: one timeout, not the OS default of minutes


def test_check_tracking_message_hides_credentials():
    with pytest.raises(ValueError) as e:
        check_tracking(f"http://alice:s3cret@127.0.0.1:{free_port()}", timeout=2)
    assert "s3cret" not in str(e.value) and "alice" not in str(e.value)


def test_check_tracking_unknown_host_fails_fast():
    with pytest.raises(ValueError, match="does not answer"):
        check_tracking("http://no-such-host.invalid:5000", timeout=3)


def test_check_tracking_sqlite_store_is_checked_without_creating_it(tmp_path):
    check_tracking(f"sqlite:///{tmp_path / 'a' / 'b' / 'mlflow.db'}")
    assert list(tmp_path.iterdir()) == []  # nothing created
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_tracking(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")


def test_check_tracking_refuses_an_unwritable_store():
    with pytest.raises(ValueError, match="is not writable"):
        check_tracking("sqlite:////proc/embsize/mlflow.db")  # /proc refuses new files, even to root


@pytest.mark.parametrize("uri", ["./mlruns", "/tmp/embsize-mlruns", "file:///tmp/embsize-mlruns"])
def test_check_tracking_refuses_a_file_store_mlflow_3_cannot_open(uri):
    import mlflow

    if int(mlflow.__version__.split(".")[0]) < 3:
        pytest.skip("MLflow 2 still opens its file store")
    with pytest.raises(ValueError, match=r"is a folder, MLflow's file store.* --tracking-uri sqlite:///.*/mlflow\.db"):
        check_tracking(uri)


def test_check_tracking_refuses_a_scheme_mlflow_has_no_store_for():
    with pytest.raises(ValueError, match=r"has scheme 'bogus', for which MLflow has no store; pass sqlite:///PATH"):
        check_tracking("bogus://host/x")
    check_tracking("databricks://profile")  # known to MLflow: left to it


def test_check_tracking_existing_needs_the_sqlite_store_and_creates_none(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    check_tracking(uri)  # a search may create it
    with pytest.raises(ValueError, match=r"no MLflow store at .*run `embsize search` here first"):
        check_tracking(uri, existing=True)  # report/confirm only read runs
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").write_bytes(b"")
    check_tracking(uri, existing=True)


def test_check_tracking_database_store_is_connected_to():
    with pytest.raises(ValueError, match=r"tracking database 'postgresql://127\.0\.0\.1:\d+/db' does not answer"):
        check_tracking(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", timeout=2)


def test_check_ray_address_accepts_a_listening_ray_client_port(silent_server):
    check_ray_address(f"ray://127.0.0.1:{silent_server}", timeout=2)  # Ray client's own protocol: ray.init checks it


@pytest.mark.parametrize("server", ["silent", "http"])
def test_check_ray_address_refuses_a_port_that_is_not_a_gcs(server, silent_server, http_server, monkeypatch):
    """A port that answers TCP but is no Ray head's GCS (the dashboard's 8265, an HTTP server) is refused within
    the probe's bound, naming the address and the port to give; ray.init retried it for minutes."""
    import search.preflight

    monkeypatch.setattr(search.preflight, "GCS_IMPORT_S", 3.0)
    port = silent_server if server == "silent" else int(http_server(200).rsplit(":", 1)[1])
    started = time.monotonic()
    with pytest.raises(ValueError) as e:
        check_ray_address(f"127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - started < 15
    assert f"Ray cluster at '127.0.0.1:{port}' answers, but not as a Ray head's GCS" in str(e.value)
    assert "ray start --head --port PORT" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def token_head():
    """A real Ray head with token authentication (its own random token, never ~/.ray's)."""
    from .local_cluster import LocalCluster

    with LocalCluster("es-pf-") as cl:
        yield cl.head(), cl.env["RAY_AUTH_TOKEN"]


@pytest.mark.slow
@pytest.mark.parametrize("mode, token, reason", [
    ("token", "head", None),
    (None, None, "RAY_AUTH_MODE is not 'token' here"),
    ("token", "0" * 32, "the token here is not the head's"),
])
def test_check_ray_address_asks_the_gcs_whether_this_client_may_join(token_head, monkeypatch, mode, token, reason):
    address, head_token = token_head
    for name, value in (("RAY_AUTH_MODE", mode), ("RAY_AUTH_TOKEN", head_token if token == "head" else token)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if reason is None:
        check_ray_address(address)
        return
    with pytest.raises(ValueError) as e:
        check_ray_address(address)
    assert f"Ray cluster at '{address}' refuses this client: it uses token authentication, and {reason}" in str(e.value)
    assert "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=" in str(e.value)


@pytest.mark.slow
def test_search_without_the_clusters_token_is_one_line_and_writes_nothing(token_head, tmp_path):
    """The CLI: refused before the data load in one line, exit 2 (was ~20 s of Ray's C++ warnings, then a traceback
    and exit 1)."""
    import subprocess
    import sys
    from pathlib import Path

    address, _ = token_head
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    done = subprocess.run([str(Path(sys.executable).parent / "embsize"), "search", "--address", address, "--rows",
                           "2000", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"embsize: error: Ray cluster at '{address}' refuses this client: it uses token authentication, and "
        "RAY_AUTH_MODE is not 'token' here; export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the head's "
        "`ray get-auth-token`> (or put it in ~/.ray/auth_token)"]
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", [None, "local"])
def test_check_ray_address_local_needs_nothing(address):
    check_ray_address(address)


def test_check_ray_address_refused_names_address_and_fix():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ValueError) as e:
        check_ray_address(address, timeout=2)
    assert f"Ray cluster at '{address}' does not answer" in str(e.value)
    assert "ray start --head" in str(e.value) and "--address" in str(e.value)


@pytest.mark.parametrize("address", ["nohost", "host:port", "host:0", "host:70000", ":6379", "http://127.0.0.1:8265",
                                     "https://head:8265"])
def test_check_ray_address_malformed(address):
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        check_ray_address(address)


def test_check_ray_address_auto_follows_ray_address_env(monkeypatch):
    """``auto`` uses Ray's own lookup, where $RAY_ADDRESS comes first; a stale address fails naming it."""
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match=rf"Ray cluster at '[0-9.]+:{port}' \(found by --address auto\)"):
        check_ray_address("auto", timeout=5)


def test_check_runs_both_checks(tmp_path):
    with pytest.raises(ValueError, match="Ray cluster"):
        check(f"sqlite:///{tmp_path / 'm.db'}", f"127.0.0.1:{free_port()}", timeout=2)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("https://user:pw@host:5000/path?x=1", "https://host:5000/path?x=1"),
        ("http://token@host", "http://host"),
        ("http://host:5000", "http://host:5000"),
        ("sqlite:////a/b.db", "sqlite:////a/b.db"),
        ("postgresql://u:p@[::1]:5432/db", "postgresql://[::1]:5432/db"),
    ],
)
def test_redact_drops_credentials(uri, expected):
    assert redact(uri) == expected


def test_writable_folder_leaves_nothing(tmp_path):
    assert writable_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert not writable_folder(tmp_path / "missing")


def test_a_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    # stored resolved in search.json and the recipe: a resume or review from another folder finds the same store
    from search.preflight import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path.resolve() / 'rel.db'}"
    assert resolve_tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path.resolve() / 'sub' / 'm.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'env.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
