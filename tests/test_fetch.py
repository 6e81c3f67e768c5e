"""Fetch layer against a loopback HTTP server that misbehaves on purpose."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

import pytest
from fakes import QuietHandler

from deo.data.fetch import FetchItem, Manifest, fetch_all, require_ok, verify_manifest
from deo.errors import DataError

# fetch_all waits for its worker threads, so only the thread method can stop a hung test.
pytestmark = pytest.mark.timeout(30, method="thread")

FAST = {"backoff": 0.01, "retries": 3, "timeout": 5.0, "progress": False, "chunk_size": 4096}


@dataclass
class ServerState:
    """Files served and every request seen, shared with the handler threads."""

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: dict[str, list[str | None]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)
    drops: int = 1
    swaps: dict[str, bytes] = field(default_factory=dict)
    if_ranges: dict[str, list[str | None]] = field(default_factory=lambda: defaultdict(list))

    def hit(self, path: str, range_header: str | None) -> int:
        """Record a request and return how many times ``path`` was requested so far."""
        with self.lock:
            self.ranges[path].append(range_header)
            return len(self.ranges[path])

    def count(self, path: str) -> int:
        with self.lock:
            return len(self.ranges[path])

    def total(self) -> int:
        with self.lock:
            return sum(len(seen) for seen in self.ranges.values())


class Handler(QuietHandler):
    """Serves ``/<mode>/<name>``; the mode picks a (mis)behaviour."""

    protocol_version = "HTTP/1.1"
    server: Server

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        mode, _, name = path.lstrip("/").partition("/")
        hits = state.hit(path, self.headers.get("Range"))
        state.if_ranges[path].append(self.headers.get("If-Range"))
        body = state.files.get(name)
        if mode in ("swap", "swapnoif") and hits > 1:
            body = state.swaps[name]
        if body is None or mode == "missing":
            self._reply(404, b"not found")
        elif mode == "flaky500" and hits == 1:
            self._reply(500, b"oops")
        elif mode == "trunc" or (mode in ("drop", "swap", "swapnoif") and hits <= state.drops):
            self._drop_midway(body)
        elif mode == "norange":
            self._reply(200, body)
        else:
            self._ranged(body, honour_if_range=mode != "swapnoif")

    def _ranged(self, body: bytes, *, honour_if_range: bool = True) -> None:
        """Ranges as RFC 9110 has them: an ``If-Range`` that names another version gets 200."""
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        condition = self.headers.get("If-Range")
        stale = honour_if_range and condition is not None and condition != etag(body)
        if match is None or stale:
            self._reply(200, body, {"Accept-Ranges": "bytes", "ETag": etag(body)})
            return
        start = int(match.group(1))
        if start >= len(body):
            self._reply(416, b"", {"Content-Range": f"bytes */{len(body)}"})
            return
        content_range = f"bytes {start}-{len(body) - 1}/{len(body)}"
        self._reply(206, body[start:], {"Content-Range": content_range, "ETag": etag(body)})

    def _drop_midway(self, body: bytes) -> None:
        """Announce the whole body, send half of it, then cut the connection."""
        self.send_response(200)
        self.send_header("ETag", etag(body))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ServerState) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = state

    def handle_error(self, request: object, client_address: object) -> None:
        """Dropped connections are the point of some tests; don't print tracebacks."""


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState()
    httpd = Server(state)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating bytes so misplaced offsets change the hash."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def etag(data: bytes) -> str:
    """The loopback host's strong ETag of a version of a file."""
    return f'"{sha(data)[:16]}"'


def started_part(dest, held: bytes, url: str, tag: str | None) -> None:
    """A ``.part`` as an interrupted download leaves it: bytes plus the first response's record."""
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(held)
    record = {"etag": tag, "last_modified": None, "length": None, "url": url}
    part.with_name(part.name + ".json").write_text(json.dumps(record))


