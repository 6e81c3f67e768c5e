"""deo preflight against a loopback HTTP mirror: go on the real formats, no-go with the reason
on mirrors that each break one assumption. The server answers Range requests only, so a
preflight that downloaded whole files (the archive) would fail."""

from __future__ import annotations

import dataclasses
import gzip
import io
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fakes import QuietHandler
from rasterio.io import MemoryFile

from deo.config import DataConfig, MirrorConfig, from_dict
from deo.data.mirror import write_mirror
from deo.data.preflight import PreflightError, first_members, preflight, run_preflight

MIRROR = MirrorConfig(
    categories=("port", "crop_field"),
    locations_per_category=4,
    images_per_location=2,
    ms_only_images_per_location=1,
    bad_inputs=False,
    s2_dtypes=("uint16", "float32"),
    rgb_json_variants=("object", "id_minus_one_first", "footprint_location", "no_location"),
    member_dot_slash=True,
)
CFG = from_dict(
    DataConfig,
    {
        "selection": {"splits": ["train", "val", "test"], "max_samples": 1000},
        "harmonise": {"tile_size": 64, "shards": 2},
        "preflight": {
            "archive_bytes": 1 << 20,
            "scenes": 8,
            "partners": 4,
            "csv_bytes": 4096,
            "partner_bytes": 1 << 20,
        },
        "max_reject_fraction": 0.25,
    },
)


class RangeOnly(QuietHandler):
    """Serves files below ``root``; answers 400 to any GET without a ``bytes=a-b`` Range."""

    root: Path
    requests: list[tuple[str, str | None]]

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        self.requests.append((self.path, rng))
        path = self.root / self.path.lstrip("/")
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", rng or "")
        if match is None:
            return self._reply(400, b"range requests only")
        if not path.is_file():
            return self._reply(404, b"")
        body = path.read_bytes()
        start, end = int(match.group(1)), min(int(match.group(2)), len(body) - 1)
        headers = {"Content-Range": f"bytes {start}-{end}/{len(body)}"}
        self._reply(206, body[start : end + 1], headers)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A written mirror: ``sentinel/`` and ``rgb/`` as the two hosts serve them."""
    out = tmp_path_factory.mktemp("hosts")
    s = CFG.sentinel
    write_mirror(
        MIRROR,
        out,
        csvs=s.csvs,
        archive=s.archive,
        archive_prefix=s.archive_prefix,
        folders=s.folders,
        rgb_mappings=CFG.rgb.mappings,
    )
    return out


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(root: Path) -> tuple[str, list]:
        log: list = []
        handler = type("H", (RangeOnly,), {"root": root, "requests": log})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", log

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def copy(hosts: Path, tmp_path: Path) -> Path:
    shutil.copytree(hosts, tmp_path / "hosts")
    return tmp_path / "hosts"


def check(serve, root: Path, cfg: DataConfig = CFG):
    url, log = serve(root)
    return run_preflight(cfg, url + "sentinel/", url + "rgb/"), log


def test_go_on_the_real_formats_with_ranged_reads_only(serve, hosts, tmp_path) -> None:
    url, log = serve(hosts)
    out = tmp_path / "pf"
    report = preflight(CFG, url + "sentinel/", url + "rgb/", out / "p.json", out / "p.md")
    assert report.go, report.problems
    assert all(rng is not None for _, rng in log)
    archive_size = (hosts / "sentinel" / CFG.sentinel.archive).stat().st_size
    archive_reads = [rng for path, rng in log if path.endswith(".tar.gz")]
    assert archive_reads == [f"bytes=0-{CFG.preflight.archive_bytes - 1}"]
    assert archive_size > 2 * CFG.preflight.archive_bytes  # only its start was read
    facts = report.facts
    assert facts["archive"]["dot_slash_members"] == facts["archive"]["members_listed"] > 0
    assert facts["tiles"]["dtypes"].keys() == {"uint16", "float32"}
    assert facts["tiles"]["harmonised"] == facts["tiles"]["tried"] > 0
    assert facts["partners"]["found"] == facts["partners"]["tried"] > 0
    assert facts["partners"]["coreg_score"]["min"] > 0.7
    assert facts["estimate"]["store_gb"] > 0 and facts["estimate"]["samples"] > 0
    assert "# Preflight: GO" in (out / "p.md").read_text()
    assert '"go": true' in (out / "p.json").read_text()


def test_wrong_prefix_is_no_go(serve, hosts) -> None:
    cfg = dataclasses.replace(
        CFG, sentinel=dataclasses.replace(CFG.sentinel, archive_prefix="fmow_sentinel/")
    )
    report, _ = check(serve, hosts, cfg)
    assert not report.go
    assert any("none of the first" in p and "'fmow_sentinel/'" in p for p in report.problems)


def test_wrong_csv_columns_are_no_go(serve, hosts, tmp_path) -> None:
    root = copy(hosts, tmp_path)
    csv = root / "sentinel" / CFG.sentinel.csvs["val"]
    csv.write_text(csv.read_text().replace("polygon", "geometry", 1))
    report, _ = check(serve, root)
    assert any(p.startswith("CSV val.csv: missing column(s) ['polygon']") for p in report.problems)


def test_test_split_in_test_folder_is_no_go(serve, hosts) -> None:
    """The archive holds test_gt/; a config expecting test/ is told which folders it found."""
    cfg = dataclasses.replace(
        CFG,
        sentinel=dataclasses.replace(CFG.sentinel, folders={}),
        preflight=dataclasses.replace(CFG.preflight, archive_bytes=64 << 20),
    )
    report, _ = check(serve, hosts, cfg)
    assert any("split folder(s) ['test_gt']" in p for p in report.problems)


def _rewrite_tiles(root: Path, convert) -> None:
    """Re-pack the archive with each tile's pixels passed through ``convert``."""
    archive = root / "sentinel" / CFG.sentinel.archive
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, blob in members:
            with MemoryFile(blob) as mem, mem.open() as src:
                profile, pixels = src.profile, src.read()
            pixels = convert(pixels)
            profile.update(dtype=pixels.dtype.name)
            with MemoryFile() as mem:
                with mem.open(**profile) as dst:
                    dst.write(pixels)
                blob = bytes(mem.read())
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    archive.write_bytes(gzip.compress(raw.getvalue(), compresslevel=1))


