"""Download inputs over file://, http(s):// and s3:// with resume, retries and a checksum manifest.

Upstream publishes no checksums, so the pipeline records size and sha256 of everything it fetched
in a manifest and verifies files against it on later runs. Partial data only ever lives in
``<dest>.part``; ``dest`` appears (atomically) once the transfer is complete.

A ``.part`` is continued only when it provably holds the start of the file the host serves now:
the validators of the response that started it (ETag, Last-Modified, length; size and mtime for
``file://``) are kept in ``<dest>.part.json`` and every resume is conditional on them (HTTP
``If-Range``, S3 ``IfMatch``). A host that answers with another file restarts the download from
byte 0; a ``.part`` without a usable record is started over. A file already in the manifest
whose remote copy changed is an error unless ``refresh`` is asked for: the manifest is never
rewritten silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NotRequired, TypedDict
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from deo.errors import DataError

log = logging.getLogger(__name__)

S3_MISSING = "s3:// needs boto3: pip install deo[s3]"
_MAX_DELAY = 60.0
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")
_CREDENTIALS = re.compile(r"(?<=//)[^/\s@]+@")
_QUERY = re.compile(r"\?[^\s'\"()]+")


@dataclass(frozen=True)
class FetchItem:
    """One file to fetch: where it comes from and where it must end up."""

    url: str
    dest: Path


@dataclass
class FetchResult:
    """Outcome of one item; failures are data, so callers decide which ones are fatal."""

    item: FetchItem
    ok: bool
    error: str | None
    size: int | None
    sha256: str | None
    skipped: bool


class ManifestEntry(TypedDict):
    """What the pipeline knows about a fetched file, recorded on first download."""

    size: int
    sha256: str
    url: str
    mtime_ns: NotRequired[int]  # when the hash was taken: an unchanged file need not be re-read


class Manifest:
    """Thread-safe JSON record of fetched files, keyed by path relative to the manifest's folder.

    Keys are relative so the data folder can move; writes go through a temporary file and
    ``os.replace`` so an interrupted run never leaves a half-written manifest.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, ManifestEntry] = self._load()

    def _load(self) -> dict[str, ManifestEntry]:
        if not self.path.exists():
            return {}
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(self.path, f"unreadable manifest: {exc}") from exc
        if not isinstance(entries, dict):
            raise DataError(self.path, "unreadable manifest: not a JSON object")
        return entries

    def key(self, file: Path) -> str:
        """Manifest key of ``file``: its path relative to the manifest's folder."""
        base = self.path.absolute().parent
        return Path(os.path.relpath(Path(file).absolute(), base)).as_posix()

    def get(self, file: Path) -> ManifestEntry | None:
        """The recorded entry for ``file``, or None when it was never recorded."""
        with self._lock:
            return self._entries.get(self.key(file))

    def paths(self) -> list[Path]:
        """Every recorded file, as a path next to the manifest."""
        with self._lock:
            keys = sorted(self._entries)
        return [self.path.parent / key for key in keys]

    def record(self, file: Path, size: int, sha256: str, url: str) -> None:
        """Remember ``file`` and save at once, so an interrupted run keeps what it finished."""
        entry: ManifestEntry = {"size": size, "sha256": sha256, "url": url}
        if Path(file).is_file():  # the hash is of the file as it is now: remember when that was
            entry["mtime_ns"] = Path(file).stat().st_mtime_ns
        with self._lock:
            self._entries[self.key(file)] = entry
            self._write()

    def save(self) -> None:
        """Write the manifest atomically."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self._entries, indent=1, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def verify(self, file: Path, rehash: bool = False) -> str | None:
        """Why ``file`` does not match its record, or None when size and sha256 agree.

        A file whose size and modification time both equal the recorded ones is not re-read
        (hashing the 77.5 GB archive takes minutes) unless ``rehash`` is set.
        """
        entry = self.get(file)
        if entry is None:
            return f"{file}: not recorded in manifest {self.path}"
        if not Path(file).is_file():
            return f"{file}: missing (recorded in manifest {self.path})"
        stat = Path(file).stat()
        size = stat.st_size
        if size != entry["size"]:
            return f"{file}: size {size} differs from manifest {self.path} ({entry['size']})"
        if not rehash and entry.get("mtime_ns") == stat.st_mtime_ns:
            return None
        digest = sha256_file(Path(file))
        if digest != entry["sha256"]:
            return f"{file}: sha256 {digest} differs from manifest {self.path} ({entry['sha256']})"
        return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file on disk, read in blocks so huge archives are fine."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(partial(handle.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def redact(url: str) -> str:
    """``url`` without credentials, query or fragment, safe to log or store."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _scrub(text: str) -> str:
    """Strip credentials and query strings that library error messages may echo back."""
    return _QUERY.sub("?…", _CREDENTIALS.sub("", text))


