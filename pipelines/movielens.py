"""MovieLens ratings as a RawDataset: the 100K, 1M and latest-small layouts, from a folder or the official .zip.

One row per rating; the label is ``rating >= threshold`` (the MovieLens convention: 4 and 5 are "liked"), the time is
the rating's Unix timestamp. Features are the user and item ids, the user demographics where the layout has them
(age, gender, occupation, zip), the movie's genres (multi-valued, "Action|Comedy") and its release year.
"""
from __future__ import annotations

import csv
import io
import logging
import posixpath
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .schema import Feature, LabelRule, RawDataset, binarize_label

log = logging.getLogger(__name__)

# Files that identify each layout (read in this order); ``u.genre`` is optional, see GENRES_100K.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "100k": ("u.data", "u.user", "u.item"),
    "1m": ("ratings.dat", "users.dat", "movies.dat"),
    "latest-small": ("ratings.csv", "movies.csv"),
}
# The age groups of the 1M release (its users.dat stores these lower edges); used for bucket_age on every layout.
AGE_BUCKETS = (18.0, 25.0, 35.0, 45.0, 50.0, 56.0)
# u.genre of the official 100K archive, used when an archive lacks that file.
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_USER_FEATURES = ("age", "gender", "occupation", "zip")

Reader = Callable[[str], bytes]  # file name inside the layout -> its bytes


