"""What a search needs from the Ray cluster it runs on, checked after ``ray.init`` and before any trial starts.

On one machine everything is local and fine. With more than one node:

- the MLflow tracking URI must be a server: a SQLite/file store lives on the driver's disk, where the team, other
  searches and ``embsize train`` on another machine cannot reach it;
- Ray Tune's ``storage_path`` must be storage every node sees (a shared mount or an ``s3://``-style URI): since
  Ray 2.7 Tune no longer copies trial folders to the head node. A driver-written marker file is read back by a tiny
  task pinned to each node, so "shared" is observed, not assumed;
- the dataset reaches the trials through Ray's object store (``tune.with_parameters``), never through a path.

Placement helpers used inside a trial live here too: which node it runs on, and which device Ray gave it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0  # a node gets this long to start a worker and read the marker


@dataclass(frozen=True)
class ClusterInfo:
    nodes: int  # alive Ray nodes
    cpus: float  # cluster total
    gpus: float  # cluster total
    storage_path: str  # what Ray Tune writes to: a local path (one node), a shared path or a URI


def check_gpus_per_trial(gpus: float) -> float:
    """A fraction of one GPU (0.25: four trials share a GPU) or a whole number of GPUs."""
    if not math.isfinite(gpus) or gpus < 0:
        raise ValueError(f"--gpus-per-trial is {gpus}, but must be >= 0 (a fraction like 0.25, or a whole number)")
    if gpus > 1 and not float(gpus).is_integer():
        raise ValueError(f"--gpus-per-trial is {gpus}, but above 1 it must be a whole number (Ray shares a GPU only "
                         "below one whole GPU)")
    return gpus


def is_uri(path: str) -> bool:
    """A remote storage URI (s3://, gs://, ...); file:// and plain paths are local."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> Path:
    return Path(path[len("file://"):] if path.startswith("file://") else path).expanduser().resolve()


def check_tracking_uri(uri: str, nodes: int) -> None:
    from .tracking import is_local_store

    if nodes > 1 and is_local_store(uri) and not uri.startswith("databricks"):  # "databricks[://profile]": a server
        raise ValueError(
            f"tracking URI '{uri}' is a local MLflow store, but the Ray cluster has {nodes} nodes; start an MLflow "
            "server (`mlflow server --backend-store-uri postgresql://... --host 0.0.0.0 "
            "--allowed-hosts 'HOST,HOST:*'`) and pass --tracking-uri http://HOST:5000"
        )


def check_storage_path(path: str, nodes: list[dict], explicit: bool) -> None:
    """Refuse a storage path that not every node sees. ``nodes``: alive entries of ``ray.nodes()``."""
    if len(nodes) <= 1:
        return
    fix = "pass --storage-path with a folder every node mounts (e.g. NFS) or an S3-compatible URI (s3://bucket/dir)"
    if not explicit:
        raise ValueError(f"Ray storage path '{path}' is the default local folder, but the Ray cluster has "
                         f"{len(nodes)} nodes; {fix}")
    blind = _nodes_not_seeing(path, nodes)
    if blind:
        raise ValueError(f"Ray storage path '{path}' is not visible from {len(blind)} of {len(nodes)} nodes "
                         f"({', '.join(blind)}); {fix}")


# What a trial process imports before its first epoch (~1.5 s on this project's 2-core box): a local Ray embsize starts
# has its prestarted workers import them at once (Ray's preload_python_modules), while the driver is still setting up.
TRIAL_MODULES = "torch,ray.tune,search.trial"


def start_local_ray(warm: bool, **init_kwargs) -> None:
    """``ray.init`` for the local Ray a search or `embsize confirm` starts; ``warm``: with workers that have the trial
    code imported.

    Ray starts one idle worker per CPU with the node (its prestart). With ``warm`` those workers import
    ``TRIAL_MODULES`` as they start (``RAY_preload_python_modules``, read by the raylet this call starts; a value
    already in the environment is kept), and ``trial_actors_in_prestarted_workers`` lets Tune's trial actors run in them:
    the first trials start in processes that are ready instead of new ones that import torch and Ray Tune after the
    trials are scheduled. Each warm worker holds ~240 MB more, so it pays only where every CPU runs a trial. A
    cluster's nodes get the same from ``ray start`` with that variable set (README, cluster guide).
    """
    import ray

    quiet_token_notice()
    preset = os.environ.get("RAY_preload_python_modules")
    if warm and preset is None:
        os.environ["RAY_preload_python_modules"] = TRIAL_MODULES
    try:
        ray.init(**init_kwargs)
    finally:  # only the raylet just started reads it: no other Ray started later from this process inherits it
        if warm and preset is None:
            del os.environ["RAY_preload_python_modules"]


@contextlib.contextmanager
def trial_actors_in_prestarted_workers(ray_started_here: bool):
    """While Tune creates its trial actors (around ``Tuner.fit``): let them take the idle workers Ray prestarts.

    Tune gives every trial actor a runtime environment of environment variables: ``PL_DISABLE_FORK=1`` (a PyTorch
    Lightning setting, ray-project/ray#28197; embsize does not use Lightning) and the driver's values of a few it
    propagates (AWS credentials, some Ray Train settings). Ray keys its idle workers by runtime environment, and the
    prestarted ones have none, so each trial actor got a new process instead (~0.5 s to start, torch imported again).
    Tune has no option for it; its defaults live in its module ``class_cache``, emptied here for the duration and
    then restored. The propagated variables are dropped only for a Ray this process started just now
    (``ray_started_here``): its workers inherited this environment already. A cluster's workers still get them.
    """
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # a Tune without that module: left as it is
        yield
        return
    defaults = dict(getattr(class_cache, "DEFAULT_ENV_VARS", {}))
    propagated = set(getattr(class_cache, "ENV_VARS_TO_PROPAGATE", ())) if ray_started_here else set()
    getattr(class_cache, "DEFAULT_ENV_VARS", {}).pop("PL_DISABLE_FORK", None)
    getattr(class_cache, "ENV_VARS_TO_PROPAGATE", set()).difference_update(propagated)
    try:
        yield
    finally:
        getattr(class_cache, "DEFAULT_ENV_VARS", {}).update(defaults)
        getattr(class_cache, "ENV_VARS_TO_PROPAGATE", set()).update(propagated)


def quiet_token_notice() -> None:
    """Before embsize starts a local Ray: drop Ray's notice that token authentication is on ("Token authentication is
    enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out"), printed on every start, a line of noise in
    every laptop search. Authentication stays Ray's default; setting RAY_AUTH_MODE=token instead would silence it too,
    but Ray reads the variable at import, so it would need Ray's private config refresh."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenNotice) for f in logger.filters):
        logger.addFilter(_TokenNotice())


class _TokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def check_cluster(
    tracking_uri: str,
    storage: str,
    explicit_storage: bool,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    can_grow: bool = False,
) -> ClusterInfo:
    """Check the connected Ray cluster against the search's needs; a ``ValueError`` names the first unmet one.

    ``storage``: Ray Tune's storage_path (absolute path or URI); ``explicit_storage``: the user chose it (a default
    local folder is refused on more than one node even where it happens to be shared). ``can_grow``: an existing
    cluster, whose autoscaler may still add the nodes a trial needs: refused when it has published its node types
    and none can hold a trial, a warning when it may add one or has published none.
    """
    import ray

    nodes = alive_nodes()
    total = ray.cluster_resources()
    try:
        check_fits(nodes, cpus_per_trial, gpus_per_trial)
    except ValueError as e:
        if not can_grow:
            raise
        types = autoscaler_node_types()
        if types is None:
            log.warning("%s; trials wait until such a node joins (the cluster's autoscaler adding one, or `ray start "
                        "--address ...` on a bigger machine); Ctrl-C stops the search", e)
        else:
            fits = [t["name"] for t in types if _holds(t, cpus_per_trial, gpus_per_trial)]
            listed = ", ".join(f"{t['name']} ({_resources(t)})" for t in types) or "none"
            if not fits:
                raise ValueError(f"{str(e).split('; ')[0]}, and no node type the cluster's autoscaler may add holds "
                                 f"a trial (its types: {listed}); lower --cpus-per-trial/--gpus-per-trial or give the "
                                 "autoscaler a larger node type") from None
            log.warning("%s; trials wait until the cluster's autoscaler adds a node of type %s", str(e).split("; ")[0],
                        " or ".join(fits))
    check_tracking_uri(tracking_uri, len(nodes))
    check_storage_path(storage, nodes, explicit_storage)
    info = ClusterInfo(len(nodes), total.get("CPU", 0.0), total.get("GPU", 0.0), storage)
    log.info("Ray cluster: %d node(s), %g CPUs, %g GPUs; storage %s", info.nodes, info.cpus, info.gpus, storage)
    return info


def experiment_path(storage: str, name: str) -> Path | str:
    """Where Ray Tune writes experiment ``name`` under its storage_path: a folder, or a URI with ``/name`` added to its
    path, before any query (``s3://bucket/dir?endpoint_override=HOST:9000`` -> ``s3://bucket/dir/name?endpoint_...``),
    as Ray Tune joins them."""
    if not is_uri(storage):
        return Path(storage) / name
    parts = urlsplit(storage)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def storage_path(path: str | None, default: Path) -> str:
    """Ray Tune's storage_path: ``path`` (a shared folder or a URI) made absolute, else ``default``."""
    chosen = path or str(default)
    return chosen if is_uri(chosen) else str(local_path(chosen))


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def autoscaler_node_types() -> list[dict] | None:
    """The node types the cluster's autoscaler may add (``{"name", "Resources"}``), as it publishes them in the GCS
    (the v2 autoscaler: KubeRay, `ray up`); None when none were published (nodes joined by hand with `ray start`, or
    an older autoscaler), where nobody can tell whether a larger node may come."""
    import ray._private.state  # Ray's own reader of that config; there is no public one (Ray Train reads it so too)

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: as if none were published
        return None
    if config is None or not config.node_group_configs:
        return None
    return [{"name": g.name, "Resources": dict(g.resources)} for g in config.node_group_configs if g.max_count != 0]


def _holds(node: dict, cpus: float, gpus: float) -> bool:
    have = node.get("Resources", {})
    return have.get("CPU", 0.0) >= cpus and have.get("GPU", 0.0) >= gpus


def _resources(node: dict) -> str:
    return ", ".join(f"{v:g} {k}s" for k, v in sorted(node.get("Resources", {}).items()) if k in ("CPU", "GPU"))


def check_fits(nodes: list[dict], cpus_per_trial: float, gpus_per_trial: float) -> None:
    """A trial must fit on some node, or Ray Tune would wait for it forever."""
    for name, need in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)):
        most = max((n.get("Resources", {}).get(name, 0.0) for n in nodes), default=0.0)
        if need > most:
            flag = f"--{name.lower()}s-per-trial"
            raise ValueError(f"{flag} is {need:g}, but the largest Ray node has {most:g} {name}s; lower {flag} or "
                             f"add a node with more {name}s (ray start --num-{name.lower()}s)")


