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
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from search.cli import main
from search.cluster import (
    check_fits,
    check_gpus_per_trial,
    check_storage_path,
    check_tracking_uri,
    experiment_path,
    is_uri,
    read_marker,
    storage_path,
)

from .local_cluster import BIN, LocalCluster

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


def test_the_experiment_goes_under_the_storage_path_before_a_uris_query():
    """As Ray Tune joins them: a resume and the checkpoint pruner look where Ray wrote (not at s3://b/dir?q/NAME)."""
    from ray.air._internal.uri_utils import URI  # Ray's own join, private: checked here, not imported by the code

    for storage in ["s3://bucket/dir?endpoint_override=127.0.0.1:9000&scheme=http", "s3://bucket", "gs://b/p/"]:
        assert experiment_path(storage, "exp") == str(URI(storage) / "exp")
    assert experiment_path("/mnt/nfs/ray", "exp") == Path("/mnt/nfs/ray/exp")


def test_check_fits_refuses_trials_no_node_can_hold():
    check_fits(TWO_NODES, cpus_per_trial=1, gpus_per_trial=0.25)
    check_fits(TWO_NODES, cpus_per_trial=1, gpus_per_trial=1)
    with pytest.raises(ValueError, match=r"--gpus-per-trial is 2, but the largest Ray node has 1 GPUs"):
        check_fits(TWO_NODES, cpus_per_trial=1, gpus_per_trial=2)
    with pytest.raises(ValueError, match=r"--cpus-per-trial is 1.5, but the largest Ray node has 1 CPUs"):
        check_fits(TWO_NODES, cpus_per_trial=1.5, gpus_per_trial=0)
    with pytest.raises(ValueError, match=r"--gpus-per-trial is 0.5, but the largest Ray node has 0 GPUs"):
        check_fits(TWO_NODES[:1], cpus_per_trial=1, gpus_per_trial=0.5)


