"""Preflight: check the real hosts against the pipeline's assumptions before the big download.

Only ranged reads: the start of the 77.5 GB archive (gzip streams decompress from the front, so
the first megabytes give the first members whole), the start of each split CSV, and a handful
of fMoW-RGB partners of the scenes found there. The scenes and partners go through the real
harmonise code (:func:`read_s2`, :func:`read_rgb`), and the report says go or no-go with the
reason for each assumption that does not hold: member prefix and layout, CSV columns, tile
dtype and value range, partner existence and placement, co-registration. It also gives the
scene-size distribution, the share of scenes each tiling policy would keep, and estimates of
the store size and the harmonise time at the configured scale.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numcodecs
import numpy as np
import rasterio
import requests

from deo.config import DataConfig
from deo.data import fmow
from deo.data.bands import MS_BANDS
from deo.data.coreg import check_partner
from deo.data.extract import member_name
from deo.data.harmonise import TargetGrid, read_rgb, read_s2
from deo.errors import DataError, DeoError

log = logging.getLogger(__name__)

_MEMBER = re.compile(r"^([^/]+)/([^/]+)/\2_(\d+)/\2_\3_(\d+)\.tif$")
VISIBLE = tuple(MS_BANDS.index(b) for b in ("B04", "B03", "B02"))


class PreflightError(DeoError):
    """The hosts break an assumption the pipeline relies on (the report says which)."""


@dataclass
class Report:
    """What preflight found; ``problems`` empty means go."""

    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def fail(self, problem: str) -> None:
        log.error("preflight: %s", problem)
        self.problems.append(problem)

    @property
    def go(self) -> bool:
        return not self.problems


# --- ranged reads ---------------------------------------------------------------------------


def read_range(url: str, length: int, timeout: float = 60.0) -> tuple[bytes, int | None]:
    """The first ``length`` bytes of ``url`` (fewer if it is shorter) and its full size.

    http(s) asks for ``Range: bytes=0-(length-1)``; a server that ignores it is read only as
    far as needed. file:// reads the file's start, so the embedded mirror is checked the same
    way. Raises :class:`DataError` naming the URL for a missing file or a failing status.
    """
    scheme = urlsplit(url).scheme
    if scheme == "file":
        path = Path(url2pathname(urlsplit(url).path))
        if not path.is_file():
            raise DataError(url, "not found")
        with path.open("rb") as handle:
            return handle.read(length), path.stat().st_size
    if scheme not in ("http", "https"):
        raise DataError(url, f"preflight reads http(s):// and file:// URLs, not {scheme}://")
    headers = {"Range": f"bytes=0-{length - 1}", "Accept-Encoding": "identity"}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code not in (200, 206):
                raise DataError(url, f"HTTP {response.status_code}")
            total = _full_size(response)
            body = bytearray()
            for chunk in response.raw.stream(1 << 16, decode_content=False):
                body += chunk
                if len(body) >= length:
                    break
            return bytes(body[:length]), total
    except requests.RequestException as e:
        raise DataError(url, f"request failed: {e}") from e


def _full_size(response: requests.Response) -> int | None:
    if response.status_code == 206:
        match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
        return int(match.group(1)) if match else None
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def read_whole(url: str, max_bytes: int) -> bytes | None:
    """A small file whole (partners, mapping), None when it exceeds ``max_bytes``."""
    data, total = read_range(url, max_bytes + 1)
    if len(data) > max_bytes or (total is not None and total > max_bytes):
        return None
    return data


# --- the archive's first members ------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str  # as stored (maybe with ./)
    size: int
    data: bytes | None  # None when the member runs past the bytes read


def first_members(head: bytes, limit: int) -> list[Member]:
    """Members of a (gzip or plain) tar whose start is ``head``, up to ``limit`` files."""
    raw = zlib.decompressobj(wbits=47).decompress(head) if head[:2] == b"\x1f\x8b" else head
    members: list[Member] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                complete = info.offset_data + info.size <= len(raw)
                data = tar.extractfile(info).read() if complete else None
                members.append(Member(info.name, info.size, data))
                if len(members) >= limit or not complete:
                    break
    except (tarfile.TarError, EOFError, OSError):
        pass  # the bytes read end mid-archive: keep what was whole
    return members


# --- the checks -------------------------------------------------------------------------------


def run_preflight(cfg: DataConfig, sentinel_url: str, rgb_url: str | None) -> Report:
    """Check the hosts at ``sentinel_url`` (and ``rgb_url``; None: MS-only) against ``cfg``."""
    pf = cfg.preflight
    report = Report()
    rows_per_split, polygons = _check_csvs(cfg, sentinel_url, report)
    members = _check_archive(cfg, sentinel_url, report)
    with tempfile.TemporaryDirectory(prefix="deo-preflight-") as tmp:
        scenes = _check_tiles(cfg, members[: pf.scenes], Path(tmp), report)
        if rgb_url is not None:
            _check_partners(cfg, rgb_url, scenes, polygons, Path(tmp), report)
    _estimate(cfg, scenes, rows_per_split, report)
    return report


def _check_csvs(
    cfg: DataConfig, url: str, report: Report
) -> tuple[dict[str, int], dict[tuple, str]]:
    """Header and first rows of each split CSV: estimated rows per split, and the polygons
    of the rows read by (split, category, location_id, image_id)."""
    rows: dict[str, int] = {}
    polygons: dict[tuple, str] = {}
    facts: dict[str, Any] = {}
    for split, name in cfg.sentinel.csvs.items():
        try:
            head, total = read_range(url + name, cfg.preflight.csv_bytes)
        except DataError as e:
            report.fail(f"CSV {name}: {e.problem} at {url + name}")
            continue
        complete = head if total is not None and len(head) >= total else head.rsplit(b"\n", 1)[0]
        with tempfile.NamedTemporaryFile(suffix=".csv") as tmp:
            tmp.write(complete + b"\n")
            tmp.flush()
            try:
                df = fmow.read_scene_csv(Path(tmp.name), split)
            except DataError as e:
                report.fail(f"CSV {name}: {e.problem}")
                continue
        for r in df.itertuples():
            polygons[(split, r.category, r.location_id, r.image_id)] = r.polygon
        per_row = len(complete) / max(len(df), 1)
        rows[split] = round(total / per_row) if total and len(df) else len(df)
        facts[split] = {"rows_read": len(df), "rows_estimated": rows[split], "bytes": total}
    report.facts["csvs"] = facts
    return rows, polygons


def _check_archive(cfg: DataConfig, url: str, report: Report) -> list[Member]:
    """The first members: present, below ``archive_prefix``, in fMoW-Sentinel's layout."""
    src = cfg.sentinel
    try:
        head, total = read_range(url + src.archive, cfg.preflight.archive_bytes)
    except DataError as e:
        report.fail(f"archive {src.archive}: {e.problem}")
        return []
    members = first_members(head, cfg.preflight.members)
    dot = sum(m.name.startswith("./") for m in members)
    names = [member_name(m.name) for m in members]
    report.facts["archive"] = {
        "bytes": total,
        "bytes_read": len(head),
        "members_listed": len(members),
        "first_members": [m.name for m in members[:5]],
        "dot_slash_members": dot,
        "archive_prefix": src.archive_prefix,
    }
    if not members:
        report.fail(f"archive {src.archive}: no tar member found in its first {len(head)} bytes")
        return []
    below = [n for n in names if n.startswith(src.archive_prefix)]
    if not below:
        report.fail(
            f"archive {src.archive}: none of the first {len(names)} members lies below "
            f"data.sentinel.archive_prefix {src.archive_prefix!r} (first: {names[:3]})"
        )
        return []
    folders = {src.folders.get(s, s) for s in src.csvs}
    layout = [_MEMBER.match(n.removeprefix(src.archive_prefix)) for n in below]
    odd = [n for n, m in zip(below, layout, strict=True) if n.endswith(".tif") and not m]
    unknown = sorted({m.group(1) for m in layout if m} - folders)
    if odd:
        report.fail(
            f"archive {src.archive}: members not in <folder>/<cat>/<cat>_<loc>/"
            f"<cat>_<loc>_<id>.tif layout: {odd[:3]}"
        )
    if unknown:
        report.fail(
            f"archive {src.archive}: split folder(s) {unknown} are not among "
            f"{sorted(folders)} (data.sentinel.csvs and data.sentinel.folders)"
        )
    report.facts["archive"]["folders_seen"] = sorted({m.group(1) for m in layout if m})
    return [m for m, n in zip(members, names, strict=True) if n in below and m.data is not None]