def test_normal_download_records_manifest(server, tmp_path):
    base, state = server
    state.files["a.bin"] = data = payload(100_000)
    dest = tmp_path / "data" / "a.bin"
    manifest = tmp_path / "data" / "manifest.json"

    [result] = fetch_all([FetchItem(f"{base}/ok/a.bin", dest)], manifest, **FAST)

    assert result.ok, result.error
    assert not result.skipped
    assert dest.read_bytes() == data
    assert result.sha256 == sha(data)
    assert result.size == len(data)
    assert not (tmp_path / "data" / "a.bin.part").exists()
    recorded = json.loads(manifest.read_text())["a.bin"]
    assert recorded["size"] == len(data)
    assert recorded["sha256"] == sha(data)
    assert recorded["url"] == f"{base}/ok/a.bin"


def test_dropped_connection_resumes_with_range(server, tmp_path):
    base, state = server
    state.files["big.bin"] = data = payload(256 * 1024)
    state.drops = 2
    dest = tmp_path / "big.bin"

    [result] = fetch_all([FetchItem(f"{base}/drop/big.bin", dest)], tmp_path / "m.json", **FAST)

    assert result.ok, result.error
    assert dest.read_bytes() == data
    assert result.sha256 == sha(data)
    seen = state.ranges["/drop/big.bin"]
    assert seen[0] is None
    offsets = [int(re.fullmatch(r"bytes=(\d+)-", header).group(1)) for header in seen[1:]]
    assert offsets and all(offset > 0 for offset in offsets)
    # every resume is conditional on the version whose first part is on disk
    assert state.if_ranges["/drop/big.bin"][1:] == [etag(data)] * len(offsets)
    assert verify_manifest(tmp_path / "m.json") == []
    assert not (tmp_path / "big.bin.part.json").exists()


@pytest.mark.parametrize("mode", ["swap", "swapnoif"])
def test_file_swapped_mid_download_restarts_from_zero(server, tmp_path, mode, caplog):
    """swap honours If-Range (200 with the new file); swapnoif ignores it and sends the rest of
    the new file as 206, which its changed ETag gives away."""
    base, state = server
    old, new = payload(200_000, seed=1), payload(200_000, seed=2)
    state.files["w.bin"], state.swaps["w.bin"] = old, new
    dest = tmp_path / "w.bin"

    with caplog.at_level(logging.WARNING, logger="deo.data.fetch"):
        [result] = fetch_all(
            [
                FetchItem(f"{base}/{mode}/w.bin", dest),
            ],
            tmp_path / "m.json",
            **FAST,
        )

    assert result.ok, result.error
    assert dest.read_bytes() == new and result.sha256 == sha(new)
    assert state.if_ranges[f"/{mode}/w.bin"][1] == etag(old)
    assert "starting over" in caplog.text
    if mode == "swapnoif":  # 206 refused, then a plain request for the whole new file
        assert state.ranges[f"/{mode}/w.bin"][-1] is None


def test_part_without_a_record_is_started_over(server, tmp_path, caplog):
    base, state = server
    state.files["r.bin"] = data = payload(30_000)
    dest = tmp_path / "r.bin"
    (tmp_path / "r.bin.part").write_bytes(payload(10_000, seed=9))  # e.g. from an older version

    with caplog.at_level(logging.WARNING, logger="deo.data.fetch"):
        [result] = fetch_all([FetchItem(f"{base}/ok/r.bin", dest)], tmp_path / "m.json", **FAST)

    assert result.ok, result.error
    assert dest.read_bytes() == data
    assert state.ranges["/ok/r.bin"] == [None]
    assert "no record of the file" in caplog.text