class _Retryable(Exception):
    """A transient failure: try again after a pause, resuming from the ``.part`` file."""


class _RangeRejected(_Retryable):
    """The ``.part`` file cannot be continued: discard it and start again from byte 0."""


Validators = dict[str, Any]
"""What identifies one version of a remote file: ``etag``, ``last_modified``, ``length``."""


class _Fatal(Exception):
    """A failure that retrying will not fix (404, 403, missing boto3, ...)."""


@dataclass
class _Body:
    """An open source: the bytes from ``start`` on, and the full size when announced."""

    start: int
    total: int | None
    chunks: Iterator[bytes]
    close: Callable[[], object]
    validators: Validators = field(default_factory=dict)


def _status_failure(status: int, what: str = "HTTP") -> Exception:
    """Map a failing status to retry (429, 5xx) or immediate failure (other codes)."""
    message = f"{what} {status}"
    return _Retryable(message) if status == 429 or status >= 500 else _Fatal(message)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, full size) from a Content-Range header, None where absent or unknown."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _guarded(chunks: Iterable[bytes], errors: tuple[type[BaseException], ...]) -> Iterator[bytes]:
    """Turn read errors in the middle of a body into retryable failures."""
    try:
        yield from chunks
    except errors as exc:
        raise _Retryable(f"connection lost mid-transfer: {exc}") from exc


def _strong_etag(validators: Validators) -> str | None:
    """The ETag when it is a strong one (weak ones may not be used for ranges, RFC 9110)."""
    etag = validators.get("etag")
    return etag if isinstance(etag, str) and not etag.startswith("W/") else None


def _if_range(validators: Validators) -> str | None:
    """The ``If-Range`` value that makes a ranged request safe, or None when there is none."""
    return _strong_etag(validators) or validators.get("last_modified") or None


