"""Tracking credentials never reach params, tags, artifacts, output files or logs; inputs are read safely."""
from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from search.cli import main

from ..ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"MLFLOW_TRACKING_TOKEN": "tok-9f3e1c", "MLFLOW_TRACKING_PASSWORD": "pw-77a2d0"}
URI_SECRET = "uri-5b8c4e"


def _calls(tree: ast.AST, module: str, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == name and isinstance(n.func.value, ast.Name) and n.func.value.id == module]


@pytest.mark.parametrize("package", ["pipelines", "search"])
def test_yaml_is_only_safe_loaded_and_torch_loads_weights_only(package):
    """(Pickles remain only in Ray's and the scheduler's own experiment state, in the search's output folder.)"""
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        assert not _calls(tree, "yaml", "load") and not _calls(tree, "yaml", "unsafe_load"), path
        for call in _calls(tree, "torch", "load"):
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{path}:{call.lineno} torch.load without weights_only=True"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'm.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("mlflow server did not start")
    yield url, root
    os.killpg(server.pid, 9)
    server.wait(timeout=30)


@pytest.mark.slow
def test_search_keeps_tracking_credentials_out_of_runs_files_and_logs(
    mlflow_server, ray_session, tmp_path, monkeypatch, capfd, caplog
):
    from mlflow.tracking import MlflowClient

    url, server_root = mlflow_server
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.chdir(tmp_path)
    with_credentials = url.replace("http://", f"http://alice:{URI_SECRET}@")
    caplog.set_level(logging.DEBUG)
    code = main(["-v", "search", "--rows", "3000", "--trials", "2", "--max-epochs", "1", "--no-heuristics",
                 "--name", "sec", "--tracking-uri", with_credentials])
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    secrets = [*SECRETS.values(), URI_SECRET]

    c = MlflowClient(url)
    exp = c.get_experiment_by_name("embsize")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 3  # the parent and two trials
    for run in runs:
        text = repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics)
        assert not [s for s in secrets if s in text], run.info.run_id
    # every file the search wrote (outputs, Ray's experiment state and pickles, search.json) and the server's
    # artifact store: no secret in any byte
    for path in [*(tmp_path / "embsize-out").rglob("*"), *server_root.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert not [s for s in secrets if s.encode() in data], path
    logs = out + err + caplog.text
    assert not [s for s in secrets if s in logs], [ln for ln in logs.splitlines() if any(s in ln for s in secrets)][:5]
