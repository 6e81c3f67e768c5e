"""Fetching and unpacking benchmark archives with the project's verified, resumable tools.

Downloads go through ``deo.data.fetch.fetch_all`` (resume, retries, sha256 recorded in a
manifest beside the data on first download). Tarballs are unpacked by
``deo.data.extract.extract_tar``; zips by ``extract_zip`` below, which applies the same rules:
members are written by this module (never by ``zipfile.extract``), and anything that could land
outside the destination is refused and reported.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from deo.data.extract import ExtractReport, copy_atomic, safe_target
from deo.data.fetch import FetchItem, fetch_all, require_ok
from deo.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
"""File name of the checksum manifest written in each benchmark's data folder."""

_COPY_BLOCK = 1 << 20


def fetch(items: Sequence[FetchItem], root: Path) -> None:
    """Fetch ``items`` (verified against, or recorded in, ``root/manifest.json``) or raise."""
    require_ok(fetch_all(items, Path(root) / MANIFEST))


def _zip_destination(info: zipfile.ZipInfo, dest: Path, flatten: bool) -> Path | str:
    """Where a member goes under ``dest`` (already resolved), or why it may not be written."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink refused"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no type recorded, a plain file
        return "device, fifo or other special file refused"
    if info.flag_bits & 0x1:
        return "encrypted member refused"
    return safe_target(info.filename, dest, flatten=flatten)


def extract_zip(
    archive: Path,
    dest: Path,
    *,
    wanted: Callable[[str], bool] | None = None,
    flatten: bool = False,
) -> ExtractReport:
    """Extract the regular files of ``archive`` that ``wanted`` accepts into ``dest``.

    ``flatten`` writes every member under its base name directly in ``dest`` (for archives
    whose folder nesting varies between releases). Files already present with the member's
    size are kept, so an interrupted run can be repeated. Refused members (links, special
    files, absolute or ``..`` paths, encrypted) are logged and listed in the report. Raises
    DataError on a corrupt archive (bad structure or CRC), after keeping completed members.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(dest))
    report = ExtractReport()
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or (wanted is not None and not wanted(info.filename)):
                    continue
                target = _zip_destination(info, root, flatten)
                if isinstance(target, str):
                    log.warning("skipping zip member %r: %s", info.filename, target)
                    report.skipped.append((info.filename, target))
                    continue
                if not (target.is_file() and target.stat().st_size == info.file_size):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    copy_atomic(zf.open(info), target)
                report.extracted.append(info.filename)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(archive, f"corrupt or truncated zip archive: {exc}") from exc
    report.log_summary(archive, dest)
    return report
