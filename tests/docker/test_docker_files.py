"""docker/: the images, the compose file, the `ray up` cluster YAML and the KubeRay RayJob, checked without a Docker
engine or a Kubernetes cluster (none runs here): the files parse, every command uses flags that the installed
`embsize`, `ray start`, `ray job submit` and `mlflow server` accept, the images' entry points and copied files exist,
published ports bind 127.0.0.1, and no secret is written in a file.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from search.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY")


def env_example() -> dict[str, str]:
    pairs = (ln.split("=", 1) for ln in (DOCKER / ".env.example").read_text().splitlines() if "=" in ln
             and not ln.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with the values of .env.example."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        if name in env:
            return env[name]
        assert op in (":-", "-"), f"${{{name}}} has no default and is missing from docker/.env.example"
        return arg
    return VAR.sub(sub, text)


@cache
def help_flags(*command: str) -> frozenset[str]:
    """The long options that a command's --help lists."""
    out = subprocess.run([str(BIN / command[0]), *command[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", out.stdout))


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]


def check_command(args: list[str]) -> str:
    """Check one command line against the installed tools; returns which tool it is."""
    if args[:2] == ["ray", "start"]:
        unknown = set(flags_of(args[2:])) - help_flags("ray", "start")
    elif args[:3] == ["ray", "job", "submit"]:
        sep = args.index("--")
        unknown = set(flags_of(args[3:sep])) - help_flags("ray", "job", "submit")
        check_command(args[sep + 1:])
    elif args[:2] == ["mlflow", "server"]:
        unknown = set(flags_of(args[2:])) - help_flags("mlflow", "server")
    elif args[:1] == ["embsize"]:
        parsed = build_parser().parse_args(args[1:])  # raises on an unknown flag or a bad value
        assert parsed.command == "search"
        unknown = set()
    else:
        raise AssertionError(f"unexpected command: {args}")
    assert not unknown, f"{' '.join(args[:3])}: unknown flags {sorted(unknown)}"
    return args[0]


@pytest.fixture(scope="module")
def compose() -> dict:
    text = (DOCKER / "docker-compose.yml").read_text()
    return yaml.safe_load(interpolate(text, env_example()))


def test_compose_runs_ray_head_workers_mlflow_postgres_and_a_one_shot_search(compose):
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "search"} <= set(services)
    worker = services["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale ray-worker=N` needs both absent
    assert "ray-head:6379" in " ".join(worker["command"])
    assert services["search"]["restart"] == "no" and "search" in services["search"]["profiles"]
    assert "postgresql://" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "/mlflow" in {v.split(":")[1] for v in services["mlflow"]["volumes"]}  # the artifact volume
    for name, service in services.items():
        if name != "search":
            assert service["healthcheck"]["test"], name


def test_compose_commands_use_real_flags(compose):
    tools = [check_command([str(a) for a in s["command"]]) for s in compose["services"].values() if "command" in s]
    assert tools.count("ray") >= 3 and "mlflow" in tools


def test_compose_health_checks_call_endpoints_that_exist(compose):
    from ray._private import ray_constants

    dashboard = Path(__import__("ray.dashboard", fromlist=["_"]).__file__).parent
    routes = "".join(p.read_text(errors="ignore") for p in dashboard.rglob("*.py"))
    for name, service in compose["services"].items():
        test = service.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")
            for url in re.findall(r"http://localhost:(\d+)(/[\w/]+)", test[3]):
                port, path = int(url[0]), url[1]
                if name.startswith("ray-"):
                    assert f'"{path}"' in routes, f"{name}: Ray has no route {path}"
                    assert port in (8265, ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT), name


def test_compose_ports_bind_localhost_only(compose):
    ports = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert ports
    assert all(str(p).startswith("127.0.0.1:") for p in ports), ports


def test_compose_and_env_example_hold_no_secrets():
    raw = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())  # before interpolation
    checked = 0
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_KEY.search(key):
                assert VAR.fullmatch(str(value)), f"{name}.{key} holds a literal; take it from docker/.env"
                checked += 1
            for password in re.findall(r"://[^:/@]+:([^@]+)@", VAR.sub("<var>", str(value))):  # user:password@
                assert password == "<var>", f"{name}.{key} has a literal password"
                checked += 1
    assert checked >= 3
    example = env_example()
    assert [k for k in example if SECRET_KEY.search(k)]
    for key in (k for k in example if SECRET_KEY.search(k)):
        assert example[key] == "CHANGE_ME", f".env.example {key} must be a placeholder"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_installs_embsize_runs_as_non_root_and_starts_the_console_script(name):
    lines = (DOCKER / name).read_text().replace("\\\n", " ").splitlines()
    instructions = [ln.strip().split(None, 1) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    ignore = [p.strip() for p in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    copied = [arg.split()[:-1] for op, arg in instructions if op == "COPY"]
    for sources in copied:
        for src in sources:
            assert (ROOT / src).exists(), f"{name} copies {src}, which does not exist"
            assert f"!{src}" in ignore, f"{name}.dockerignore leaves {src} out of the build context"
    assert any("pipelines/" in s for s in copied) and any("search/" in s for s in copied)
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    cmd = json.loads(next(arg for op, arg in reversed(instructions) if op == "CMD"))
    assert cmd[0] in scripts  # the console script `pip install .` puts on PATH
    run = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pip install . " in run + " "
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    base = next(arg for op, arg in instructions if op == "FROM")
    if name == "Dockerfile":
        assert re.fullmatch(r"python:3\.12-slim", base)
        assert "--index-url https://download.pytorch.org/whl/cpu torch" in run
    else:  # CUDA base and CUDA torch; Ubuntu 24.04's Python 3.12 matches the CPU image (one Python per cluster)
        assert base == "${CUDA_IMAGE}" and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
        assert "ubuntu24.04" in args["CUDA_IMAGE"]
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])
        cuda = re.search(r"cu(\d+)$", args["TORCH_INDEX"]).group(1)  # cu128: CUDA 12.8
        assert args["CUDA_IMAGE"].split(":")[1].startswith(f"{cuda[:-1]}.{cuda[-1]}."), "CUDA base != torch build"


def test_ray_cluster_yaml_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(dict(config)))  # Ray's own schema check, as `ray up` runs it
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    starts = [shlex.split(part) for c in commands for part in c.split(";") if "ray start" in part]
    assert len(starts) == 2
    for args in starts:
        check_command(args)
    assert "--head" in starts[0] and config["docker"]["image"].endswith("embsize:cpu")


def test_kuberay_rayjob_entrypoint_and_ray_start_params_are_real():
    import ray

    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_command(shlex.split(job["spec"]["entrypoint"]))
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        params = [f"--{k}" for k in group["rayStartParams"]]
        assert not set(params) - help_flags("ray", "start"), params
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["image"].rsplit(":", 1)[1] in ("cpu", "gpu")
            assert all(not SECRET_KEY.search(e["name"]) for e in container.get("env", []))  # secrets via secretRef
    gpu = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
