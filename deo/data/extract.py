"""Safe, resumable, streaming extraction of selected members from a (compressed) tar archive.

The source archive is a 77.5 GB .tar.gz of which only a subset is needed, so members are read
in one pass without listing the archive first. Members are never handed to tarfile's own
extraction: this module writes regular files itself and refuses anything that could land
outside the destination (absolute paths, ``..``, links, devices).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import logging
import lzma
import os
import shutil
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from deo.errors import DataError

log = logging.getLogger(__name__)

_COPY_BLOCK = 1 << 20
_MAGIC_OPENERS: tuple[tuple[bytes, Callable[[Path], IO[bytes]]], ...] = (
    (b"\x1f\x8b", gzip.open),
    (b"BZh", bz2.open),
    (b"\xfd7zXZ\x00", lzma.open),
)
_CORRUPTION = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


@dataclass
class ExtractReport:
    """What an extraction produced: members written (or already complete) and members refused."""

    extracted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def log_summary(self, archive: Path, dest: Path) -> None:
        log.info(
            "%s: extracted %d members into %s, skipped %d",
            archive,
            len(self.extracted),
            dest,
            len(self.skipped),
        )


def _open_stream(archive: Path) -> IO[bytes]:
    """Open ``archive``, decompressing by magic bytes.

    The stdlib decompressors raise on a stream that ends early and check the gzip CRC, whereas
    tarfile's own ``r|gz`` reader can take a truncated archive for a complete one and stops at
    the first member of a multi-member gzip.
    """
    with archive.open("rb") as probe:
        head = probe.read(6)
    for magic, opener in _MAGIC_OPENERS:
        if head.startswith(magic):
            return opener(archive)
    return archive.open("rb")


def _destination(member: tarfile.TarInfo, dest: Path, strip_components: int) -> Path | str:
    """Where a member goes under ``dest`` (already resolved), or why it may not be written."""
    if member.issym():
        return f"symlink to {member.linkname!r} refused"
    if member.islnk():
        return f"hardlink to {member.linkname!r} refused"
    if member.ischr() or member.isblk() or member.isfifo():
        return "device or fifo refused"
    if not member.isreg():
        return f"unsupported member type {member.type!r}"
    return safe_target(member.name, dest, strip_components)


def safe_target(
    name: str, dest: Path, strip_components: int = 0, flatten: bool = False
) -> Path | str:
    """Where an archive member named ``name`` goes under ``dest`` (resolved), or why not.

    Shared by every extractor (tar here, zip for the benchmarks): absolute paths (also with a
    drive letter or backslashes), ``..`` components and anything that resolves outside
    ``dest`` through an existing symlink are refused.
    """
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        return "absolute path refused"
    if ".." in path.parts:
        return "'..' path component refused"
    parts = (path.name,) if flatten else path.parts[strip_components:]
    if not parts:
        return f"fewer than {strip_components + 1} path components"
    target = dest.joinpath(*parts)
    if not Path(os.path.realpath(target)).is_relative_to(dest):
        return "resolves outside the destination"
    return target


def copy_atomic(source: IO[bytes], target: Path) -> None:
    """Stream ``source`` into ``<target>.part`` and rename it, so ``target`` is never partial."""
    part = target.with_name(target.name + ".part")
    try:
        with source, part.open("wb") as out:
            shutil.copyfileobj(source, out, _COPY_BLOCK)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    dest: Path,
    strip_components: int,
    report: ExtractReport,
) -> None:
    """Write one wanted member, or record in ``report`` why it was skipped."""
    target = _destination(member, dest, strip_components)
    if isinstance(target, str):
        log.warning("skipping tar member %r: %s", member.name, target)
        report.skipped.append((member.name, target))
        return
    if target.is_file() and target.stat().st_size == member.size:
        report.extracted.append(member.name)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("skipping tar member %r: %s", member.name, exc)
        report.skipped.append((member.name, f"cannot create folder: {exc}"))
        return
    source = tar.extractfile(member)
    assert source is not None, "extractfile returns data for every regular file"
    copy_atomic(source, target)
    report.extracted.append(member.name)


def member_name(name: str) -> str:
    """A member's name without leading ``./`` (GNU tar run as ``tar -czf x.tar.gz .`` adds it)."""
    while name.startswith("./"):
        name = name[2:]
    return name


class _PrefixProbe:
    """Fails fast when none of the first ``n`` files lies below the expected prefix.

    Streaming a 77.5 GB archive with a wrong ``archive_prefix`` would otherwise extract nothing
    and say so only at the end.
    """

    def __init__(self, archive: Path, prefix: str | None, n: int) -> None:
        self.archive, self.prefix, self.n = archive, prefix, n
        self.seen: list[str] = []
        self.matched = not prefix

    def check(self, name: str) -> None:
        if self.matched:
            return
        if name.startswith(self.prefix):
            self.matched = True
            return
        self.seen.append(name)
        if len(self.seen) >= self.n:
            raise DataError(
                self.archive,
                f"none of the first {self.n} files lies below data.sentinel.archive_prefix "
                f"{self.prefix!r} (first: {self.seen[:3]}); fix the prefix",
            )


def extract_tar(
    archive: Path,
    dest: Path,
    *,
    wanted: Callable[[str], bool] | None = None,
    strip_components: int = 0,
    expect_prefix: str | None = None,
    probe_members: int = 64,
) -> ExtractReport:
    """Extract the regular files of ``archive`` that ``wanted`` accepts into ``dest``.

    ``wanted`` sees the member name without a leading ``./`` (see :func:`member_name`), so
    archives written either way match; the report lists names the same way. Directories are
    created as needed rather than extracted. Files already present with the member's size are
    kept, so an interrupted run can simply be repeated. Raises DataError on a corrupt or
    truncated archive, after keeping every member completed before the damage, and as soon as
    ``probe_members`` files have passed without one below ``expect_prefix``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(dest))
    report = ExtractReport()
    probe = _PrefixProbe(archive, expect_prefix, probe_members)
    try:
        with _open_stream(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.isdir():
                    continue
                member.name = member_name(member.name)
                probe.check(member.name)
                if wanted is not None and not wanted(member.name):
                    continue
                _extract_member(tar, member, root, strip_components, report)
            while stream.read(_COPY_BLOCK):  # read to the end so the checksum gets verified
                pass
    except _CORRUPTION as exc:
        raise DataError(archive, f"corrupt or truncated archive: {exc}") from exc
    if not probe.matched and probe.seen:
        raise DataError(
            archive,
            f"no file lies below data.sentinel.archive_prefix {expect_prefix!r} "
            f"(first: {probe.seen[:3]}); fix the prefix",
        )
    report.log_summary(archive, dest)
    return report


def write_skipped_csv(report: ExtractReport, path: Path) -> None:
    """Write the refused members (columns ``member``, ``reason``) for later inspection."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["member", "reason"])
        writer.writerows(report.skipped)
