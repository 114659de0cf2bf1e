from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.download import ARCHIVES, DownloadError, default_cache_dir, fetch_movielens
from pipelines.movielens import load_movielens

from ..ports import free_port
from .test_movielens import write_100k, zip_folder

REPO = Path(__file__).resolve().parents[2]


class _Server:
    """A local HTTP server for ``files`` (path -> bytes) that counts GET requests per path."""

    def __init__(self, files: dict[str, bytes], delay: float = 0.0):
        self.files, self.delay, self.hits = files, delay, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                time.sleep(outer.delay)  # keep the download open so concurrent callers overlap
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive_bytes(tmp_path) -> bytes:
    folder = write_100k(tmp_path / "build" / "ml-100k")
    return zip_folder(folder, tmp_path / "build" / "ml-100k.zip").read_bytes()


@pytest.fixture
def server(archive_bytes):
    s = _Server({"/ml-100k.zip": archive_bytes})
    yield s
    s.close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_official_archives_have_grouplens_urls_and_pinned_checksums():
    assert ARCHIVES["100k"].url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert ARCHIVES["100k"].md5 == "0e33842e24a9c977be4e0107933c0723"
    assert ARCHIVES["1m"].md5 == "c4d9eecfca2ab87c1945afe126590906"
    assert ARCHIVES["latest-small"].url.endswith("/ml-latest-small.zip")


def test_fetch_movielens_downloads_then_reuses_cache(server, archive_bytes, tmp_path):
    cache = tmp_path / "cache"
    path = fetch_movielens("100k", cache, url=server.url("/ml-100k.zip"), expected_md5=_md5(archive_bytes))
    assert path == cache / "movielens" / "ml-100k.zip"
    assert path.read_bytes() == archive_bytes
    again = fetch_movielens("100k", cache, url=server.url("/ml-100k.zip"), expected_md5=_md5(archive_bytes))
    assert again == path and server.hits == {"/ml-100k.zip": 1}
    assert not list(path.parent.glob("*.part"))
    assert len(load_movielens(path)) == 6


def test_fetch_movielens_checksum_mismatch_deletes_and_explains(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=r"has md5 [0-9a-f]{32}, but 0{32} was expected; the file was deleted"):
        fetch_movielens("100k", cache, url=server.url("/ml-100k.zip"), expected_md5="0" * 32)
    assert [p.name for p in (cache / "movielens").iterdir()] == ["ml-100k.zip.lock"]


def test_fetch_movielens_official_checksum_refuses_other_bytes(server, tmp_path):
    # the test archive is not the official one, so the default (official) checksum must reject it
    with pytest.raises(DownloadError, match="0e33842e24a9c977be4e0107933c0723 was expected"):
        fetch_movielens("100k", tmp_path / "cache", url=server.url("/ml-100k.zip"))


def test_fetch_movielens_replaces_corrupt_cached_archive(server, archive_bytes, tmp_path):
    cache = tmp_path / "cache"
    (cache / "movielens").mkdir(parents=True)
    (cache / "movielens" / "ml-100k.zip").write_bytes(b"truncated")
    path = fetch_movielens("100k", cache, url=server.url("/ml-100k.zip"), expected_md5=_md5(archive_bytes))
    assert path.read_bytes() == archive_bytes and server.hits == {"/ml-100k.zip": 1}


def test_fetch_movielens_concurrent_threads_download_once(archive_bytes, tmp_path):
    slow = _Server({"/ml-100k.zip": archive_bytes}, delay=0.3)
    try:
        results, errors = [], []

        def worker():
            try:
                results.append(fetch_movielens("100k", tmp_path, url=slow.url("/ml-100k.zip"), expected_md5=None))
            except Exception as e:  # surfaced by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        slow.close()
    assert errors == [] and len(results) == 3 and len(set(results)) == 1
    assert slow.hits == {"/ml-100k.zip": 1}
    assert results[0].read_bytes() == archive_bytes


def test_fetch_movielens_concurrent_processes_download_once(archive_bytes, tmp_path):
    slow = _Server({"/ml-100k.zip": archive_bytes}, delay=1.0)
    # load download.py on its own (it needs only the stdlib and filelock): importing the package would pull in
    # torch, which costs seconds per process
    code = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('download', 'pipelines/download.py'); "
        "m = sys.modules[spec.name] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(m.fetch_movielens('100k', sys.argv[1], url=sys.argv[2], expected_md5=sys.argv[3]))"
    )
    args = [sys.executable, "-c", code, str(tmp_path), slow.url("/ml-100k.zip"), _md5(archive_bytes)]
    try:
        procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        slow.close()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {out.strip() for out, _ in outs} == {str(tmp_path / "movielens" / "ml-100k.zip")}
    assert slow.hits == {"/ml-100k.zip": 1}


def test_fetch_movielens_unreachable_url_is_a_clear_error(tmp_path):
    port = free_port()  # nothing listens on it
    url = f"http://127.0.0.1:{port}/ml-100k.zip"
    with pytest.raises(DownloadError, match=rf"could not download {url}: .*check the network"):
        fetch_movielens("100k", tmp_path, url=url, timeout=5)
    assert not (tmp_path / "movielens" / "ml-100k.zip").exists()
    assert not list((tmp_path / "movielens").glob("*.part"))


def test_fetch_movielens_http_404_is_a_clear_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_movielens("100k", tmp_path, url=server.url("/missing.zip"))


def test_fetch_movielens_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match=r"variant is '10m', but must be one of 100k, 1m, latest-small"):
        fetch_movielens("10m", tmp_path)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBSIZE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EMBSIZE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "embsize"
