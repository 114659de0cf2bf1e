"""Cluster needs of a search (search/cluster.py), and a real two-node Ray cluster with a real MLflow server.

The two-node cluster runs on this machine: `ray start --head` and `ray start --address` as a second node, each with
one CPU and one advertised (fake) GPU, plus `mlflow server` on localhost. Every process is started in its own process
group with a private temp dir, ports and auth token, and killed by process group afterwards, so Ray instances of
other people on the machine are never touched (`ray stop` would stop them all).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from search.cli import main
from search.cluster import (
    check_fits,
    check_gpus_per_trial,
    check_storage_path,
    check_tracking_uri,
    is_uri,
    read_marker,
    storage_path,
)

BIN = Path(sys.executable).parent
TWO_NODES = [{"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 1.0}},
             {"NodeID": "b" * 56, "Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}]


@pytest.mark.parametrize("gpus", [0, 0.25, 0.5, 1, 2, 4])
def test_check_gpus_per_trial_accepts_fractions_and_whole_numbers(gpus):
    assert check_gpus_per_trial(gpus) == gpus


@pytest.mark.parametrize("gpus", [-1, -0.25, math.nan, math.inf, 1.5])
def test_check_gpus_per_trial_refuses_negative_nan_and_split_gpus(gpus):
    with pytest.raises(ValueError, match=r"--gpus-per-trial is"):
        check_gpus_per_trial(gpus)


@pytest.mark.parametrize("value", ["nan", "-0.5", "1.5"])
def test_cli_refuses_bad_gpus_per_trial_in_one_line(value, capsys, tmp_path):
    code = main(["search", "--gpus-per-trial", value, "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"embsize: error: --gpus-per-trial is {float(value)}") and err.count("\n") == 1


@pytest.mark.parametrize("uri", ["sqlite:////tmp/m/mlflow.db", "file:///tmp/mlruns", "./mlruns"])
def test_check_tracking_uri_refuses_local_store_on_two_nodes(uri):
    with pytest.raises(ValueError, match=r"is a local MLflow store, but the Ray cluster has 2 nodes.*--tracking-uri"):
        check_tracking_uri(uri, nodes=2)
    check_tracking_uri(uri, nodes=1)  # one machine: the local store is fine


def test_check_tracking_uri_accepts_a_server_on_many_nodes():
    check_tracking_uri("http://mlflow:5000", nodes=8)
    check_tracking_uri("https://user@mlflow.example.com", nodes=8)


def test_check_storage_path_refuses_the_default_local_folder_on_two_nodes(tmp_path):
    with pytest.raises(ValueError, match=r"is the default local folder, but the Ray cluster has 2 nodes.*--storage-"):
        check_storage_path(str(tmp_path), TWO_NODES, explicit=False)
    check_storage_path(str(tmp_path), TWO_NODES[:1], explicit=False)  # one node: local is fine


def test_storage_path_defaults_to_output_folder_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage_path(None, tmp_path / "out" / "ray") == str(tmp_path / "out" / "ray")
    assert storage_path("shared/ray", tmp_path / "x") == str(tmp_path / "shared" / "ray")
    assert storage_path("file:///mnt/nfs/ray", tmp_path) == "/mnt/nfs/ray"
    assert storage_path("s3://bucket/embsize?endpoint_override=minio:9000", tmp_path).startswith("s3://bucket/")
    assert is_uri("gs://b/p") and not is_uri("/mnt/nfs") and not is_uri("file:///mnt/nfs")


def test_check_fits_refuses_trials_no_node_can_hold():
    check_fits(TWO_NODES, cpus_per_trial=1, gpus_per_trial=0.25)
    check_fits(TWO_NODES, cpus_per_trial=1, gpus_per_trial=1)
    with pytest.raises(ValueError, match=r"--gpus-per-trial is 2, but the largest Ray node has 1 GPUs"):
        check_fits(TWO_NODES, cpus_per_trial=1, gpus_per_trial=2)
    with pytest.raises(ValueError, match=r"--cpus-per-trial is 1.5, but the largest Ray node has 1 CPUs"):
        check_fits(TWO_NODES, cpus_per_trial=1.5, gpus_per_trial=0)
    with pytest.raises(ValueError, match=r"--gpus-per-trial is 0.5, but the largest Ray node has 0 GPUs"):
        check_fits(TWO_NODES[:1], cpus_per_trial=1, gpus_per_trial=0.5)


def test_read_marker_is_none_where_the_file_is_not_visible(tmp_path):
    (tmp_path / "m").write_text("token")
    assert read_marker(str(tmp_path / "m")) == "token"
    assert read_marker(str(tmp_path / "elsewhere" / "m")) is None


def test_storage_probe_runs_on_every_node_and_cleans_up(ray_session, tmp_path):
    from search.cluster import _nodes_not_seeing, alive_nodes

    nodes = alive_nodes()
    assert _nodes_not_seeing(str(tmp_path / "shared"), nodes) == []
    assert list((tmp_path / "shared").iterdir()) == []  # the marker is removed


def test_trial_device_is_cpu_without_a_gpu_assignment(ray_session):
    from search.cluster import placement, trial_device

    @ray_session.remote(num_cpus=1)
    def where():
        return trial_device(), placement()

    device, place = ray_session.get(where.remote())
    assert device == "cpu"
    assert place["gpu_ids"] == ""
    assert place["node_id"] == ray_session.get_runtime_context().get_node_id()


def test_trial_device_falls_back_to_cpu_when_ray_assigns_a_gpu_without_cuda():
    # a Ray of its own that advertises one (fake) GPU: a 0.25-GPU task is scheduled and given GPU 0, and with no CUDA
    # here the trial trains on the CPU
    code = (
        "import json, os, ray\n"
        "ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)\n"
        "from search.cluster import placement, trial_device\n"
        "f = ray.remote(num_gpus=0.25)(\n"
        "    lambda: (trial_device(), placement()['gpu_ids'], os.environ['CUDA_VISIBLE_DEVICES']))\n"
        "print(json.dumps(ray.get(f.remote())))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["cpu", "0", "0"]


# --- a real two-node cluster and MLflow server on this machine (slow) ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each process group we started, then SIGKILL what is left (Ray drains for up to 30 s otherwise)."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_alive(p.pid) for p in procs):
            time.sleep(0.2)
    for p in procs:
        p.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_using(root: Path) -> list[int]:
    """Pids whose command line names our private temp dir (so they are ours: Ray passes it to every process)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(root).encode() in (proc / "cmdline").read_bytes() and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _node_args(temp: str) -> list[str]:
    ports = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
             "metrics-export")
    return ["--block", "--num-cpus=1", "--num-gpus=1", "--object-store-memory=200000000", "--disable-usage-stats",
            f"--temp-dir={temp}", *(f"--{p}-port={_free_port()}" for p in ports)]