def test_an_oversized_trial_on_a_cluster_that_can_grow_is_refused_only_when_no_node_type_holds_it(
        ray_session, tmp_path, caplog):
    """`--address` to a cluster whose nodes are all smaller than a trial: Ray Tune waits for a node that big. The v2
    autoscaler publishes its node types in the GCS; written here as it writes them, into this session's real GCS."""
    import logging

    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from search.cluster import check_cluster

    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()
    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    uri, storage = f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "ray")

    def publish(*types: tuple[str, int, int]) -> None:
        config = autoscaler_pb2.ClusterConfig()
        for name, cpus, most in types:
            group = config.node_group_configs.add()
            group.name, group.max_count = name, most
            group.resources["CPU"] = cpus
        _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)

    try:
        # nodes joined by hand, no autoscaler's types: nobody can tell, so the search waits, and says how it ends
        with caplog.at_level(logging.WARNING, logger="search.cluster"):
            check_cluster(uri, storage, False, cpus_per_trial=8, can_grow=True)
        assert "trials wait until such a node joins" in caplog.text and "Ctrl-C stops the search" in caplog.text
        publish(("small", 4, 10), ("big", 16, 0))  # a type it may add none of does not count
        with pytest.raises(ValueError, match=r"^--cpus-per-trial is 8, but the largest Ray node has 2 CPUs, and no "
                                             r"node type the cluster's autoscaler may add holds a trial \(its types: "
                                             r"small \(4 CPUs\)\); lower --cpus-per-trial"):
            check_cluster(uri, storage, False, cpus_per_trial=8, can_grow=True)
        publish(("small", 4, 10), ("big", 16, -1))  # -1: as many as it likes
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="search.cluster"):
            check_cluster(uri, storage, False, cpus_per_trial=8, can_grow=True)
        assert "trials wait until the cluster's autoscaler adds a node of type big" in caplog.text
        with pytest.raises(ValueError, match=r"^--cpus-per-trial is 8, but the largest Ray node has 2 CPUs; lower"):
            check_cluster(uri, storage, False, cpus_per_trial=8, can_grow=False)  # a Ray this process started
    finally:
        _internal_kv_del(key, namespace=namespace)


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


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node (1 CPU + 1 fake GPU each) and an MLflow server; yields addresses, node ids, env."""
    # Trials on 6000 rows take a second, less than a Ray worker takes to start on the second node: with the trial
    # fault hook's pause after each epoch (trial.py), one node cannot finish every trial before the other joins in.
    with LocalCluster("es-cl-", {"EMBSIZE_FAULT_INJECT": "sleep=3"}, gpus=1) as cl:
        address = cl.head()
        nodes = cl.worker()
        tracking = cl.mlflow()
        yield {"address": address, "nodes": nodes, "tracking": tracking, "env": cl.env, "root": cl.root}


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
    # refused before anything was written: no trial output, no search folder, no store
    assert not (tmp_path / "shared").exists() and not (tmp_path / "embsize-out").exists()
    assert not (tmp_path / "m.db").exists()
    assert "outputs ->" not in done.stdout  # nor a line announcing outputs (it came before the refusal)


@pytest.mark.slow
def test_cluster_search_refuses_the_default_local_storage(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cluster["tracking"])

    def runs() -> int:
        exp = c.get_experiment_by_name("embsize")
        return 0 if exp is None else len(c.search_runs([exp.experiment_id], max_results=1000))

    before = runs()
    done = _embsize(cluster, tmp_path, "--tracking-uri", cluster["tracking"])
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2
    assert last.startswith("embsize: error: Ray storage path ")
    assert "is the default local folder, but the Ray cluster has 2 nodes" in last and "--storage-path" in last
    assert not (tmp_path / "embsize-out").exists()  # no search folder (search.json) ...
    assert runs() == before  # ... and no FAILED parent run in the server
    assert "outputs ->" not in done.stdout


class _Space:  # the one SearchSpace method TrialResources reads: a config's model bytes
    def bytes(self, config):
        return config["bytes"]


def test_trial_resources_ask_for_the_memory_training_takes_in_whole_gib_capped_at_the_largest_node():
    from pipelines.memory import training_copies
    from search.cluster import GIB, WORKER_BYTES, TrialResources, largest_memory

    node = largest_memory([{"Resources": {"CPU": 2.0, "memory": 10 * GIB}},
                           {"Resources": {"CPU": 2.0, "memory": 12.5 * GIB}}, {"Resources": {"CPU": 1.0}}])
    assert node == 12.5 * GIB
    r = TrialResources(_Space(), cpus=1, gpus=0, data_bytes=100_000_000, node_memory=node)
    small, other_small = {"bytes": 1_000_000}, {"bytes": 40_000_000}
    assert r.memory(small) == WORKER_BYTES + 2 * 100_000_000 + 1_000_000 * training_copies()
    # every small model asks the same: Tune reuses an actor for an equal request only
    assert r.request(small) == r.request(other_small) == GIB
    big = {"bytes": 1_700_000_000}  # fastai's 600 dims over a 700k-user vocabulary
    assert r.request(big) == math.ceil(r.memory(big) / GIB) * GIB > 2 * 4 * GIB  # two would not fit a 16 GB laptop
    assert r.request({"bytes": 4_000_000_000}) == 12.5 * GIB  # over every node: runs alone, never waits forever
    bundle = r(big).bundles[0]
    assert bundle == {"CPU": 1, "memory": r.request(big)}
    gpu = TrialResources(_Space(), cpus=1, gpus=0.5, data_bytes=0, node_memory=None)
    assert gpu(big).bundles[0]["GPU"] == 0.5
    assert gpu.memory(big) == WORKER_BYTES + 2 * 1_700_000_000  # the model trains on the device
    lazy = TrialResources(_Space(), cpus=1, gpus=0, data_bytes=0, node_memory=None, sparse=True)
    assert lazy.memory(big) == WORKER_BYTES + (training_copies() - 1) * 1_700_000_000  # no full-table gradient
    assert largest_memory([{"Resources": {"CPU": 1.0}}]) is None


def test_a_local_search_warms_its_workers_only_where_every_cpu_will_hold_a_trial():
    """Warm workers (each ~240 MB of torch imported at Ray's start) only where each would get a trial: one CPU and no
    GPU per trial, no concurrency cap, and the space's largest model asking for the smallest memory request."""
    from pipelines.dataset import FeatureInfo
    from search.runner import SearchSettings, _warm_workers
    from search.space import SearchSpec, build_space

    small = build_space([FeatureInfo("user", False, 944), FeatureInfo("item", False, 1683)], SearchSpec())
    users = build_space([FeatureInfo("user", False, 700_000), FeatureInfo("item", False, 50_000)], SearchSpec())
    settings = SearchSettings(name="w")
    assert _warm_workers(small, settings, data_bytes=2_000_000)
    assert not _warm_workers(small, replace(settings, cpus_per_trial=2), 2_000_000)  # idle CPUs between trials
    assert not _warm_workers(small, replace(settings, gpus_per_trial=0.5), 2_000_000)  # the GPUs cap concurrency
    assert not _warm_workers(small, replace(settings, max_concurrent=1), 2_000_000)
    assert not _warm_workers(small, settings, data_bytes=400_000_000)  # the data alone makes requests > 1 GiB
    assert users.max_bytes() > 100_000_000 and not _warm_workers(users, settings, 2_000_000)


def test_tunes_trial_actor_environment_is_emptied_only_while_a_search_runs():
    """The runtime environment Tune gives trial actors is emptied around Tuner.fit only (a later search, maybe on a
    cluster, gets Tune's own again), and the driver's AWS credentials stay on a Ray the process did not start."""
    from ray.tune.execution import class_cache

    from search.cluster import trial_actors_in_prestarted_workers

    before = dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)
    assert "PL_DISABLE_FORK" in before[0] and "AWS_ACCESS_KEY_ID" in before[1]
    with trial_actors_in_prestarted_workers(ray_started_here=True):
        assert class_cache.DEFAULT_ENV_VARS == {} and not class_cache.ENV_VARS_TO_PROPAGATE
    assert (dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)) == before
    with pytest.raises(RuntimeError), trial_actors_in_prestarted_workers(ray_started_here=False):
        assert class_cache.ENV_VARS_TO_PROPAGATE == before[1] and "PL_DISABLE_FORK" not in class_cache.DEFAULT_ENV_VARS
        raise RuntimeError("a failed fit")
    assert (dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)) == before