def _open_http(url: str, offset: int, recorded: Validators, fetcher: _Fetcher) -> _Body:
    """GET ``url`` from ``offset`` on; raw bytes, so a .gz stays exactly as served.

    A ranged request carries ``If-Range``: a host whose file changed answers 200 (the whole new
    file) rather than the rest of another file."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = _if_range(recorded) or ""
    try:
        response = fetcher.session().get(url, headers=headers, stream=True, timeout=fetcher.timeout)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Retryable(f"connection failed: {exc}") from exc
    status = response.status_code
    if status == 416 and offset:
        response.close()
        _, total = _parse_content_range(response.headers.get("Content-Range"))
        if total == offset:
            return _Body(offset, total, iter(()), lambda: None)
        raise _RangeRejected(f"HTTP 416 for a {offset}-byte partial file (remote size {total})")
    if status not in (200, 206):
        response.close()
        raise _status_failure(status)
    start, total = _response_span(response)
    raw = response.raw.stream(fetcher.chunk_size, decode_content=False)
    errors = (urllib3.exceptions.HTTPError, requests.RequestException, OSError)
    validators = {
        "etag": response.headers.get("ETag"),
        "last_modified": response.headers.get("Last-Modified"),
        "length": total,
    }
    return _Body(start, total, _guarded(raw, errors), response.close, validators)


def _response_span(response: requests.Response) -> tuple[int, int | None]:
    """First byte and full size of a 200 or 206 body."""
    if response.status_code == 200:
        length = response.headers.get("Content-Length", "")
        return 0, int(length) if length.isdigit() else None
    start, total = _parse_content_range(response.headers.get("Content-Range"))
    if start is None:
        response.close()
        raise _RangeRejected("HTTP 206 without a usable Content-Range")
    return start, total


def _open_file(url: str, offset: int, recorded: Validators, fetcher: _Fetcher) -> _Body:
    """Read a local file from ``offset`` on, so file:// shares the download code path.

    Size and modification time stand in for an ETag: a changed file is read from byte 0."""
    path = Path(url2pathname(urlsplit(url).path))
    try:
        handle = path.open("rb")
    except FileNotFoundError as exc:
        raise _Fatal(f"no such file: {path}") from exc
    info = os.fstat(handle.fileno())
    total = info.st_size
    etag = f'"{total}-{info.st_mtime_ns}"'
    start = offset if offset <= total and etag == recorded.get("etag") else 0
    handle.seek(start)
    validators = {"etag": etag, "last_modified": None, "length": total}
    chunks = iter(partial(handle.read, fetcher.chunk_size), b"")
    return _Body(start, total, chunks, handle.close, validators)


def _open_s3(url: str, offset: int, recorded: Validators, fetcher: _Fetcher) -> _Body:
    """Ranged GET of a public S3 object with unsigned requests, conditional on its ETag."""
    client = fetcher.s3_client()
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(url)
    request = {"Bucket": parts.netloc, "Key": parts.path.lstrip("/")}
    if offset:
        request["Range"] = f"bytes={offset}-"
        request["IfMatch"] = _strong_etag(recorded) or "*"
    try:
        response = client.get_object(**request)
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if status == 416 and offset:
            raise _RangeRejected(f"S3 416 for a {offset}-byte partial file") from exc
        if status == 412 and offset:
            raise _RangeRejected("the S3 object changed since the partial download") from exc
        raise _status_failure(status, "S3 HTTP") from exc
    except BotoCoreError as exc:
        raise _Retryable(f"S3 request failed: {exc}") from exc
    start, total = _parse_content_range(response.get("ContentRange"))
    if start is None:
        start, total = 0, response.get("ContentLength")
    body = response["Body"]
    errors = (BotoCoreError, urllib3.exceptions.HTTPError, OSError)
    chunks = _guarded(body.iter_chunks(fetcher.chunk_size), errors)
    validators = {"etag": response.get("ETag"), "last_modified": None, "length": total}
    return _Body(start, total, chunks, body.close, validators)


_OPENERS: dict[str, Callable[[str, int, Validators, _Fetcher], _Body]] = {
    "http": _open_http,
    "https": _open_http,
    "file": _open_file,
    "s3": _open_s3,
}


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _validators_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_validators(part: Path) -> Validators:
    """The record of the response that started ``part``; {} when absent or unreadable."""
    try:
        found = json.loads(_validators_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write_validators(part: Path, url: str, validators: Validators) -> None:
    """Record what ``part`` is the start of, atomically (a kill leaves the old or new record)."""
    path = _validators_path(part)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**validators, "url": url}, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _discard_part(part: Path) -> None:
    """Remove a partial download and its record (the data first: no record, no resume)."""
    part.unlink(missing_ok=True)
    _validators_path(part).unlink(missing_ok=True)


def _changed(recorded: Validators, now: Validators) -> list[str]:
    """The validators that differ between the recorded and the current response."""
    return [
        name
        for name in ("etag", "last_modified", "length")
        if recorded.get(name) is not None
        and now.get(name) is not None
        and recorded[name] != now[name]
    ]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class _Fetcher:
    """State shared by the worker threads of one ``fetch_all`` call."""

    def __init__(
        self,
        manifest: Manifest,
        bar: tqdm,
        *,
        retries: int,
        backoff: float,
        timeout: float,
        chunk_size: int,
        total_files: int,
        refresh: bool = False,
    ) -> None:
        self.manifest = manifest
        self.refresh = refresh
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.chunk_size = chunk_size
        self._bar = bar
        self._total_files = total_files
        self._done_files = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []

    def session(self) -> requests.Session:
        """This thread's HTTP session: sessions are not safe to share between threads."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        return session

    def s3_client(self) -> Any:
        """This thread's unsigned S3 client; boto3 stays an optional dependency."""
        client = getattr(self._local, "s3", None)
        if client is None:
            try:
                import boto3
                from botocore import UNSIGNED
                from botocore.config import Config
            except ImportError as exc:
                raise _Fatal(S3_MISSING) from exc
            config = Config(
                signature_version=UNSIGNED,
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
            )
            client = self._local.s3 = boto3.session.Session().client("s3", config=config)
        return client

    def close(self) -> None:
        """Release the pooled connections of every thread's session."""
        with self._lock:
            for session in self._sessions:
                session.close()

    def _advance(self, nbytes: int = 0, *, file_done: bool = False) -> None:
        with self._lock:
            self._bar.update(nbytes)
            if file_done:
                self._done_files += 1
                self._bar.set_postfix_str(f"{self._done_files}/{self._total_files} files")

    def fetch(self, item: FetchItem) -> FetchResult:
        """Fetch one item, turning every failure into a result instead of an exception."""
        dest = Path(item.dest)
        try:
            return self._check_existing(item) if dest.exists() else self._download(item)
        except _Fatal as exc:
            error = _scrub(str(exc))
        except Exception as exc:  # any failure becomes a result: callers decide what is fatal
            error = _scrub(f"{type(exc).__name__}: {exc}")
        finally:
            self._advance(file_done=True)
        log.error("fetching %s -> %s failed: %s", redact(item.url), dest, error)
        return FetchResult(item, False, error, None, None, False)

    def _check_existing(self, item: FetchItem) -> FetchResult:
        """Verify a present file against the manifest, or record it if it was never seen."""
        dest = Path(item.dest)
        entry = self.manifest.get(dest)
        if entry is None:
            size, digest = dest.stat().st_size, sha256_file(dest)
            self.manifest.record(dest, size, digest, redact(item.url))
            log.info("recorded already present %s (%d bytes)", dest, size)
            return FetchResult(item, True, None, size, digest, True)
        problem = self.manifest.verify(dest)
        if problem is not None:
            raise _Fatal(f"{problem}; not overwriting, delete the file to fetch it again")
        return FetchResult(item, True, None, entry["size"], entry["sha256"], True)

    def _download(self, item: FetchItem) -> FetchResult:
        dest = Path(item.dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = _part_path(dest)
        size, digest = self._transfer_with_retries(item, part)
        self._check_unchanged(dest, size, digest)
        os.replace(part, dest)
        _validators_path(part).unlink(missing_ok=True)
        self.manifest.record(dest, size, digest, redact(item.url))
        log.info("fetched %s -> %s (%d bytes)", redact(item.url), dest, size)
        return FetchResult(item, True, None, size, digest, False)

    def _check_unchanged(self, dest: Path, size: int, digest: str) -> None:
        """A file the manifest already knows must come back with the recorded checksum.

        The new bytes stay in the ``.part`` file, so a refresh asked for later (or a host that
        goes back to the recorded file) does not download them again."""
        entry = self.manifest.get(dest)
        if entry is None or (entry["size"], entry["sha256"]) == (size, digest):
            return
        change = (
            f"the remote copy changed: manifest {self.manifest.path} records sha256 "
            f"{entry['sha256']} ({entry['size']} bytes), the host now serves sha256 {digest} "
            f"({size} bytes)"
        )
        if not self.refresh:
            raise _Fatal(
                f"{dest}: {change}; set data.fetch.refresh: true to accept the new file "
                "(it is kept in the .part file)"
            )
        log.warning("%s: %s; refreshing it as data.fetch.refresh asks", dest, change)

    def _transfer_with_retries(self, item: FetchItem, part: Path) -> tuple[int, str]:
        """Retry transient failures; ``retries`` bounds consecutive attempts without progress.

        Attempts that grew the ``.part`` file reset the count, so a long download over a
        flaky link keeps going as long as it advances.
        """
        failures = 0
        while True:
            held = _size(part)
            try:
                return self._transfer(item, part)
            except _Retryable as exc:
                if isinstance(exc, _RangeRejected):
                    _discard_part(part)
                failures = 0 if _size(part) > held else failures + 1
                if failures > self.retries:
                    raise _Fatal(f"{exc} (gave up after {self.retries} retries)") from exc
                delay = min(self.backoff * 2 ** max(failures - 1, 0), _MAX_DELAY)
                delay += random.uniform(0, self.backoff / 2)
                log.warning("%s: %s; retrying in %.2fs", redact(item.url), _scrub(str(exc)), delay)
                time.sleep(delay)

    def _transfer(self, item: FetchItem, part: Path) -> tuple[int, str]:
        """One attempt: continue ``part`` from its current size and check the final length."""
        scheme = urlsplit(item.url).scheme
        opener = _OPENERS.get(scheme)
        if opener is None:
            raise _Fatal(f"unsupported URL scheme {scheme!r}")
        url = redact(item.url)
        offset = _size(part)
        recorded = _read_validators(part) if offset else {}
        if offset and (recorded.get("url") != url or _if_range(recorded) is None):
            log.warning(
                "%s: %d-byte partial download has no record of the file it is the start of "
                "(validators); starting it over",
                part,
                offset,
            )
            _discard_part(part)
            offset, recorded = 0, {}
        body = opener(item.url, offset, recorded, self)
        try:
            if body.start > offset:
                raise _RangeRejected(f"source resumed at byte {body.start}, past byte {offset}")
            if body.start == 0:
                if offset:
                    log.warning(
                        "%s: the host sent the whole file instead of the rest (it changed, or "
                        "ignores ranges); starting over",
                        url,
                    )
                part.write_bytes(b"")  # no old byte may sit under the new record
                _write_validators(part, url, body.validators)
            elif changed := _changed(recorded, body.validators):
                raise _RangeRejected(
                    f"the remote file changed since the partial download ({', '.join(changed)} "
                    "differ); starting over"
                )
            size, digest = self._write(body, part)
        finally:
            body.close()
        if body.total is not None and size < body.total:
            raise _Retryable(f"truncated: received {size} of {body.total} bytes")
        if body.total is not None and size > body.total:
            raise _RangeRejected(f"size mismatch: have {size} bytes, source has {body.total}")
        return size, digest or sha256_file(part)

    def _write(self, body: _Body, part: Path) -> tuple[int, str | None]:
        """Append the body at ``body.start``; hash while streaming when starting from 0."""
        hasher = hashlib.sha256() if body.start == 0 else None
        size = body.start
        with part.open("ab") as out:
            out.truncate(body.start)
            for chunk in body.chunks:
                out.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                size += len(chunk)
                self._advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        return size, hasher.hexdigest() if hasher is not None else None


def _reject_duplicate_dests(items: Sequence[FetchItem]) -> None:
    """Two items writing the same ``.part`` file would corrupt each other."""
    seen: set[Path] = set()
    for item in items:
        dest = Path(item.dest).absolute()
        if dest in seen:
            raise ValueError(f"more than one item fetches to {dest}")
        seen.add(dest)


def fetch_all(
    items: Sequence[FetchItem],
    manifest: Path,
    *,
    workers: int = 8,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    refresh: bool = False,
) -> list[FetchResult]:
    """Fetch ``items`` in parallel, one result per item in the same order.

    Present files are verified against (or recorded in) ``manifest`` instead of being fetched
    again. A file the manifest records but that is absent is fetched and must match its record,
    unless ``refresh`` accepts (and records) a changed remote copy. Per-item failures never
    raise: see ``require_ok``. Raises ValueError when two items share a destination, and
    DataError when the manifest itself is unreadable.
    """
    _reject_duplicate_dests(items)
    book = Manifest(manifest)
    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="fetch", disable=not progress)
    with bar:
        fetcher = _Fetcher(
            book,
            bar,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            chunk_size=chunk_size,
            total_files=len(items),
            refresh=refresh,
        )
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                results = list(pool.map(fetcher.fetch, items))
        finally:
            fetcher.close()
    skipped = sum(result.skipped for result in results)
    failed = sum(not result.ok for result in results)
    log.info(
        "fetch: %d fetched, %d already present, %d failed",
        len(results) - skipped - failed,
        skipped,
        failed,
    )
    return results


def verify_manifest(
    manifest: Path, paths: Sequence[Path] | None = None, *, rehash: bool = False
) -> list[str]:
    """Problems with ``paths`` (default: every recorded file) against ``manifest``; [] if fine.

    ``rehash`` re-reads files whose size and modification time match their record too.
    """
    if not Path(manifest).exists():
        return [f"{manifest}: manifest does not exist"]
    book = Manifest(manifest)
    targets = book.paths() if paths is None else paths
    problems = (book.verify(path, rehash=rehash) for path in targets)
    return [problem for problem in problems if problem is not None]


def require_ok(results: Sequence[FetchResult]) -> None:
    """Raise DataError for the first failed result, for callers that cannot do without any."""
    failed = [result for result in results if not result.ok]
    if failed:
        first = failed[0]
        raise DataError(
            first.item.dest, f"{first.error} ({len(failed)} of {len(results)} fetches failed)"
        )