GIB = 1 << 30
WORKER_BYTES = 400_000_000  # a trial worker before its model and data: Python, torch, Ray, pipelines (335 MB measured)


class TrialResources:
    """Ray Tune's per-config resource request (``tune.with_resources(trainable, TrialResources(...))``): the trial's
    CPUs and GPU share, and Ray's ``memory`` resource for what training its config takes.

    Ray does not measure a trial before placing it: with CPUs alone, two baselines of a 700k-user vocabulary (fastai's
    600 dims, 1.7 GB of parameters, ~8 GB to train each) start together on a 2-CPU 16 GB laptop and one is killed by
    the OOM killer, or by Ray's memory monitor. Asking for the memory a config needs makes Ray run such trials one at a
    time while small ones still share the node.

    The request is a whole number of GiB: every model under ~1 GiB to train asks the same, so Tune's ``reuse_actors``
    (which reuses an actor for an equal request only) keeps reusing them. It is capped at the largest node's
    ``memory``: a trial above it runs alone (and may fail, as one trial), instead of waiting forever for a node that
    never comes. ``--memory-budget`` keeps such configs out of the search.
    """

    def __init__(self, space, cpus: float, gpus: float, data_bytes: int, node_memory: float | None,
                 sparse: bool = False):
        self.space, self.cpus, self.gpus, self.sparse = space, cpus, gpus, sparse
        self.data_bytes, self.node_memory = int(data_bytes), node_memory
        self._warned: set[int] = set()

    def memory(self, config: dict) -> int:
        """Bytes a trial of ``config`` holds at its peak (``training_memory``)."""
        return training_memory(self.space.bytes(config), self.data_bytes, gpu=bool(self.gpus), sparse=self.sparse)

    def request(self, config: dict) -> int:
        """The ``memory`` resource asked for ``config`` (``memory_request``)."""
        return memory_request(self.memory(config), self.node_memory, self._warned)

    def __call__(self, config: dict):
        from ray.tune import PlacementGroupFactory

        bundle = {"CPU": self.cpus, "memory": self.request(config)}
        if self.gpus:
            bundle["GPU"] = self.gpus
        return PlacementGroupFactory([bundle])