def test_changed_remote_copy_of_a_recorded_file_is_an_error(server, tmp_path):
    base, state = server
    state.files["m.bin"] = old = payload(20_000, seed=3)
    dest, manifest = tmp_path / "m.bin", tmp_path / "m.json"
    item = FetchItem(f"{base}/ok/m.bin", dest)
    fetch_all([item], manifest, **FAST)
    recorded = manifest.read_text()
    dest.unlink()
    state.files["m.bin"] = new = payload(20_000, seed=4)

    [result] = fetch_all([item], manifest, **FAST)

    assert not result.ok
    assert "m.bin" in result.error and sha(old) in result.error and sha(new) in result.error
    assert "data.fetch.refresh" in result.error
    assert manifest.read_text() == recorded and not dest.exists()

    before = state.count("/ok/m.bin")
    [result] = fetch_all([item], manifest, refresh=True, **FAST)

    assert result.ok, result.error
    assert dest.read_bytes() == new
    assert Manifest(manifest).get(dest)["sha256"] == sha(new)
    # the new bytes were kept in the .part file: the refresh only confirms they are complete
    assert state.ranges["/ok/m.bin"][before:] == [f"bytes={len(new)}-"]


def test_absent_recorded_file_with_the_same_remote_copy_is_fetched_again(server, tmp_path):
    base, state = server
    state.files["k.bin"] = data = payload(5_000)
    dest, manifest = tmp_path / "k.bin", tmp_path / "m.json"
    item = FetchItem(f"{base}/ok/k.bin", dest)
    fetch_all([item], manifest, **FAST)
    dest.unlink()

    [result] = fetch_all([item], manifest, **FAST)

    assert result.ok, result.error
    assert dest.read_bytes() == data


def test_server_error_is_retried(server, tmp_path):
    base, state = server
    state.files["c.bin"] = data = payload(5000)
    dest = tmp_path / "c.bin"

    [result] = fetch_all([FetchItem(f"{base}/flaky500/c.bin", dest)], tmp_path / "m.json", **FAST)

    assert result.ok, result.error
    assert dest.read_bytes() == data
    assert state.count("/flaky500/c.bin") == 2


def test_always_truncated_gives_up_without_dest(server, tmp_path):
    base, state = server
    state.files["t.bin"] = payload(64 * 1024)
    dest = tmp_path / "t.bin"

    [result] = fetch_all([FetchItem(f"{base}/trunc/t.bin", dest)], tmp_path / "m.json", **FAST)

    assert not result.ok
    assert "truncated" in result.error or "connection lost" in result.error
    assert "gave up" in result.error
    assert not dest.exists()
    # The first attempt grows the .part from 0 (progress resets the count), then
    # retries + 1 attempts in a row make no progress.
    assert state.count("/trunc/t.bin") == FAST["retries"] + 2
    assert not (tmp_path / "m.json").exists() or "t.bin" not in (tmp_path / "m.json").read_text()


def test_404_fails_at_once(server, tmp_path):
    base, state = server
    dest = tmp_path / "gone.bin"

    [result] = fetch_all([FetchItem(f"{base}/missing/gone.bin", dest)], tmp_path / "m.json", **FAST)

    assert not result.ok
    assert "404" in result.error
    assert state.count("/missing/gone.bin") == 1
    assert not dest.exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    base, state = server
    state.files["n.bin"] = data = payload(50_000)
    dest = tmp_path / "n.bin"
    started_part(dest, b"garbage that must not survive" * 10, f"{base}/norange/n.bin", etag(data))

    [result] = fetch_all([FetchItem(f"{base}/norange/n.bin", dest)], tmp_path / "m.json", **FAST)

    assert result.ok, result.error
    assert state.ranges["/norange/n.bin"][0] == "bytes=290-"
    assert dest.read_bytes() == data
    assert result.sha256 == sha(data)


def test_complete_part_answered_with_416_is_finished(server, tmp_path):
    base, state = server
    state.files["done.bin"] = data = payload(10_000)
    dest = tmp_path / "done.bin"
    started_part(dest, data, f"{base}/ok/done.bin", etag(data))

    [result] = fetch_all([FetchItem(f"{base}/ok/done.bin", dest)], tmp_path / "m.json", **FAST)

    assert result.ok, result.error
    assert state.ranges["/ok/done.bin"] == [f"bytes={len(data)}-"]
    assert dest.read_bytes() == data
    assert result.sha256 == sha(data)


