"""Shared bits of the benchmark scripts: data locations, machine facts, temp stores."""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "movielens-100k" / "ml-100k"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"


def movielens(features: list[str] | None = None):
    from pipelines import load, prepare

    if not ML100K.is_dir():
        raise SystemExit(f"MovieLens 100K not found at {ML100K}; this benchmark needs ../shared/data")
    return prepare(load(str(ML100K), features=features))


def scratch(prefix: str) -> tuple[Path, str]:
    """A temp output dir and an embedded MLflow store inside it."""
    tmp = Path(tempfile.mkdtemp(prefix=f"embsize-{prefix}-"))
    return tmp, f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
