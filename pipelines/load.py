"""One entry point from a data source (the CLI's ``--data``) to a RawDataset: synthetic, MovieLens, or a table."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .download import fetch_movielens
from .movielens import load_movielens
from .schema import RawDataset, check_label_options
from .synthetic import SyntheticSpec, generate
from .tabular import load_table, supported_formats, table_format

log = logging.getLogger(__name__)

MOVIELENS_SOURCES = {"movielens-100k": "100k", "movielens-1m": "1m", "movielens-latest-small": "latest-small"}
MOVIELENS_THRESHOLD = 4.0  # rating >= 4 is "liked", the MovieLens convention


def load(
    source: str,
    *,
    label: str | None = None,
    features: Sequence[str] | None = None,
    multi: Sequence[str] | None = None,
    sep: str = "|",
    threshold: float | None = None,
    time: str | None = None,
    buckets: dict[str, tuple[float, ...]] | None = None,
    delimiter: str | None = None,
    positive_label: str | None = None,
    synthetic_rows: int | None = None,
    seed: int = 0,
) -> RawDataset:
    """Load ``source`` (see ``describe_sources``); options that do not apply to its kind are refused, not ignored.

    ``positive_label``: a table's label value that is positive (the rest negative), for a text label."""
    check_label_options(threshold, positive_label)  # before any file is read
    if source == "synthetic":
        _refuse("synthetic", label=label, features=features, multi=multi, threshold=threshold, time=time,
                buckets=buckets, delimiter=delimiter, sep=None if sep == "|" else sep, positive_label=positive_label)
        spec = SyntheticSpec(seed=seed) if synthetic_rows is None else SyntheticSpec(rows=synthetic_rows, seed=seed)
        return generate(spec)
    if synthetic_rows is not None:
        raise ValueError(f"--rows {synthetic_rows} applies only to --data synthetic; drop it for '{source}'")
    if source in MOVIELENS_SOURCES:
        _refuse(source, positive_label=positive_label)
        return _movielens(source, label, features, multi, threshold, time, buckets, delimiter, sep)
    if source.startswith("movielens-") and not any(c in source for c in "./\\") and not Path(source).exists():
        known = ", ".join(MOVIELENS_SOURCES)
        raise ValueError(f"data source '{source}' is not known; the MovieLens sources are {known}")
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise ValueError(
            f"data path '{path}' does not exist; give a MovieLens folder/zip, a CSV/Parquet file, or 'synthetic'"
        )
    if table_format(path) is not None:
        if not label or not features:
            raise ValueError(
                f"'{path.name}' is a table, so it needs its label column and feature columns, "
                "e.g. --label rating --features user_id,item_id"
            )
        return load_table(path, label, list(features), list(multi or ()), sep, threshold, time, buckets, delimiter,
                          positive_label)
    if path.is_dir() or path.suffix.lower() == ".zip":
        _refuse(str(path), positive_label=positive_label)
        return _movielens(path, label, features, multi, threshold, time, buckets, delimiter, sep)
    raise ValueError(
        f"data path '{path}' is neither a MovieLens folder/zip nor a table; table formats: {supported_formats()}"
    )


def missing_path(source: str) -> bool:
    """``source`` names a file or folder that is not there (``synthetic`` and the MovieLens downloads are names, not
    paths): what a config or a search recorded, checked where the data may have moved since."""
    return source != "synthetic" and source not in MOVIELENS_SOURCES and not Path(source).expanduser().exists()


def describe_sources() -> str:
    """What ``--data`` accepts, for the CLI's help."""
    return (
        "'synthetic' (default): planted per-feature dims, generated in memory (--rows, --seed); "
        f"{', '.join(MOVIELENS_SOURCES)}: the official GroupLens archive, downloaded once into $EMBSIZE_CACHE "
        "(default ~/.cache/embsize) and checksum-verified; a MovieLens folder or .zip (100K, 1M or latest-small "
        "layout; label = rating >= --positive-threshold, default 4; --features picks a subset); "
        f"a table file ({supported_formats()}) with --label and --features"
    )


def _movielens(
    where: Path | str,
    label: str | None,
    features: Sequence[str] | None,
    multi: Sequence[str] | None,
    threshold: float | None,
    time: str | None,
    buckets: dict[str, tuple[float, ...]] | None,
    delimiter: str | None,
    sep: str = "|",
) -> RawDataset:
    """A MovieLens folder/zip, or a source name whose official archive is fetched (after the options are checked)."""
    _refuse(str(where), label=label, multi=multi, time=time, delimiter=delimiter, sep=None if sep == "|" else sep)
    path = fetch_movielens(MOVIELENS_SOURCES[where]) if isinstance(where, str) else where
    raw = load_movielens(path, threshold=MOVIELENS_THRESHOLD if threshold is None else threshold)
    return _select(raw, features, buckets)


def _select(
    raw: RawDataset, features: Sequence[str] | None, buckets: dict[str, tuple[float, ...]] | None
) -> RawDataset:
    """Keep ``features`` (all when None), and bucket the numeric ones named in ``buckets``."""
    names = [f.name for f in raw.features]
    for name in [*(features or ()), *(buckets or {})]:
        if name not in names:
            raise ValueError(f"feature '{name}' is not in {raw.name}; its features are: {', '.join(names)}")
    keep = list(dict.fromkeys(features)) if features else names
    specs = []
    for name in keep:
        spec = raw.feature(name)
        if buckets and name in buckets:
            numeric = pd.to_numeric(raw.frame[name], errors="coerce")
            if spec.multi or (numeric.isna() & raw.frame[name].notna()).any():
                raise ValueError(f"feature '{name}' of {raw.name} is not numeric, so it cannot be bucketed")
            spec = replace(spec, buckets=tuple(float(b) for b in buckets[name]))
        specs.append(spec)
    return RawDataset(raw.name, raw.frame[keep], tuple(specs), raw.label, raw.time, {**raw.meta, "features": keep})


_FLAGS = {"label": "--label", "features": "--features", "multi": "--multi", "threshold": "--positive-threshold",
          "positive_label": "--positive-label",
          "time": "--time-column", "buckets": "bucket edges", "delimiter": "--delimiter", "sep": "--sep"}
_WHY = {
    "label": "its label is rating >= --positive-threshold",
    "positive_label": "its label is rating >= --positive-threshold",
    "multi": "its genres are already multi-valued",
    "time": "its rows carry the rating timestamp",
    "delimiter": "its files have a fixed format",
    "sep": "its genres are split by the loader",
}


def _refuse(source: str, **given: object) -> None:
    """Refuse options that do not apply to ``source``, so none is silently ignored."""
    for name, value in given.items():
        if value is not None and value != () and value != []:
            why = _WHY.get(name, "it takes none") if source != "synthetic" else "it is generated"
            raise ValueError(f"{_FLAGS[name]} does not apply to data source '{source}' ({why}); drop it")
