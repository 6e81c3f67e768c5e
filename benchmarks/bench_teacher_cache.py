"""Teacher cache vs online teacher: forward cost per view, bytes per sample, training step time.

For two teachers, the embedded default's tiny random ViT at its 32 px global views and the
ViT-B/16 architecture of the paper at 224 px (random weights of the same shapes: the cost and
sizes are the architecture's), it measures on this machine's CPU:

- the teacher's forward time per view (``--batch`` views per call, median of ``--repeats``);
- the time training spends reading two cached views per sample (``CachedTargets.draw``);
- bytes stored per sample at K = ``--views`` for fp16 and int8, raw and on disk (compressed);
- the relative error of cached targets against the online teacher on the replayed views.

Then the training step time of the embedded default (config/config.yaml's train and teacher
sections) online and cached, on a store of its tile size, runs interleaved, median step.

    python benchmarks/bench_teacher_cache.py --samples 64 --vitb-samples 4 --steps 16
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import default_collate

from deo.cache.build import build_part, finalise
from deo.cache.reader import CachedTargets
from deo.cache.spec import CacheConfig, GlobalViews, split_teacher_section
from deo.data.bands import MS_BANDS
from deo.data.loader import PretrainDataset
from deo.data.stats import band_stats, read_stats, write_stats
from deo.data.store import ShardWriter, merge_shards
from deo.models.teacher import TeacherConfig, VFMTeacher
from deo.train.config import parse_teacher, parse_train, run_config
from deo.train.loop import train

log = logging.getLogger("bench_teacher_cache")
ROOT = Path(__file__).parents[1]
VIT_B = TeacherConfig(
    arch="vit_base_patch16_dinov3", tiny=True, tiny_embed_dim=768, tiny_depth=12, tiny_heads=12
)


def write_store(root: Path, n: int, tile: int) -> tuple[Path, Path]:
    """``n`` random tiles with RGB partners, all in the train split, with their statistics."""
    rng = np.random.default_rng(0)
    with ShardWriter(root / "shard", n=n, tile_size=tile, with_rgb=True) as writer:
        for i in range(n):
            s2 = rng.normal(1500, 400, (len(MS_BANDS), tile, tile)).clip(1, 10000)
            rgb = rng.integers(0, 256, (3, tile, tile), dtype=np.uint8)
            writer.write(
                i,
                s2.astype(np.uint16),
                rgb,
                {"key": f"s{i}", "order": i, "split": "train", "has_rgb": True},
            )
    store, table = root / "pretrain.zarr", root / "pretrain.parquet"
    merge_shards([root / "shard"], store, table, samples_per_shard=16, clevel=5, attrs={})
    write_stats(store, band_stats(store, pd.read_parquet(table), split=None), root / "stats.json")
    return store, table


def forward_ms(cfg: TeacherConfig, size: int, batch: int, repeats: int) -> float:
    """Median milliseconds per view of the teacher's forward at ``batch`` views per call."""
    vfm = VFMTeacher(cfg)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    vfm(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        vfm(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / batch


def build_cache(
    store: tuple[Path, Path],
    root: Path,
    teacher: TeacherConfig,
    views: GlobalViews,
    cache: CacheConfig,
) -> Path:
    build_part(*store, teacher, views, cache, 0, root / "work", root / "part.json")
    finalise([root / "part.json"], root / "cache.zarr")
    return root / "cache.zarr"


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def raw_bytes(k: int, tokens: int, dim: int, precision: str, params_bytes: int) -> int:
    """Uncompressed bytes per sample: K views of ``tokens`` D-vectors (+ scales) + parameters."""
    per_value = 2 if precision == "fp16" else 1
    scales = 0 if precision == "fp16" else 4 * tokens
    return k * (tokens * dim * per_value + scales + params_bytes)


def read_ms_per_view(cache: CachedTargets, batch: int, repeats: int) -> float:
    """Median milliseconds per (sample, global view) of ``draw`` for random batches of rows."""
    n = cache.meta["store"]["n"]
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats):
        rows = torch.randperm(n, generator=generator)[:batch]
        t0 = time.perf_counter()
        cache.draw(rows, generator)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / (2 * min(batch, n))


def params_bytes(views: GlobalViews) -> int:
    """Uncompressed bytes of one view's parameters (``ViewParams`` of one sample)."""
    record = views.multicrop(None).sample_global(1, 64, 0, torch.Generator())
    return sum(v.element_size() * v.numel() for v in record.to_dict().values())


def replay_error(
    cache: CachedTargets, store: tuple[Path, Path], views: GlobalViews, teacher: TeacherConfig
) -> float:
    """Largest relative error (over targets and slots) of cached vs online targets, all rows."""
    rows = torch.arange(cache.meta["store"]["n"])
    params, cached = cache.draw(rows, torch.Generator().manual_seed(1))
    batch = default_collate(PretrainDataset(*store, with_rgb=True).__getitems__(rows.tolist()))
    multicrop = views.multicrop(read_stats(store[0]))
    vfm = VFMTeacher(teacher)
    worst = 0.0
    for slot, record in enumerate(params):
        view = multicrop.apply(
            batch["s2"], batch["rgb"], batch["has_rgb"], record, views.global_size
        )
        online = vfm(view[:, :3], normalised=True)
        for name in ("cls", "patch_final", "patch_mid"):
            a, b = getattr(cached[slot], name), getattr(online, name)
            worst = max(worst, float((a - b).norm() / b.norm()))
    return worst


def teacher_rows(
    name: str, teacher: TeacherConfig, size: int, store: tuple[Path, Path], root: Path, args
) -> list[tuple]:
    views = GlobalViews.from_train(
        parse_train({"crops": {"global_size": size, "local_size": 16, "n_local": 0}})
    )
    ms = forward_ms(teacher, size, args.batch, args.repeats)
    rows = []
    for precision in ("fp16", "int8"):
        cfg = CacheConfig(views=args.views, precision=precision, batch_size=args.batch)
        path = build_cache(store, root / f"{name}-{precision}", teacher, views, cfg)
        cache = CachedTargets(path)
        n = cache.meta["store"]["n"]
        tokens = 1 + 2 * cache.grid[0] * cache.grid[1]
        dim = cache.meta["teacher"]["embed_dim"]
        rows.append(
            (
                name,
                precision,
                ms,
                read_ms_per_view(cache, args.batch, args.repeats),
                raw_bytes(args.views, tokens, dim, precision, params_bytes(views)),
                disk_bytes(path) / n,
                disk_bytes(path / "params") / n,
                replay_error(cache, store, views, teacher),
            )
        )
    return rows


def step_times(store: tuple[Path, Path], root: Path, steps: int, rounds: int) -> dict[str, float]:
    """Median training step (s) of the embedded default, online and cached, interleaved."""
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    model, caching = split_teacher_section(config["teacher"])
    teacher = parse_teacher(model)
    cfg = parse_train(run_config(config["train"], "deo"))
    cache = build_cache(
        store,
        root / "demo",
        teacher,
        GlobalViews.from_train(cfg),
        CacheConfig(views=caching["views"], **{**caching["cache"], "shards": 1}),
    )
    times: dict[str, list[float]] = {"online": [], "cached": []}
    for r in range(rounds):
        for mode in times:
            out = root / f"run-{mode}-{r}"
            extra = {"teacher_cache": cache} if mode == "cached" else {}
            train(cfg, teacher, *store, out, device="cpu", max_steps=steps, progress=False, **extra)
            lines = (out / "metrics.jsonl").read_text().splitlines()
            times[mode] += [json.loads(line)["step_s"] for line in lines[2:]]  # after warm-up
    return {mode: statistics.median(t) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="store rows, demo tile (64 px)")
    parser.add_argument("--vitb-samples", type=int, default=4, help="store rows at 224 px")
    parser.add_argument("--views", type=int, default=4, help="K")
    parser.add_argument("--batch", type=int, default=8, help="views per teacher forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved online/cached runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("deo").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        demo = write_store(root / "demo-store", args.samples, 64)
        big = write_store(root / "vitb-store", args.vitb_samples, 224)
        demo_teacher = yaml.safe_load((ROOT / "config/config.yaml").read_text())["teacher"]
        tiny = parse_teacher(split_teacher_section(demo_teacher)[0])
        rows = teacher_rows("demo tiny ViT, 32 px", tiny, 32, demo, root, args)
        rows += teacher_rows("ViT-B/16, 224 px", VIT_B, 224, big, root, args)
        steps = step_times(demo, root, args.steps, args.rounds)

    log.info(
        "CPU, %d torch thread(s); K = %d; teacher batch %d", args.threads, args.views, args.batch
    )
    log.info(
        "| teacher | precision | forward / view (ms) | cache read / view (ms) "
        "| raw bytes / sample | on disk / sample | of which view params | max rel. error |"
    )
    log.info("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, precision, fwd, read, raw, disk, params, error in rows:
        log.info(
            "| %s | %s | %.2f | %.3f | %s | %s | %.0f B | %.1e |",
            name, precision, fwd, read, f"{raw:,.0f} B", f"{disk:,.0f} B", params, error,
        )  # fmt: skip
    log.info("| training step, demo config | online %.3f s | cached %.3f s | ratio %.2f |",
             steps["online"], steps["cached"], steps["online"] / steps["cached"])  # fmt: skip


if __name__ == "__main__":
    main()