def test_float_tiles_on_the_reflectance_scale_are_no_go(serve, hosts, tmp_path) -> None:
    root = copy(hosts, tmp_path)
    _rewrite_tiles(root, lambda p: (p.astype(np.float32) / 10_000).astype(np.float32))
    report, _ = check(serve, root)
    assert any("sampled tiles rejected by harmonise" in p for p in report.problems)
    assert any("float tile on the reflectance scale (" in p for p in report.problems)
    assert report.facts["tiles"]["dtypes"] == {"float32": report.facts["tiles"]["tried"]}


def test_complex_tiles_are_no_go_with_their_dtype(serve, hosts, tmp_path) -> None:
    root = copy(hosts, tmp_path)
    _rewrite_tiles(root, lambda p: p.astype(np.complex64))
    report, _ = check(serve, root)
    assert any("found dtype complex64" in p for p in report.problems)


def test_missing_partners_are_no_go(serve, hosts, tmp_path) -> None:
    root = copy(hosts, tmp_path)
    for jpg in (root / "rgb").rglob("*_rgb.jpg"):
        jpg.unlink()
    report, _ = check(serve, root)
    assert report.facts["partners"]["found"] == 0
    assert any("only 0 of" in p and "sampled partners exist" in p for p in report.problems)


def test_missing_test_mapping_is_no_go(serve, hosts, tmp_path) -> None:
    root = copy(hosts, tmp_path)
    (root / "rgb" / CFG.rgb.mappings["test"]).unlink()
    whole = dataclasses.replace(CFG.preflight, archive_bytes=64 << 20, scenes=64, partners=64)
    cfg = dataclasses.replace(CFG, preflight=whole)
    report, _ = check(serve, root, cfg)
    assert any(
        "mapping test_gt_mapping.json for split 'test' not found" in p for p in report.problems
    )


def test_partners_placed_nowhere_near_their_gsd_are_no_go(serve, hosts, tmp_path) -> None:
    root = copy(hosts, tmp_path)
    for meta in (root / "rgb").rglob("*_rgb.json"):
        text = meta.read_text()
        meta.write_text(re.sub(r'"gsd": ([\d.]+)', lambda m: f'"gsd": {float(m[1]) * 3}', text))
    report, _ = check(serve, root)
    assert any("could not be placed: no bounding box agrees with gsd" in p for p in report.problems)


def test_cli_run_fails_with_the_reason(serve, hosts, tmp_path) -> None:
    cfg = dataclasses.replace(
        CFG, sentinel=dataclasses.replace(CFG.sentinel, archive_prefix="elsewhere/")
    )
    url, _ = serve(hosts)
    with pytest.raises(PreflightError, match=r"no-go: archive fmow-sentinel\.tar\.gz: none of"):
        preflight(cfg, url + "sentinel/", url + "rgb/", tmp_path / "p.json", tmp_path / "p.md")
    assert "# Preflight: NO-GO" in (tmp_path / "p.md").read_text()


def test_first_members_of_a_plain_and_a_gzip_tar() -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i in range(5):
            info = tarfile.TarInfo(f"./d/f{i}.tif")
            info.size = 3000
            tar.addfile(info, io.BytesIO(bytes([i]) * 3000))
    data = raw.getvalue()
    for blob in (data, gzip.compress(data)):
        head = blob[: len(blob) // 2] if blob is data else blob[:4000]
        members = first_members(head, 10)
        assert members and members[0].name == "./d/f0.tif"
        assert members[0].data == bytes([0]) * 3000 or members[0].data is None
        assert all(m.data is None or len(m.data) == 3000 for m in members)
    assert [m.name for m in first_members(data, 3)] == ["./d/f0.tif", "./d/f1.tif", "./d/f2.tif"]
