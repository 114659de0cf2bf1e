"""Fetch the official MovieLens archives into a local cache: once, atomically, checksum-verified.

Concurrent callers (threads, processes, parallel Ray trials) take a file lock next to the archive, so one of them
downloads and the others reuse its file. A download goes to a temporary file in the cache directory and is renamed
into place only after its MD5 matched, so a reader never sees a partial or corrupt archive.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
OFFICIAL = "official"  # expected_md5 default: the checksum GroupLens publishes for the variant


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str | None  # from GroupLens's <archive>.md5 file; None when no published checksum could be pinned


ARCHIVES: dict[str, Archive] = {
    "100k": Archive(BASE_URL + "ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
    "1m": Archive(BASE_URL + "ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
    # "latest" releases are regenerated in place, so a pinned checksum would go stale; none was found to pin.
    "latest-small": Archive(BASE_URL + "ml-latest-small.zip", None),
}


class DownloadError(ValueError):
    """A download failed or its checksum did not match (a ValueError, so the CLI reports it as one line)."""


def default_cache_dir() -> Path:
    """``$EMBSIZE_CACHE`` if set, else ``~/.cache/embsize``."""
    return Path(os.environ.get("EMBSIZE_CACHE") or Path.home() / ".cache" / "embsize").expanduser()


def fetch_movielens(
    variant: str = "100k",
    cache_dir: str | Path | None = None,
    url: str | None = None,
    expected_md5: str | None = OFFICIAL,
    timeout: float = 60.0,
) -> Path:
    """Path of the cached archive of ``variant``, downloading it first if needed.

    ``url`` overrides the official address (a mirror); ``expected_md5=None`` skips verification. The cache is keyed
    by variant: ``<cache>/movielens/ml-<variant>.zip``.
    """
    if variant not in ARCHIVES:
        raise ValueError(f"MovieLens variant is {variant!r}, but must be one of {', '.join(ARCHIVES)}")
    archive = ARCHIVES[variant]
    md5 = archive.md5 if expected_md5 == OFFICIAL else expected_md5
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return download(url or archive.url, dest / "movielens" / f"ml-{variant}.zip", md5, timeout)


def download(url: str, dest: Path, expected_md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is there already; return ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dest}.lock"):
        if dest.exists():
            if expected_md5 is None or md5sum(dest) == expected_md5:
                log.info("using cached %s", dest)
                return dest
            log.warning("cached %s does not match md5 %s; downloading it again", dest, expected_md5)
            dest.unlink()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s to %s", url, dest)
            digest = _stream(url, fd, timeout)
            if expected_md5 is not None and digest != expected_md5:
                raise DownloadError(
                    f"download of {url} has md5 {digest}, but {expected_md5} was expected; the file was deleted. "
                    "Retry, or download the archive yourself and pass its path as the data source"
                )
            os.replace(tmp, dest)  # atomic within one directory: readers see no file or the whole file
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, fd: int, timeout: float) -> str:
    """Copy ``url`` into the open file ``fd`` in chunks; return the MD5 of what was written."""
    h = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}; check the URL") from e
    except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout, reset
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"could not download {url}: {reason}; check the network, or download the archive yourself "
            "and pass its path as the data source"
        ) from e
    return h.hexdigest()


def md5sum(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
