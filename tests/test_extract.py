"""Streaming tar extraction against hostile, filtered, resumed and truncated archives."""

from __future__ import annotations

import csv
import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from deo.data.extract import ExtractReport, extract_tar, write_skipped_csv
from deo.errors import DataError

pytestmark = pytest.mark.timeout(30)


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def build(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def files_under(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if not path.is_dir()}


def test_hostile_members_are_refused(tmp_path):
    dest = tmp_path / "out"
    archive = build(
        tmp_path / "hostile.tar.gz",
        [
            regular("good/a.txt", b"alpha"),
            regular("../evil", b"x"),
            regular(f"{tmp_path}/abs_evil", b"x"),
            regular("a/../../evil2", b"x"),
            special("link_out", tarfile.SYMTYPE, "../../outside"),
            special("hard", tarfile.LNKTYPE, "good/a.txt"),
            special("fifo", tarfile.FIFOTYPE),
            special("tty", tarfile.CHRTYPE),
            special("disk", tarfile.BLKTYPE),
            regular("good/b.bin", bytes(range(256)) * 10),
        ],
    )

    report = extract_tar(archive, dest)

    assert report.extracted == ["good/a.txt", "good/b.bin"]
    assert (dest / "good" / "a.txt").read_bytes() == b"alpha"
    assert (dest / "good" / "b.bin").read_bytes() == bytes(range(256)) * 10
    reasons = dict(report.skipped)
    assert set(reasons) == {
        "../evil",
        f"{tmp_path}/abs_evil",
        "a/../../evil2",
        "link_out",
        "hard",
        "fifo",
        "tty",
        "disk",
    }
    assert "'..'" in reasons["../evil"] and "'..'" in reasons["a/../../evil2"]
    assert "absolute" in reasons[f"{tmp_path}/abs_evil"]
    assert "symlink" in reasons["link_out"]
    assert "hardlink" in reasons["hard"]
    assert all("device or fifo" in reasons[name] for name in ("fifo", "tty", "disk"))
    assert files_under(tmp_path) == {"hostile.tar.gz", "out/good/a.txt", "out/good/b.bin"}


def test_symlink_already_in_dest_cannot_be_escaped_through(tmp_path):
    dest = tmp_path / "out"
    outside = tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sneaky").symlink_to(outside)
    archive = build(tmp_path / "a.tar.gz", [regular("sneaky/payload", b"x")])

    report = extract_tar(archive, dest)

    assert report.extracted == []
    assert report.skipped == [("sneaky/payload", "resolves outside the destination")]
    assert list(outside.iterdir()) == []


def test_wanted_filter_and_strip_components(tmp_path):
    archive = build(
        tmp_path / "a.tar.gz",
        [
            regular("top/keep/1.tif", b"one"),
            regular("top/drop/2.tif", b"two"),
            regular("top/keep/3.tif", b"three"),
            special("top/keep/link.tif", tarfile.SYMTYPE, "1.tif"),
            special("top/drop/link.tif", tarfile.SYMTYPE, "2.tif"),
        ],
    )

    report = extract_tar(
        archive, tmp_path / "out", wanted=lambda name: "/keep/" in name, strip_components=1
    )

    assert report.extracted == ["top/keep/1.tif", "top/keep/3.tif"]
    assert [name for name, _ in report.skipped] == ["top/keep/link.tif"]
    assert files_under(tmp_path / "out") == {"keep/1.tif", "keep/3.tif"}
    assert (tmp_path / "out" / "keep" / "3.tif").read_bytes() == b"three"


def test_strip_components_beyond_depth_is_reported(tmp_path):
    archive = build(tmp_path / "a.tar", [regular("top.txt", b"t"), regular("d/x.txt", b"x")], "w")

    report = extract_tar(archive, tmp_path / "out", strip_components=1)

    assert report.extracted == ["d/x.txt"]
    assert report.skipped == [("top.txt", "fewer than 2 path components")]
    assert (tmp_path / "out" / "x.txt").read_bytes() == b"x"


def test_resume_does_not_rewrite_complete_files(tmp_path):
    dest = tmp_path / "out"
    archive = build(tmp_path / "a.tar.gz", [regular("a.bin", b"a" * 100), regular("b.bin", b"bb")])
    extract_tar(archive, dest)
    old = 1_000_000_000
    os.utime(dest / "a.bin", (old, old))
    (dest / "b.bin").write_bytes(b"b")  # a partial leftover of the wrong size

    report = extract_tar(archive, dest)

    assert report.extracted == ["a.bin", "b.bin"]
    assert (dest / "a.bin").stat().st_mtime == old
    assert (dest / "b.bin").read_bytes() == b"bb"


def test_truncated_archive_raises_and_keeps_earlier_members(tmp_path):
    members = [regular(f"m{index}.bin", os.urandom(64 * 1024)) for index in range(6)]
    archive = build(tmp_path / "full.tar.gz", members)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    dest = tmp_path / "out"

    with pytest.raises(DataError, match=r"cut\.tar\.gz.*corrupt or truncated archive"):
        extract_tar(cut, dest)

    assert (dest / "m0.bin").read_bytes() == members[0][1]
    assert (dest / "m1.bin").read_bytes() == members[1][1]
    assert not (dest / "m5.bin").exists()
    assert not any(name.endswith(".part") for name in files_under(dest))


def test_archive_cut_at_member_boundary_is_still_detected(tmp_path):
    members = [regular(f"m{index}.bin", os.urandom(30 * 1024)) for index in range(3)]
    plain = build(tmp_path / "a.tar", members, "w")
    # Keep two whole members (header + data) and gzip that: a tar reader alone would call it a
    # complete archive, but the gzip stream then lacks its trailer.
    head = plain.read_bytes()[: 2 * (512 + 30 * 1024)]
    cut = tmp_path / "boundary.tar.gz"
    cut.write_bytes(gzip.compress(head)[:-8])

    with pytest.raises(DataError, match=r"boundary\.tar\.gz.*corrupt or truncated"):
        extract_tar(cut, tmp_path / "out")

    assert (tmp_path / "out" / "m0.bin").read_bytes() == members[0][1]


def test_checksum_mismatch_after_last_member_is_detected(tmp_path):
    plain = build(tmp_path / "a.tar", [regular("m.bin", os.urandom(4096))], "w")
    # Padding past tar's end marker means the checksum is only seen after the last member.
    packed = bytearray(gzip.compress(plain.read_bytes() + bytes(256 * 1024)))
    packed[-8:-4] = bytes(b ^ 0xFF for b in packed[-8:-4])  # corrupt the stored CRC32
    bad = tmp_path / "crc.tar.gz"
    bad.write_bytes(bytes(packed))

    with pytest.raises(DataError, match=r"crc\.tar\.gz.*corrupt or truncated"):
        extract_tar(bad, tmp_path / "out")


def test_not_an_archive_raises_data_error(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(1000))

    with pytest.raises(DataError, match=r"junk\.tar\.gz"):
        extract_tar(junk, tmp_path / "out")


def test_write_skipped_csv_round_trips(tmp_path):
    report = ExtractReport(
        extracted=["ok.tif"],
        skipped=[("../evil", "'..' path component refused"), ('we,ird"name', "symlink, refused")],
    )
    path = tmp_path / "reports" / "skipped.csv"

    write_skipped_csv(report, path)

    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [
        {"member": "../evil", "reason": "'..' path component refused"},
        {"member": 'we,ird"name', "reason": "symlink, refused"},
    ]


@pytest.mark.parametrize("lead", ["", "./"])
def test_members_with_and_without_dot_slash_match_the_same_names(tmp_path, lead):
    archive = build(
        tmp_path / "a.tar.gz",
        [
            regular(f"{lead}fmow-sentinel/train/a/a_1/a_1_0.tif", b"one"),
            regular(f"{lead}fmow-sentinel/train/a/a_1/a_1_1.tif", b"two"),
        ],
    )
    report = extract_tar(
        archive,
        tmp_path / "out",
        wanted={"fmow-sentinel/train/a/a_1/a_1_0.tif"}.__contains__,
        strip_components=1,
        expect_prefix="fmow-sentinel/",
    )
    assert report.extracted == ["fmow-sentinel/train/a/a_1/a_1_0.tif"]
    assert files_under(tmp_path / "out") == {"train/a/a_1/a_1_0.tif"}


def test_wrong_prefix_fails_after_the_first_members_not_at_the_end(tmp_path):
    """The archive's end is damaged: reading it through would raise 'truncated'; the prefix
    check must stop first, naming the prefix and what the members look like."""
    members = [regular(f"./other/train/a/a_{i}/a_{i}_0.tif", b"x" * 600) for i in range(50)]
    archive = build(tmp_path / "a.tar.gz", members)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(DataError, match=r"none of the first 8 files lies below .*'fmow-sentinel/'"):
        extract_tar(archive, tmp_path / "out", expect_prefix="fmow-sentinel/", probe_members=8)
    with pytest.raises(DataError, match="corrupt or truncated"):
        extract_tar(archive, tmp_path / "out", expect_prefix="other/", probe_members=8)
