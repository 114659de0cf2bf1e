from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

SHARED_ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens-100k"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, like the CI machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh embedded MLflow store (SQLite) in the test's temp dir."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 server ("127.0.0.1:PORT"): moto's, a real HTTP endpoint that pyarrow's S3 filesystem (what Ray Tune
    writes a bucket storage_path with) talks to. Dummy credentials are set for this process and those it starts."""
    from moto.server import ThreadedMotoServer

    from tests.ports import free_port

    env = pytest.MonkeyPatch()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.setenv(key, "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()
    env.undo()


@pytest.fixture
def s3_storage(s3_endpoint) -> str:
    """A new bucket on the local S3 server, as a Ray Tune storage URI (``s3://BUCKET/runs?endpoint_override=...``)."""
    import pyarrow.fs

    bucket = f"embsize-{uuid.uuid4().hex[:12]}"
    pyarrow.fs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}/runs?endpoint_override={s3_endpoint}&scheme=http"