@dataclass
class _Scene:
    split: str
    category: str
    location_id: int
    image_id: int
    path: Path
    shape: tuple[int, int]
    dtype: str
    s2: np.ndarray | None = None
    grid: TargetGrid | None = None
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    rgb: np.ndarray | None = None
    rgb_bytes: int = 0


def _check_tiles(cfg: DataConfig, members: list[Member], tmp: Path, report: Report) -> list[_Scene]:
    """Harmonise the whole tiles among the first members; dtypes, sizes and rejects."""
    src = cfg.sentinel
    split_of = {src.folders.get(s, s): s for s in src.csvs}
    scenes, reasons, unreadable = [], Counter(), 0
    for member in members:
        name = member_name(member.name).removeprefix(src.archive_prefix)
        match = _MEMBER.match(name)
        if match is None or match.group(1) not in split_of:
            continue
        path = tmp / "tiles" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(member.data or b"")
        try:
            with rasterio.open(path) as ds:
                shape, dtype = (ds.height, ds.width), ",".join(sorted(set(ds.dtypes)))
        except rasterio.errors.RasterioError:
            reasons["unreadable GeoTIFF"] += 1
            unreadable += 1
            continue
        scene = _Scene(
            split_of[match.group(1)],
            match.group(2),
            int(match.group(3)),
            int(match.group(4)),
            path,
            shape,
            dtype,
        )
        start = time.perf_counter()
        try:
            scene.s2, scene.grid, scene.info = read_s2(path, cfg.harmonise)
        except DataError as e:
            reasons[e.problem.split(":")[0]] += 1
        scene.seconds = time.perf_counter() - start
        scenes.append(scene)
    ok = [s for s in scenes if s.s2 is not None]
    sizes = np.array([s.shape for s in scenes], dtype=float).reshape(-1, 2)
    report.facts["tiles"] = {
        "harmonised": len(ok),
        "tried": len(scenes) + unreadable,
        "dtypes": dict(Counter(s.dtype for s in scenes)),
        "rejects": dict(reasons),
        "size_px": _quantiles(np.sqrt(sizes.prod(axis=1))) if len(sizes) else {},
        "min_side_px": int(sizes.min()) if len(sizes) else None,
        "max_side_px": int(sizes.max()) if len(sizes) else None,
        "tiling_keep_share": _tiling_shares(cfg, scenes),
    }
    tried = len(scenes) + unreadable
    if not tried:
        report.fail(
            "no whole Sentinel tile among the archive's first members: raise "
            "data.preflight.archive_bytes"
        )
    elif len(ok) < (1 - cfg.max_reject_fraction) * tried:
        top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
        report.fail(
            f"{tried - len(ok)} of {tried} sampled tiles rejected by harmonise, "
            f"past data.max_reject_fraction {cfg.max_reject_fraction}: {top}"
        )
    return ok


