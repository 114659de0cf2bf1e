"""The MLflow pyfunc model: raw rows (a DataFrame with the source data's columns) in, one score per row out.

The pyfunc model wraps a plain export (``pipelines.export``), logged as its artifact, so both production paths load
the same files with the same integrity checks. It is logged as "models from code" (a three-line script that builds
``EmbsizeModel``), not as a cloudpickled object, and the ``pipelines`` source it was trained with travels along as the
model's code (``code_paths``): a server needs torch, pandas and numpy, not an embsize install.

Why the signature declares the output only: MLflow's column enforcement drops extra columns with a warning and
refuses values the encoder accepts on purpose (a missing user_id in an integer column, "196" for 196). The model
checks its input itself instead: a missing or extra column is an error naming it, values are normalized as in
training, unseen values score with the unknown bucket. The input example logged with the model shows the columns.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

_SCRIPT = """import mlflow
from pipelines.serving import EmbsizeModel

mlflow.models.set_model(EmbsizeModel())
"""
ARTIFACT = "export"  # the key of the plain export among the pyfunc model's artifacts
REQUIREMENTS = ("torch", "numpy", "pandas", "pyyaml", "scikit-learn", "filelock")  # what `import pipelines` needs


class EmbsizeModel(mlflow.pyfunc.PythonModel):
    """Scores raw rows with an exported EmbeddingRecommender; output is a DataFrame with one ``score`` column."""

    def load_context(self, context) -> None:
        from .export import load_model

        self.model, self.encoder = load_model(context.artifacts[ARTIFACT])

    # pd.DataFrame is a hint MLflow does not turn into a schema: the input is checked by ``score`` itself
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        from .export import score

        try:
            scores = score(self.model, self.encoder, model_input)
        except ValueError as e:  # as MlflowException, the scoring server answers 400 with this message, not a generic one
            raise MlflowException.invalid_parameter_value(str(e)) from e
        return pd.DataFrame({"score": scores}, index=_index(model_input))


def log_model(
    export_dir: str | Path,
    input_example: pd.DataFrame,
    registered_model_name: str | None = None,
    name: str = "model",
    metadata: dict | None = None,
):
    """Log the export at ``export_dir`` as a pyfunc model in the active MLflow run; register it when a name is given.

    Returns MLflow's ``ModelInfo`` (``registered_model_version`` is set when registered).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(outputs=Schema([ColSpec("float", "score")]))
    # MLflow says "Validating input example against model signature" at INFO, in a format of its own, among the
    # CLI's lines; its warnings (an example that does not fit the signature) still show
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(max(pyfunc_log.getEffectiveLevel(), logging.WARNING))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            code = _package_copy(Path(tmp))
            script = Path(tmp) / "embsize_model.py"
            script.write_text(_SCRIPT)
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(script),
                artifacts={ARTIFACT: str(Path(export_dir).resolve())},
                code_paths=[str(code)],
                signature=signature,
                input_example=json_safe(input_example),
                pip_requirements=requirements(),
                metadata=metadata,
                registered_model_name=registered_model_name,
            )
    finally:
        pyfunc_log.setLevel(level)


def json_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows as plain Python values (nullable ints and NA become int/None), so MLflow can store them as JSON."""
    return frame.astype(object).where(frame.notna(), None).reset_index(drop=True)


def requirements() -> list[str]:
    """Pinned pip requirements of a serving environment: the installed versions of what ``pipelines`` imports."""
    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def _package_copy(tmp: Path) -> Path:
    """The ``pipelines`` package's source files (no caches) in ``tmp/pipelines``, to log as the model's code."""
    src = Path(__file__).resolve().parent
    dst = tmp / src.name
    dst.mkdir()
    for f in src.glob("*.py"):
        shutil.copy2(f, dst / f.name)
    return dst


def _index(frame: Any):
    return frame.index if isinstance(frame, pd.DataFrame) else None