def training_memory(model_bytes: int, data_bytes: int, gpu: bool = False, keep_best: bool = False,
                    sparse: bool = False) -> int:
    """Bytes a training run holds at its peak: the worker; its own copies of the data, twice the arrays (the object
    store's are shared by the node's workers, but the trainer stacks the single-valued columns into one index matrix
    and shuffles it each epoch); and the model ``training_copies(keep_best)`` times over on the CPU (its parameters,
    gradients, Adam's moments, a checkpoint, the best epoch's copy), one fewer with ``sparse`` gradients (only the
    rows a batch touched), or twice on a GPU (the host holds the checkpoint and its serialized copy; the rest is on
    the device). Measured: a sparse trial of a 2.2 GB model (√n dims over a 665k-user vocabulary) at 7.0 GB RSS,
    3x its parameters plus the worker; this counts 4x."""
    from pipelines.memory import training_copies

    copies = 2 if gpu else training_copies(keep_best) - (1 if sparse else 0)
    return WORKER_BYTES + 2 * int(data_bytes) + int(model_bytes) * copies


def warm_workers_pay(model_bytes: int, data_bytes: int, sparse: bool = False, keep_best: bool = False) -> bool:
    """Whether a local Ray's warm workers (``start_local_ray``) repay the ~240 MB each holds: when the largest model
    to train asks for the smallest memory request (1 GiB), memory leaves room for one run per CPU, so each warm worker
    gets one (given runs of one CPU and no GPU, which the caller checks)."""
    return training_memory(model_bytes, data_bytes, keep_best=keep_best, sparse=sparse) <= GIB