def _tiling_shares(cfg: DataConfig, scenes: list[_Scene]) -> dict[str, float]:
    """Share of scenes each tiling policy keeps, from the scene sizes.

    ``resize`` keeps every scene (it resamples the whole scene to the tile); ``fixed_gsd`` cuts
    or pads to ``tile_size`` pixels of ``gsd_m`` and drops a scene whose padding passes
    ``max_nodata_fraction``.
    """
    if not scenes:
        return {}
    h = cfg.harmonise
    kept = 0
    for s in scenes:
        res = s.info.get("src_res_m", [h.gsd_m, h.gsd_m])
        rows, cols = (
            min(n * r / h.gsd_m, h.tile_size) for n, r in zip(s.shape, res[::-1], strict=True)
        )
        kept += 1 - rows * cols / h.tile_size**2 <= h.max_nodata_fraction
    return {"resize": 1.0, "fixed_gsd": round(kept / len(scenes), 4)}


def _check_partners(
    cfg: DataConfig,
    rgb_url: str,
    scenes: list[_Scene],
    polygons: dict[tuple, str],
    tmp: Path,
    report: Report,
) -> None:
    """Fetch and place the partners of the sampled scenes; pairing and co-registration."""
    pf = cfg.preflight
    wanted = [s for s in scenes if fmow.has_rgb_partner(s.image_id)][: pf.partners]
    mappings = {}
    for split, name in cfg.rgb.mappings.items():
        if any(s.split == split for s in wanted):
            data = read_whole(rgb_url + name, pf.partner_bytes) if _exists(rgb_url + name) else None
            if data is None:
                report.fail(f"fMoW-RGB mapping {name} for split {split!r} not found at {rgb_url}")
                continue
            (tmp / name).write_bytes(data)
            try:
                mappings[split] = fmow.read_test_mapping(tmp / name)
            except DataError as e:
                report.fail(f"fMoW-RGB mapping {name}: {e.problem}")
    layout = fmow.RgbLayout(mappings)
    found, missing, placed, scores, reasons = 0, [], Counter(), [], Counter()
    coreg_rejects = 0
    for s in wanted:
        rels = layout.relpaths(s.split, s.category, s.location_id, s.image_id)
        if rels is None:
            missing.append(f"{s.split}/{s.category}_{s.location_id} (not in mapping)")
            continue
        files = []
        for rel in rels:
            try:
                data = read_whole(rgb_url + rel, pf.partner_bytes)
            except DataError:
                data = None
            if data is None:
                break
            path = tmp / "rgb" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files.append(path)
        if len(files) < 2:
            missing.append(rels[0])
            continue
        found += 1
        start = time.perf_counter()
        try:
            polygon = polygons.get((s.split, s.category, s.location_id, s.image_id))
            rgb, info = read_rgb(files[0], files[1], s.grid, cfg.harmonise, polygon_wkt=polygon)
        except DataError as e:
            reasons[e.problem.split(":")[0]] += 1
            continue
        s.seconds += time.perf_counter() - start
        s.rgb, s.rgb_bytes = rgb, files[0].stat().st_size
        placed[info.get("rgb_box", info.get("rgb_registration"))] += 1
        # the harmonise stage's own pixel check, so the scores are the ones it will apply
        score, reject = check_partner(s.s2, s.grid, rgb, info, cfg.harmonise, str(files[0]))
        scores.append(score)
        coreg_rejects += reject is not None
    finite = [x for x in scores if math.isfinite(x)]
    report.facts["partners"] = {
        "tried": len(wanted),
        "found": found,
        "missing": missing[:5],
        "placed_by": dict(placed),
        "rejects": dict(reasons),
        "coreg_score": _quantiles(np.array(finite)) if finite else {},
        "coreg_min_score": cfg.harmonise.coreg_min_score,
        "coreg_rejects": coreg_rejects,
    }
    if wanted and found < pf.min_pair_share * len(wanted):
        report.fail(
            f"only {found} of {len(wanted)} sampled partners exist at {rgb_url} "
            f"(below data.preflight.min_pair_share {pf.min_pair_share}); first missing: "
            f"{missing[:2]}"
        )
    if found and sum(placed.values()) < pf.min_pair_share * found:
        top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
        report.fail(
            f"{found - sum(placed.values())} of {found} partners could not be placed: {top}"
        )