MEMORY_SCRIPT = """
import json, logging, sys, time
import ray
from pipelines import prepare
from pipelines.load import load
from search.runner import SearchSettings, run_search
from search.space import SearchSpec, build_space

out = sys.argv[1]
data = prepare(load("synthetic", synthetic_rows=20_000, seed=0), seed=0)
space = build_space(data.features, SearchSpec(max_dim=8))
report = {}
for label, memory in (("roomy", 4 << 30), ("below_one_trial", 600 << 20)):
    ray.init(num_cpus=2, _memory=memory, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    running, most, outcomes = set(), 0, []

    def on_event(kind, trial, result):
        global most
        if kind == "start":
            running.add(trial.trial_id)
            most = max(most, len(running))
        elif kind in ("completed", "stopped_early", "failed"):
            running.discard(trial.trial_id)
            outcomes.append(kind)

    # batches of 8: a trial trains for seconds (longer than a second worker takes to start), so two that may run
    # together do
    settings = SearchSettings(name=label, trials=3, max_epochs=2, patience=0, scheduler="fifo", heuristics=False,
                              batch_size=8,
                              tracking_uri=f"sqlite:///{out}/mlflow.db", output_dir=out, seed=0)
    started = time.monotonic()
    result = run_search(data, space, settings, on_event=on_event)
    report[label] = {"most_at_once": most, "outcomes": outcomes, "trials": len(result.trials),
                     "seconds": time.monotonic() - started}
    ray.shutdown()
print(json.dumps(report))
"""