def test_second_run_skips_without_requests(server, tmp_path):
    base, state = server
    items = []
    for index in range(3):
        state.files[f"s{index}.bin"] = payload(3000, seed=index)
        items.append(FetchItem(f"{base}/ok/s{index}.bin", tmp_path / f"s{index}.bin"))
    manifest = tmp_path / "m.json"
    first = fetch_all(items, manifest, **FAST)
    requests_after_first = state.total()

    second = fetch_all(items, manifest, **FAST)

    assert all(result.ok and not result.skipped for result in first)
    assert all(result.ok and result.skipped for result in second)
    assert [result.sha256 for result in second] == [result.sha256 for result in first]
    assert state.total() == requests_after_first == 3


def test_tampered_file_is_reported_not_overwritten(server, tmp_path):
    base, state = server
    state.files["x.bin"] = payload(4000)
    dest = tmp_path / "x.bin"
    manifest = tmp_path / "m.json"
    item = FetchItem(f"{base}/ok/x.bin", dest)
    fetch_all([item], manifest, **FAST)
    tampered = b"\0" * 4000
    dest.write_bytes(tampered)

    [result] = fetch_all([item], manifest, **FAST)
    problems = verify_manifest(manifest)

    assert not result.ok
    assert "x.bin" in result.error and "sha256" in result.error
    assert dest.read_bytes() == tampered
    assert len(problems) == 1 and "x.bin" in problems[0]
    assert state.count("/ok/x.bin") == 1


def test_present_file_not_in_manifest_is_recorded(tmp_path):
    dest = tmp_path / "local.bin"
    dest.write_bytes(data := payload(777))
    manifest = tmp_path / "m.json"

    [result] = fetch_all([FetchItem("http://127.0.0.1:9/never", dest)], manifest, **FAST)

    assert result.ok and result.skipped
    assert Manifest(manifest).get(dest) == {
        "size": 777,
        "sha256": sha(data),
        "url": "http://127.0.0.1:9/never",
        "mtime_ns": dest.stat().st_mtime_ns,
    }


def test_file_url_resumes_partial(tmp_path):
    source = tmp_path / "src" / "f.bin"
    source.parent.mkdir()
    source.write_bytes(data := payload(123_457))
    dest = tmp_path / "out" / "f.bin"
    dest.parent.mkdir()
    info = source.stat()
    started_part(dest, data[:50_000], source.as_uri(), f'"{info.st_size}-{info.st_mtime_ns}"')
    # a resumed read computes no hash while streaming: a correct digest proves the splice
    [result] = fetch_all([FetchItem(source.as_uri(), dest)], tmp_path / "out" / "m.json", **FAST)

    assert result.ok, result.error
    assert dest.read_bytes() == data
    assert result.sha256 == sha(data)
    assert not (dest.parent / "f.bin.part").exists()


def test_file_url_changed_since_the_partial_is_read_again(tmp_path):
    source = tmp_path / "src" / "g.bin"
    source.parent.mkdir()
    source.write_bytes(old := payload(60_000, seed=5))
    dest = tmp_path / "g.bin"
    info = source.stat()
    started_part(dest, old[:20_000], source.as_uri(), f'"{info.st_size}-{info.st_mtime_ns}"')
    source.write_bytes(new := payload(60_000, seed=6))
    os.utime(source, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))

    [result] = fetch_all([FetchItem(source.as_uri(), dest)], tmp_path / "m.json", **FAST)

    assert result.ok, result.error
    assert dest.read_bytes() == new and result.sha256 == sha(new)


def test_missing_file_url_fails(tmp_path):
    item = FetchItem((tmp_path / "nope.bin").as_uri(), tmp_path / "out.bin")

    [result] = fetch_all([item], tmp_path / "m.json", **FAST)

    assert not result.ok
    assert "no such file" in result.error