def _exists(url: str) -> bool:
    try:
        read_range(url, 1)
    except DataError:
        return False
    return True


# --- estimates ---------------------------------------------------------------------------------


def _estimate(
    cfg: DataConfig, scenes: list[_Scene], rows_per_split: dict[str, int], report: Report
) -> None:
    """Store size and harmonise core-hours at the selection's scale, from the sampled scenes."""
    if not scenes:
        return
    codec = numcodecs.Blosc(
        cname="zstd", clevel=cfg.store.clevel, shuffle=numcodecs.Blosc.BITSHUFFLE
    )
    s2_bytes = np.mean([len(codec.encode(np.ascontiguousarray(s.s2))) for s in scenes])
    with_rgb = [s for s in scenes if s.rgb is not None]
    rgb_bytes = (
        np.mean([len(codec.encode(np.ascontiguousarray(s.rgb))) for s in with_rgb])
        if with_rgb
        else 0.0
    )
    available = sum(rows_per_split.get(s, 0) for s in cfg.selection.splits)
    n = min(cfg.selection.max_samples, available) if available else cfg.selection.max_samples
    share_rgb = len(with_rgb) / len(scenes)
    seconds = float(np.mean([s.seconds for s in scenes]))
    report.facts["estimate"] = {
        "samples": n,
        "store_gb": round(n * (s2_bytes + share_rgb * rgb_bytes) / 1e9, 3),
        "harmonise_core_hours": round(n * seconds / 3600, 3),
        "harmonise_hours_on_shards": round(n * seconds / 3600 / cfg.harmonise.shards, 3),
        "seconds_per_scene": round(seconds, 4),
        "rgb_partner_mb": round(float(np.mean([s.rgb_bytes for s in with_rgb])) / 1e6, 3)
        if with_rgb
        else None,
    }


def _quantiles(values: np.ndarray) -> dict[str, float]:
    q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {
        k: round(float(v), 3)
        for k, v in zip(("min", "p10", "median", "p90", "max"), q, strict=True)
    }


# --- output -----------------------------------------------------------------------------------


def write_report(report: Report, out_json: Path, out_md: Path) -> None:
    """The report as JSON (for tools) and Markdown (for people)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    record = {"go": report.go, "problems": report.problems, **report.facts}
    out_json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    out_md.write_text(to_markdown(report))


def to_markdown(report: Report) -> str:
    lines = [f"# Preflight: {'GO' if report.go else 'NO-GO'}", ""]
    if report.problems:
        lines += ["## Problems", "", *(f"- {p}" for p in report.problems), ""]
    for section, facts in report.facts.items():
        lines += [f"## {section}", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v, default=str)} |" for k, v in facts.items()]
        lines.append("")
    return "\n".join(lines)


def preflight(
    cfg: DataConfig, sentinel_url: str, rgb_url: str | None, out_json: Path, out_md: Path
) -> Report:
    """Run, write both reports, print the Markdown, and raise with the reasons on no-go."""
    report = run_preflight(cfg, sentinel_url, rgb_url)
    write_report(report, out_json, out_md)
    print(to_markdown(report))
    if not report.go:
        raise PreflightError("preflight says no-go: " + "; ".join(report.problems))
    return report