def memory_request(need: int, node_memory: float | None, warned: set) -> int:
    """Ray's ``memory`` resource to ask for a run that needs ``need`` bytes: whole GiB, capped at the largest node's
    (said once per size: ``warned`` holds the sizes said)."""
    ask = math.ceil(need / GIB) * GIB
    if node_memory is None or ask <= node_memory:
        return ask
    if ask not in warned:  # a trial's request is asked for per trial (and again on a retry)
        warned.add(ask)
        log.warning("a run needs about %.1f GB of memory to train, more than the largest Ray node's %.1f GB: it runs "
                    "alone on that node and may run out of memory (--memory-budget BYTES keeps such configs out of "
                    "a search)", ask / 1e9, node_memory / 1e9)
    return int(node_memory)


def largest_memory(nodes: list[dict]) -> float | None:
    """The largest ``memory`` resource of the given Ray nodes (bytes Ray lets tasks reserve), None if none says."""
    return max((n["Resources"]["memory"] for n in nodes if n.get("Resources", {}).get("memory")), default=None)


def _nodes_not_seeing(path: str, nodes: list[dict]) -> list[str]:
    """Write a marker from the driver; a task pinned to each node reads it back. Returns the blind nodes' labels."""
    import pyarrow.fs
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    marker = f"{path.rstrip('/')}/.embsize-probe-{token}"
    try:
        fs, fs_path = pyarrow.fs.FileSystem.from_uri(marker)
        fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(fs_path) as f:
            f.write(token.encode())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot write to the Ray storage path '{path}' ({str(e).splitlines()[0]}); fix "
                         "--storage-path or its permissions") from None
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(read_marker)
        pinned = {_label(n): NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes}
        refs = {label: read.options(scheduling_strategy=on).remote(marker) for label, on in pinned.items()}
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
        except ray.exceptions.GetTimeoutError:
            raise ValueError(f"the storage probe got no answer from every Ray node within {PROBE_TIMEOUT_S:.0f} s; "
                             "check that all nodes are healthy (`ray status`)") from None
        except ray.exceptions.RayTaskError as e:  # e.g. embsize not installed on a node
            raise ValueError(f"the storage probe failed on a Ray node: {str(e).strip().splitlines()[-1]}; every node "
                             "needs embsize installed (use the same image on all nodes)") from None
    finally:
        try:
            fs.delete_file(fs_path)
        except OSError:
            log.warning("could not delete the storage probe %s", marker)
    return [label for label, content in seen.items() if content != token]


def read_marker(marker: str) -> str | None:
    """Runs on a node: the marker's content, or None when this node cannot see it."""
    import pyarrow.fs

    try:
        fs, fs_path = pyarrow.fs.FileSystem.from_uri(marker)
        with fs.open_input_stream(fs_path) as f:
            return f.read().decode()
    except (OSError, ValueError):
        return None


def _label(node: dict) -> str:
    return f"{node.get('NodeManagerAddress', '?')} {node['NodeID'][:8]}"


def placement() -> dict[str, str]:
    """Where the calling trial runs: node IP, Ray's node id (two nodes on one machine share an IP), GPUs given."""
    import ray

    return {
        "node": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids()),  # Ray's assignment ('' = none)
    }


def trial_device() -> str:
    """The device Ray assigned to the calling trial: 'cuda' when it holds a GPU (share) and CUDA works, else 'cpu'.

    Ray points CUDA_VISIBLE_DEVICES at the trial's GPU, so 'cuda' is that GPU. A trial without GPUs trains on the
    CPU even on a GPU node (torch alone would pick the node's GPU there).
    """
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    log.warning("Ray assigned GPU %s to this trial, but torch sees no CUDA device here: training on the CPU", gpu_ids)
    return "cpu"