@pytest.mark.slow
def test_trials_run_at_once_only_while_the_memory_they_ask_for_fits_the_node(tmp_path):
    """Ray places each trial by the memory its config takes to train (TrialResources), not by CPUs alone. A real
    local Ray with 2 CPUs and a set ``memory`` resource: with room for two small trials (1 GiB requests), two run at
    once; with less than one, each still runs (its request capped to the node's memory), alone. (Before the memory
    requests, two ran at once on any node.)"""
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=900,
                          env={**os.environ, "RAY_AIR_NEW_OUTPUT": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    for label, run in report.items():
        assert run["trials"] == 3 and run["outcomes"] == ["completed"] * 3, (label, run)
    assert report["roomy"]["most_at_once"] == 2, report  # trials overlap where memory allows
    assert report["below_one_trial"]["most_at_once"] == 1, report
    assert "more than the largest Ray node's" in done.stderr, done.stderr[-3000:]


WARM_SCRIPT = """
import json, os, sys, time
from pipelines import prepare
from pipelines.load import load
from search import cluster
from search.runner import SearchSettings, run_search
from search.space import SearchSpec, build_space

def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]

def cmdline(pid):
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().replace(chr(0), " ")

def idle_workers():  # the workers of the raylet this process started that have run nothing yet
    return {w for p in children(os.getpid()) for w in children(p) if cmdline(w).startswith("ray::IDLE")}

def has_torch(pid):
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch_cpu" in f.read()

seen = {}
start_local_ray = cluster.start_local_ray

def spy(warm, **kwargs):  # the search's own start of Ray, then a look at its idle workers once they are ready
    start_local_ray(warm, **kwargs)
    seen["env_after_start"] = os.environ.get("RAY_preload_python_modules")
    deadline = time.monotonic() + 120
    while not (len(idle_workers()) == 2 and all(map(has_torch, idle_workers()))) and time.monotonic() < deadline:
        time.sleep(0.2)
    seen["prestarted"] = sorted(idle_workers())
    seen["with_torch"] = sorted(p for p in idle_workers() if has_torch(p))

cluster.start_local_ray = spy
out = sys.argv[1]
data = prepare(load("synthetic", synthetic_rows=5_000, seed=0), seed=0)
space = build_space(data.features, SearchSpec(max_dim=8))
trial_pids = set()
settings = SearchSettings(name="warm", trials=2, max_epochs=1, patience=0, scheduler="fifo", heuristics=False,
                          num_cpus=2, tracking_uri=f"sqlite:///{out}/mlflow.db", output_dir=out, seed=0)
run_search(data, space, settings,
           on_event=lambda kind, trial, result: kind == "result" and trial_pids.add(result["pid"]))
print(json.dumps({**seen, "trials": sorted(trial_pids)}))
"""


@pytest.mark.slow
def test_a_local_search_runs_its_first_trials_in_the_workers_ray_prestarted_with_torch_imported(tmp_path):
    """The local Ray a search starts (start_local_ray) prestarts one worker per CPU that imports torch and the trial
    code at once, and Tune's trial actors run in those workers instead of new processes that import it all after the
    trials are scheduled, also with AWS credentials in the environment (which Tune copies into each trial actor's
    runtime environment). (Before: the prestarted workers held no torch, and the trials ran in two other processes:
    Tune's per-actor runtime environment kept them off the prestarted workers.)"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_preload_python_modules"}
    env.update(RAY_AIR_NEW_OUTPUT="0", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    done = subprocess.run([sys.executable, "-c", WARM_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert len(report["prestarted"]) == 2 and report["with_torch"] == report["prestarted"], report
    assert report["trials"] and set(report["trials"]) <= set(report["prestarted"]), report
    assert report["env_after_start"] is None, report  # only the raylet it started read the setting