def _alive_nodes(address: str, env: dict, want: int = 1) -> list[str]:
    """Ids of the cluster's alive nodes once there are ``want`` of them, else []."""
    code = "import json, ray; ray.init(address=%r); print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
    out = subprocess.run([sys.executable, "-c", code % address], env=env, capture_output=True, text=True, timeout=60)
    nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
    return nodes if len(nodes) >= want else []


def _wait(what: str, ready, timeout: float, procs: list[subprocess.Popen], logs: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(1)
    tails = "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(logs.glob("*.log")))
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tails}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node (1 CPU + 1 fake GPU each) and an MLflow server; yields addresses, node ids, env."""
    # Ray's unix socket paths must stay short: a private dir directly under /tmp, not pytest's deep tmp_path
    root = Path(tempfile.mkdtemp(prefix="es-cl-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    # token auth on our own cluster only: a random token, never the user's ~/.ray one
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []

    # Trials on 6000 rows take a second, less than a Ray worker takes to start on the second node: with the trial
    # fault hook's pause after each epoch (trial.py), one node cannot finish every trial before the other joins in.
    node_env = {**env, "EMBSIZE_FAULT_INJECT": "sleep=3"}

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(root / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=node_env if name != "mlflow" else env,
                             cwd=root, start_new_session=True)
        procs.append(p)
        return p

    try:
        port, mlflow_port = _free_port(), _free_port()
        address = f"127.0.0.1:{port}"
        spawn("head", [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
                       *_node_args(str(root / "ray"))])
        spawn("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'm.db'}",
                         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                         "--port", str(mlflow_port), "--workers", "1"])
        _wait("Ray head", lambda: _alive_nodes(address, env), 180, procs, root)
        spawn("worker", [str(BIN / "ray"), "start", f"--address={address}", *_node_args(str(root / "ray"))])
        nodes = _wait("Ray worker node", lambda: _alive_nodes(address, env, want=2), 180, procs, root)
        tracking = f"http://127.0.0.1:{mlflow_port}"
        _wait("MLflow server", lambda: _http_ok(f"{tracking}/health"), 240, procs, root)
        yield {"address": address, "nodes": nodes, "tracking": tracking, "env": env, "root": root}
    finally:
        _stop(procs)
        strays = _processes_using(root)  # anything of ours that left its process group
        for pid in strays:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert not [p.pid for p in procs if _group_alive(p.pid)], "Ray or MLflow processes left running"


def _embsize(cluster: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "embsize"), "search", "--address", cluster["address"], "--rows", "6000", "--seed", "3", *args]
    return subprocess.run(cmd, env=cluster["env"], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_cluster_search_runs_trials_on_both_nodes_and_tracks_every_run_in_the_server(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    shared = tmp_path / "shared-ray"  # on one machine every node sees it; the probe checks that it does
    done = _embsize(cluster, tmp_path, "--name", "two-nodes", "--trials", "6", "--max-epochs", "2", "--no-heuristics",
                    "--scheduler", "fifo", "--tracking-uri", cluster["tracking"], "--storage-path", str(shared),
                    "--gpus-per-trial", "0.5", "--gpu-batch-size", "2048", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    c = MlflowClient(cluster["tracking"])
    exp = c.get_experiment_by_name("embsize")
    parent = c.search_runs([exp.experiment_id], "tags.`embsize.kind` = 'search'")[0]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"recommended.yaml", "front.csv", "trials.csv"}
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = (tmp_path / "out" / "two-nodes" / "trials.csv").read_text().strip().splitlines()[1:]
    assert len(children) == len(trials) == 6
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["node_id"] for r in children} == set(cluster["nodes"])  # both nodes trained trials
    # each trial held half a (fake) GPU, and with no CUDA here fell back to the CPU; the GPU batch size applied
    assert {(r.data.tags["gpu_ids"], r.data.tags["device"]) for r in children} == {("0", "cpu")}
    recipe = yaml.safe_load((tmp_path / "out" / "two-nodes" / "recommended.yaml").read_text())
    assert recipe["train"]["batch_size"] == 2048
    assert (shared / "two-nodes").is_dir()  # Ray Tune wrote the experiment to the shared storage
    assert not list(shared.glob(".embsize-probe-*"))


@pytest.mark.slow
def test_cluster_search_refuses_a_local_tracking_store(cluster, tmp_path):
    done = _embsize(cluster, tmp_path, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--storage-path",
                    str(tmp_path / "shared"))
    last = done.stderr.strip().splitlines()[-1]  # MLflow may log INFO lines before (creating the SQLite store)
    assert done.returncode == 2
    assert last.startswith("embsize: error: tracking URI 'sqlite:")
    assert "is a local MLflow store, but the Ray cluster has 2 nodes" in last
    assert not (tmp_path / "shared").exists()  # refused before any trial wrote anything


@pytest.mark.slow
def test_cluster_search_refuses_the_default_local_storage(cluster, tmp_path):
    done = _embsize(cluster, tmp_path, "--tracking-uri", cluster["tracking"])
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2
    assert last.startswith("embsize: error: Ray storage path ")
    assert "is the default local folder, but the Ray cluster has 2 nodes" in last and "--storage-path" in last