def test_parallel_many_files(server, tmp_path):
    base, state = server
    items = []
    for index in range(20):
        state.files[f"p{index}.bin"] = payload(2000 + 37 * index, seed=index)
        items.append(FetchItem(f"{base}/ok/p{index}.bin", tmp_path / "par" / f"p{index}.bin"))
    manifest = tmp_path / "par" / "manifest.json"

    results = fetch_all(items, manifest, **{**FAST, "workers": 4})

    assert all(result.ok for result in results)
    for index, item in enumerate(items):
        assert item.dest.read_bytes() == state.files[f"p{index}.bin"]
    assert len(json.loads(manifest.read_text())) == 20
    assert verify_manifest(manifest) == []


def test_require_ok_names_failed_file(server, tmp_path):
    base, state = server
    state.files["good.bin"] = payload(100)
    items = [
        FetchItem(f"{base}/ok/good.bin", tmp_path / "good.bin"),
        FetchItem(f"{base}/missing/bad.bin", tmp_path / "bad.bin"),
    ]
    results = fetch_all(items, tmp_path / "m.json", **FAST)

    with pytest.raises(DataError, match=r"bad\.bin.*404.*1 of 2"):
        require_ok(results)
    require_ok(results[:1])


def closed_port() -> int:
    """A loopback port with nothing listening, so connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_secrets_never_logged(server, tmp_path, caplog):
    base, _ = server
    secret = "user:hunter2@"
    refused = f"http://{secret}127.0.0.1:{closed_port()}/r.bin?token=s3cr3t"
    missing = base.replace("http://", f"http://{secret}") + "/missing/s.bin?token=s3cr3t"
    items = [FetchItem(refused, tmp_path / "r.bin"), FetchItem(missing, tmp_path / "s.bin")]
    caplog.set_level(logging.DEBUG, logger="deo")

    results = fetch_all(items, tmp_path / "m.json", **FAST)

    assert [result.ok for result in results] == [False, False]
    assert "connection failed" in results[0].error
    for text in (caplog.text, *(result.error for result in results)):
        assert "hunter2" not in text
        assert "s3cr3t" not in text
    assert "/missing/s.bin" in caplog.text


def test_s3_without_boto3_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)

    [result] = fetch_all(
        [FetchItem("s3://bucket/key.bin", tmp_path / "k.bin")], tmp_path / "m.json", **FAST
    )

    assert not result.ok
    assert result.error == "s3:// needs boto3: pip install deo[s3]"


def test_duplicate_destinations_rejected(tmp_path):
    dest = tmp_path / "same.bin"
    with pytest.raises(ValueError, match=r"same\.bin"):
        fetch_all([FetchItem("file:///a", dest), FetchItem("file:///b", dest)], tmp_path / "m")


def test_manifest_keys_are_relative_and_writes_atomic(tmp_path):
    manifest = Manifest(tmp_path / "meta" / "manifest.json")
    manifest.record(tmp_path / "data" / "f.bin", 3, "abc", "file:///f")

    assert manifest.key(tmp_path / "data" / "f.bin") == "../data/f.bin"
    assert json.loads((tmp_path / "meta" / "manifest.json").read_text()) == {
        "../data/f.bin": {"size": 3, "sha256": "abc", "url": "file:///f"}
    }
    assert os.listdir(tmp_path / "meta") == ["manifest.json"]


def test_verify_skips_unchanged_files_unless_asked_to_rehash(tmp_path):
    file = tmp_path / "archive.bin"
    file.write_bytes(b"a" * 1000)
    manifest = Manifest(tmp_path / "manifest.json")
    manifest.record(file, 1000, sha(b"a" * 1000), "file:///x")
    recorded = file.stat().st_mtime_ns
    file.write_bytes(b"b" * 1000)  # same size, different bytes, mtime put back: not re-read
    os.utime(file, ns=(recorded, recorded))
    assert verify_manifest(tmp_path / "manifest.json") == []
    [problem] = verify_manifest(tmp_path / "manifest.json", rehash=True)
    assert "sha256" in problem and "archive.bin" in problem
    os.utime(file, ns=(recorded + 10**9, recorded + 10**9))  # touched: re-hashed without asking
    [problem] = verify_manifest(tmp_path / "manifest.json")
    assert "sha256" in problem
