"""The embedded-default DAG end to end, read back with plain zarr/pandas, and its rerun rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(1200)


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        pytest.fail(
            f"snakemake {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("workflow")
    shutil.copy(ROOT / "Snakefile", wd)
    for folder in ("workflow", "config", "envs"):
        shutil.copytree(ROOT / folder, wd / folder)
    snakemake(wd)
    return wd


def jobs_of_dry_run(workdir: Path, *args: str) -> set[str]:
    """Rule names a dry run would execute."""
    out = snakemake(workdir, "-n", "--quiet", "rules", *args).stdout
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:")[1].splitlines()[3:]
    return {line.split()[0] for line in table if line.strip() and line.split()[0] != "total"}


def variant(workdir: Path, name: str, change) -> str:
    cfg = yaml.safe_load((workdir / "config/config.yaml").read_text())
    change(cfg)
    (workdir / name).write_text(yaml.safe_dump(cfg))
    return name


def test_store_follows_the_contract(workdir: Path) -> None:
    data = workdir / "results/data"
    group = zarr.open_group(data / "pretrain.zarr", mode="r")
    s2, rgb = group["s2"], group["rgb"]
    table = pd.read_parquet(data / "pretrain.parquet")
    cfg = yaml.safe_load((workdir / "config/config.yaml").read_text())["data"]
    tile, per_shard = cfg["harmonise"]["tile_size"], cfg["store"]["samples_per_shard"]
    r = cfg["harmonise"]["rgb_tile_size"]
    assert s2.dtype == np.uint16 and s2.shape == (len(table), 10, tile, tile)
    assert rgb.dtype == np.uint8 and rgb.shape == (len(table), 3, r, r)
    assert group.attrs["rgb_tile_size"] == r
    assert s2.chunks == (1, 10, tile, tile) and s2.shards == (per_shard, 10, tile, tile)
    codecs = json.dumps(s2.metadata.to_dict()["codecs"])
    assert '"cname": "zstd"' in codecs and '"shuffle": "bitshuffle"' in codecs
    attrs = dict(group.attrs)
    assert attrs["bands"] == ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    assert len(attrs["wavelengths_nm"]) == 10 and attrs["tile_size"] == tile
    assert set(attrs["stats"]) >= set(attrs["bands"])
    assert attrs["provenance"]["config_digest"]
    # the stats equal numpy's on the train split (non-zero pixels), read with plain zarr
    train = table.index[table["split"] == "train"].to_numpy()
    b04 = s2[:, 2][train].astype(np.float64)
    valid = b04[b04 != 0]
    assert attrs["stats"]["B04"]["mean"] == pytest.approx(valid.mean(), rel=1e-9)
    assert attrs["stats"]["B04"]["std"] == pytest.approx(valid.std(), rel=1e-9)
    assert table["has_rgb"].sum() > 0 and not rgb[np.flatnonzero(~table["has_rgb"])].any()
    assert np.asarray(s2[np.flatnonzero(table["has_rgb"])[0]]).any()
    columns = {"coreg_score", "gsd_m_eff", "footprint_crs", "footprint_left", "footprint_top"}
    assert columns <= set(table.columns) and table["gsd_m_eff"].gt(0).all()
    assert (table.loc[table["has_rgb"], "coreg_score"] >= cfg["harmonise"]["coreg_min_score"]).all()
    assert not table["order"].is_monotonic_increasing  # stored in a seeded random order


def test_every_selected_input_is_stored_or_rejected(workdir: Path) -> None:
    data = workdir / "results/data"
    selected = pd.read_parquet(data / "selection.parquet")
    stored = set(pd.read_parquet(data / "pretrain.parquet")["key"])
    rejects = pd.read_csv(data / "rejects.csv")
    rejected = {p for p in rejects["path"] if p.endswith(".tif")}
    for rel in selected["s2_relpath"]:
        in_rejects = any(p.endswith(rel) for p in rejected)
        assert (rel in stored) != in_rejects, f"{rel}: stored={rel in stored} rejected={in_rejects}"
    counts = json.loads((data / "counts.json").read_text())
    assert counts["scenes_stored"] == len(stored)
    assert counts["scenes_selected"] == len(selected)


REASONS = {
    "truncated_tif": "truncated or corrupt GeoTIFF",
    "wrong_band_count": "expected 13 bands",
    "wrong_dtype": "found dtype float32",
    "all_nodata": "nodata",
    "missing_tif": "absent",
    "corrupt_jpeg": "corrupt or truncated JPEG",
    "bad_json": "unreadable JSON",
    "missing_rgb": "partner download failed",
    "misregistered_shift": "co-registration check failed",
    "misregistered_scale": "co-registration check failed",
}


def test_each_kind_of_bad_input_is_rejected_with_its_reason(workdir: Path) -> None:
    bad = json.loads((workdir / "resources/mirror-hosts/bad_inputs.json").read_text())
    rejects = pd.read_csv(workdir / "results/data/rejects.csv")
    assert {b["kind"] for b in bad} == set(REASONS)
    for item in bad:
        rows = rejects[rejects["path"].str.endswith(item["path"])]
        assert len(rows), f"{item} not in rejects.csv"
        assert rows["reason"].str.contains(REASONS[item["kind"]]).all(), rows.to_dict("records")


def test_training_ran_and_exported(workdir: Path) -> None:
    metrics = pd.read_csv(workdir / "results/train/deo/metrics.csv")
    assert len(metrics) > 0 and np.isfinite(metrics["loss"]).all()
    for column in ("compression", "expansion", "cls", "patch_final", "patch_mid", "lr", "wd"):
        assert column in metrics
    export = workdir / "results/train/deo/export"
    assert (export / "backbone.safetensors").is_file()
    # torchgeo's DEO layout and the input spec beside it (contract C2).
    assert (export / "deo_torchgeo.pth").is_file()
    assert json.loads((export / "input_spec.json").read_text())["bands"][:3] == [
        "B04",
        "B03",
        "B02",
    ]
    assert (workdir / "results/benchmarks/distill_deo.tsv").is_file()


RESULT_COLUMNS = ["benchmark", "task", "metric", "value", "split", "seed", "model"]


def test_evaluation_table_compares_trained_and_random(workdir: Path) -> None:
    cfg = yaml.safe_load((workdir / "config/config.yaml").read_text())["evaluate"]
    for benchmark in cfg["benchmarks"]:
        for model in ("deo", "random"):
            csv = workdir / f"results/evaluate/{benchmark}/{model}/seed0.csv"
            rows = pd.read_csv(csv)
            assert list(rows.columns[:8]) == [*RESULT_COLUMNS, "checkpoint_digest"]
            test = rows[rows["split"] == "test"]
            assert len(test) and test["value"].between(0, 100).all()
    summary = pd.read_csv(workdir / "results/summary.csv")
    assert set(cfg["benchmarks"]) <= set(summary["benchmark"])
    assert {"deo", "random"} <= set(summary.columns)
    assert "|" in (workdir / "results/summary.md").read_text()
    ablation = pd.read_csv(workdir / "results/ablation.csv")
    assert list(ablation["run"]) == cfg["ablation"]["runs"]
    assert ablation[["optical_avg", "ms_avg", "overall_avg"]].notna().all().all()
    assert (workdir / "results/report/results.png").stat().st_size > 10_000


def test_report_holds_every_figure_with_its_caption(workdir: Path, tmp_path: Path) -> None:
    snakemake(workdir, "--report", str(tmp_path / "report.zip"))
    with zipfile.ZipFile(tmp_path / "report.zip") as archive:
        names = {Path(n).name for n in archive.namelist()}
        html = archive.read("report/report.html").decode()
    figures = ["training.png", "data_counts.png", "coreg.png", "runtimes.png", "features_deo.png"]
    figures += ["views_deo.png"]
    figures += ["results.png", "ablation.html"]
    assert set(figures) | {"summary.html", "metrics.csv", "rejects.csv"} <= names
    for caption in (ROOT / "workflow/report").glob("*.rst"):
        opening = " ".join(caption.read_text().split()[:4])
        assert opening in html, caption.name
    assert "Patch features of run deo" in html  # the wildcard rendered into its caption
    snakemake(workdir, "--report", str(tmp_path / "report.html"))
    assert (tmp_path / "report.html").stat().st_size > 100_000  # figures embedded


def test_nothing_reruns_without_a_change(workdir: Path) -> None:
    assert jobs_of_dry_run(workdir) == set()


UPSTREAM_OF_HARMONISE = {"mirror", "fetch_sentinel", "verify_sentinel", "select_scenes"}
UPSTREAM_OF_HARMONISE |= {"extract", "fetch_rgb", "pair"}
REPORTS = {"plot_training", "plot_data", "plot_features", "plot_runtimes", "plot_views"}


def test_a_harmonise_key_reruns_harmonise_and_downstream_only(workdir: Path) -> None:
    name = variant(workdir, "tile.yaml", lambda c: c["data"]["harmonise"].update(tile_size=80))
    jobs = jobs_of_dry_run(workdir, "--configfile", name)
    assert {"harmonise", "merge", "stats", "distill", "export", "all"} <= jobs
    assert not jobs & UPSTREAM_OF_HARMONISE


def test_a_selection_key_reruns_from_select(workdir: Path) -> None:
    name = variant(workdir, "seed.yaml", lambda c: c["data"]["selection"].update(seed=1))
    jobs = jobs_of_dry_run(workdir, "--configfile", name)
    assert {"select_scenes", "extract", "fetch_rgb", "pair", "merge"} <= jobs
    assert not jobs & {"mirror", "fetch_sentinel", "verify_sentinel"}


def test_a_train_key_reruns_training_only(workdir: Path) -> None:
    name = variant(workdir, "epochs.yaml", lambda c: c["train"]["defaults"].update(epochs=5))
    jobs = jobs_of_dry_run(workdir, "--configfile", name)
    downstream = {"distill", "export", "all", "evaluate", "summarise", "dump_views", *REPORTS}
    downstream |= {"ablation", "results_figure"}
    assert {"distill", "export", "all"} <= jobs <= downstream


def test_config_errors_fail_before_any_job(workdir: Path) -> None:
    name = variant(workdir, "typo.yaml", lambda c: c["data"]["harmonise"].update(tile_sise=64))
    done = snakemake(workdir, "-n", "--configfile", name, check=False)
    assert done.returncode != 0 and "tile_sise" in done.stdout + done.stderr
    weights = variant(
        workdir, "weights.yaml", lambda c: c["teacher"].update(tiny=False, weights="nope.pth")
    )
    done = snakemake(workdir, "-n", "--configfile", weights, check=False)
    text = done.stdout + done.stderr
    assert done.returncode != 0 and "nope.pth" in text and "licence" in text


def test_cached_mode_reruns_its_cache_on_teacher_and_crop_keys_only(workdir: Path) -> None:
    def cached(name: str, change=None) -> str:
        def edit(cfg: dict) -> None:
            cfg["teacher"]["mode"] = "cached"
            if change:
                change(cfg)

        return variant(workdir, name, edit)

    base = cached("cached.yaml")
    snakemake(workdir, "--configfile", base, "--until", "finalise_teacher_cache")
    assert (workdir / "results/teacher/partner-aug.zarr/zarr.json").is_file()
    cache_jobs = {"cache_teacher", "finalise_teacher_cache"}
    epochs = cached("cached-epochs.yaml", lambda c: c["train"]["defaults"].update(epochs=5))
    jobs = jobs_of_dry_run(workdir, "--configfile", epochs)
    assert "distill" in jobs and not jobs & (cache_jobs | {"tiny_teacher"}), jobs
    changes = {
        "k.yaml": lambda c: c["teacher"].update(views=2),
        "scale.yaml": lambda c: c["train"]["defaults"]["crops"].update(global_scale=[0.5, 1.0]),
        "layer.yaml": lambda c: c["teacher"].update(mid_layer=1),
        "weights.yaml": lambda c: c["teacher"].update(seed=1),  # the tiny teacher's weights
    }
    for name, change in changes.items():
        jobs = jobs_of_dry_run(workdir, "--configfile", cached(name, change))
        assert cache_jobs | {"distill"} <= jobs, (name, jobs)
        # caching keys (here K) are not the teacher's identity: its weights file stays
        assert ("tiny_teacher" in jobs) == (name in ("layer.yaml", "weights.yaml")), name


def test_missing_benchmark_fails_its_jobs_and_is_marked_missing(workdir: Path) -> None:
    def add_eurosat(c: dict) -> None:
        c["evaluate"]["benchmarks"].append("m-eurosat")
        c["evaluate"]["models"]["random"] = False

    name = variant(workdir, "missing.yaml", add_eurosat)
    done = snakemake(workdir, "--configfile", name, "--keep-going", check=False)
    assert done.returncode != 0
    log = (workdir / "logs/evaluate/prepare_m-eurosat.log").read_text()
    assert "download=True" in log, log[-2000:]
    summary = pd.read_csv(workdir / "results/summary.csv")
    row = summary[summary["benchmark"] == "m-eurosat"]
    assert len(row) and (row["deo"] == "missing").all()


def test_reject_bound_fails_merge_naming_the_worst(workdir: Path) -> None:
    """Last: it leaves the merge's outputs removed."""
    name = variant(workdir, "strict.yaml", lambda c: c["data"].update(max_reject_fraction=0.01))
    done = snakemake(workdir, "--configfile", name, "--until", "merge", check=False)
    assert done.returncode != 0
    log = (workdir / "logs/data/merge.log").read_text()
    assert "data.max_reject_fraction=1.0%" in log and "rejected" in log and "e.g." in log
