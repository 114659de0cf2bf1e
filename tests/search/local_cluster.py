"""A real multi-node Ray cluster and MLflow server on this machine, for the cluster and node-loss tests.

`ray start --head` and `ray start --address` as further nodes, each with its own CPUs, plus `mlflow server` (SQLite)
on localhost. Every process gets its own process group, a private temp dir, free ports and a random auth token, and
is stopped by process group (then any stray naming the temp dir is killed): Ray instances of other people on the
machine are never touched, as `ray stop` would.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from ..ports import free_port

BIN = Path(sys.executable).parent
NODE_PORTS = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
              "metrics-export")
UP_TIMEOUT_S = 240  # a node joining a loaded 2-core machine has taken 90+ s


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class LocalCluster:
    """``with LocalCluster(...) as cl: cl.head(); cl.worker(); cl.mlflow()`` and everything is gone afterwards.

    ``node_env``: extra environment of the Ray nodes (and so of the trials they run); ``gpus``: fake GPUs each node
    advertises."""

    def __init__(self, prefix: str, node_env: dict | None = None, gpus: int = 0, object_store: int = 200_000_000):
        # Ray's unix socket paths must stay short: a private dir directly under /tmp, not pytest's deep tmp_path
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "EMBSIZE_"))}
        # token auth on our own cluster only: a random token, never the user's ~/.ray one
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, PYTHONUNBUFFERED="1",
                        PYTHONWARNINGS="ignore")
        self.node_env = {**self.env, **(node_env or {})}
        self.gpus, self.object_store = gpus, object_store
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = self.tracking = ""
        self._ports: set[int] = set()

    def _port(self) -> int:
        """A free port not handed out before: the OS may return a port again once its probe socket closed, and Ray
        refuses to start when two of its components share one."""
        while (port := free_port()) in self._ports:
            pass
        self._ports.add(port)
        return port

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True)
        self.procs[name] = p
        return p

    def _node(self, name: str, where: list[str]) -> None:
        args = ["--block", "--num-cpus=1", f"--num-gpus={self.gpus}", f"--object-store-memory={self.object_store}",
                "--disable-usage-stats", f"--temp-dir={self.root / 'ray'}",
                *(f"--{p}-port={self._port()}" for p in NODE_PORTS)]
        self._spawn(name, [str(BIN / "ray"), "start", *where, *args], self.node_env)

    def head(self) -> str:
        port = self._port()
        self.address = f"127.0.0.1:{port}"
        self._node("head", ["--head", f"--port={port}", "--include-dashboard=false"])
        self.wait("Ray head", lambda: self.alive_nodes(1))
        return self.address

    def worker(self, name: str = "worker") -> list[str]:
        """Add a node; returns the ids of all alive nodes once it has joined."""
        want = len(self.alive_nodes(1)) + 1
        self._node(name, [f"--address={self.address}"])
        return self.wait(f"Ray node {name}", lambda: self.alive_nodes(want))

    def mlflow(self, allowed_hosts: str | None = None, port: int | None = None) -> str:
        """`mlflow server` on a free port, or on ``port`` again (a server restarted after ``kill("mlflow")``)."""
        port = port or self._port()
        extra = ["--allowed-hosts", allowed_hosts] if allowed_hosts else []
        self._spawn("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'm.db'}",
                               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", *extra], self.env)
        self.tracking = f"http://127.0.0.1:{port}"
        self.wait("MLflow server", lambda: http_ok(f"{self.tracking}/health"))
        return self.tracking

    def alive_nodes(self, want: int) -> list[str]:
        """Ids of the cluster's alive nodes once there are at least ``want`` of them, else []."""
        code = ("import json, ray; ray.init(address=%r); "
                "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))") % self.address
        try:
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            return []
        nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
        return nodes if len(nodes) >= want else []

    def wait(self, what: str, ready, timeout: float = UP_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}\n{self.log_tails()}")
            time.sleep(1)
        raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{self.log_tails()}")

    def log_tails(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(self.root.glob("*.log")))

    def kill(self, name: str) -> None:
        """SIGKILL a node's whole process group: its `ray start`, raylet and the trial workers on it."""
        try:
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[name].wait()

    def stop(self) -> None:
        """SIGTERM each process group, then SIGKILL what is left (Ray drains for up to 30 s otherwise), then any
        process of ours that left its group (its command line names our temp dir)."""
        procs = list(self.procs.values())
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
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(self.root).encode() in (proc / "cmdline").read_bytes() and int(proc.name) != os.getpid():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue
        shutil.rmtree(self.root, ignore_errors=True)
        left = [n for n, p in self.procs.items() if _group_alive(p.pid)]
        assert not left, f"processes of {left} left running"