def load_movielens(path: str | Path, threshold: float = 4.0, bucket_age: bool = False) -> RawDataset:
    """Load a MovieLens folder or .zip (the layout, and one top folder inside it, are detected)."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise ValueError(f"MovieLens path '{root}' does not exist; give a MovieLens folder or its .zip archive")
    variant, read = _locate(root)
    ratings, users, items = _PARSERS[variant](read)
    frame = ratings[["user_id", "item_id"]]
    if users is not None:
        frame = frame.merge(users, on="user_id", how="left", validate="many_to_one")
    frame = frame.merge(items, on="item_id", how="left", validate="many_to_one")
    names = ["user_id", "item_id", *(_USER_FEATURES if users is not None else ()), "genres", "release_year"]
    frame = frame[names].reset_index(drop=True)
    features = tuple(
        Feature(n, multi=n == "genres", buckets=AGE_BUCKETS if (n == "age" and bucket_age) else None) for n in names
    )
    label = binarize_label(ratings["rating"], LabelRule("rating", threshold))
    meta = {
        "source": str(root),
        "variant": variant,
        "threshold": threshold,
        "users": int(ratings["user_id"].nunique()),
        "items": int(ratings["item_id"].nunique()),
    }
    log.info("loaded MovieLens %s from %s: %d ratings, positive rate %.3f", variant, root, len(label), label.mean())
    return RawDataset(
        f"movielens-{variant}", frame, features, label, time=ratings["timestamp"].to_numpy(np.int64), meta=meta
    )


def _locate(root: Path) -> tuple[str, Reader]:
    """Find a complete layout directly in ``root`` or in one folder below it (the official zips have one)."""
    if root.is_dir():
        dirs = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
        listing = {str(d): {p.name: p for p in d.iterdir() if p.is_file()} for d in dirs}

        def opener(found: dict) -> Reader:
            return lambda name: found[name].read_bytes()
    elif zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as archive:
            members = archive.namelist()
        listing = {}
        for member in members:
            if not member.endswith("/") and member.count("/") <= 1:
                listing.setdefault(posixpath.dirname(member), {})[posixpath.basename(member)] = member
        listing = dict(sorted(listing.items()))  # "" (the archive root) first

        def opener(found: dict) -> Reader:
            return lambda name: _read_member(root, found[name])
    else:
        raise ValueError(f"MovieLens path '{root}' is neither a folder nor a .zip archive; give the folder or the zip")
    for variant, required in LAYOUTS.items():
        for files in listing.values():
            if all(name in files for name in required):
                return variant, opener(files)
    expected = "; ".join(f"{v}: {', '.join(files)}" for v, files in LAYOUTS.items())
    known = {name for names in LAYOUTS.values() for name in names}
    present = sorted(known & {name for files in listing.values() for name in files})
    hint = f" (found only {', '.join(present)})" if present else ""
    raise ValueError(
        f"no MovieLens layout in '{root}'{hint}; expected these files, directly inside or in one top folder: {expected}"
    )


def _read_member(archive: Path, member: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        return z.read(member)


def _csv(data: bytes, **kwargs) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(data), encoding="latin-1", **kwargs)


def _dat(data: bytes, names: list[str], dtype: dict) -> pd.DataFrame:
    # '::' as a separator needs pandas' slow Python engine; a one-byte stand-in keeps the C parser (10x faster on 1M).
    return _csv(data.replace(b"::", b"\x1f"), sep="\x1f", header=None, names=names, dtype=dtype, quoting=csv.QUOTE_NONE)


def _year_from_title(title: pd.Series) -> pd.Series:
    return pd.to_numeric(title.str.extract(r"\((\d{4})\)\s*$")[0], errors="coerce").astype("Int64")


def _parse_100k(read: Reader) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = _csv(read("u.data"), sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    users = _csv(
        read("u.user"), sep="|", header=None, names=["user_id", *_USER_FEATURES],
        dtype={"gender": str, "occupation": str, "zip": str},
    )
    try:
        genre_bytes = read("u.genre")
    except KeyError:  # not in this archive
        genre_names = GENRES_100K
    else:
        table = _csv(genre_bytes, sep="|", header=None, names=["name", "index"], quoting=csv.QUOTE_NONE)
        genre_names = tuple(table.sort_values("index")["name"].astype(str))
    raw = _csv(read("u.item"), sep="|", header=None, quoting=csv.QUOTE_NONE, dtype={1: str, 2: str, 3: str, 4: str})
    flags = raw.iloc[:, 5:].fillna(0).to_numpy(dtype=np.int8)
    if flags.shape[1] != len(genre_names):
        raise ValueError(f"u.item has {flags.shape[1]} genre flags but u.genre names {len(genre_names)} genres")
    released = pd.to_datetime(raw[2], format="%d-%b-%Y", errors="coerce")
    items = pd.DataFrame(
        {"item_id": raw[0], "genres": _join_flags(flags, genre_names), "release_year": released.dt.year.astype("Int64")}
    )
    return ratings, users, items


def _join_flags(flags: np.ndarray, names: tuple[str, ...]) -> pd.Series:
    """0/1 genre flags (items x genres) to cells like "Action|Comedy"; no flag -> missing."""
    cells = np.full(len(flags), "", dtype=object)
    for j, name in enumerate(names):  # one pass per genre (19), vectorised over items
        cells = np.where(flags[:, j] == 1, cells + name + "|", cells)
    out = pd.Series(cells, dtype=object).str.rstrip("|")
    return out.where(out != "", np.nan)


def _parse_1m(read: Reader) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = _dat(read("ratings.dat"), ["user_id", "item_id", "rating", "timestamp"], {})
    users = _dat(
        read("users.dat"),
        ["user_id", "gender", "age", "occupation", "zip"],
        {"gender": str, "occupation": str, "zip": str},
    )
    movies = _dat(read("movies.dat"), ["item_id", "title", "genres"], {"title": str, "genres": str})
    items = pd.DataFrame(
        {"item_id": movies["item_id"], "genres": movies["genres"], "release_year": _year_from_title(movies["title"])}
    )
    return ratings, users[["user_id", *_USER_FEATURES]], items


def _parse_latest_small(read: Reader) -> tuple[pd.DataFrame, None, pd.DataFrame]:
    ratings = pd.read_csv(io.BytesIO(read("ratings.csv")))
    ratings = ratings.rename(columns={"userId": "user_id", "movieId": "item_id"})
    movies = pd.read_csv(io.BytesIO(read("movies.csv")), dtype={"title": str, "genres": str})
    genres = movies["genres"].where(movies["genres"] != "(no genres listed)", np.nan)  # the release's "missing"
    items = pd.DataFrame(
        {"item_id": movies["movieId"], "genres": genres, "release_year": _year_from_title(movies["title"])}
    )
    return ratings[["user_id", "item_id", "rating", "timestamp"]], None, items


_PARSERS = {"100k": _parse_100k, "1m": _parse_1m, "latest-small": _parse_latest_small}
