"""Training step: our pipeline vs the authors' pattern, same model, loss and batch.

Ours: the real ``deo.train.loop.train`` — shard-grouped Zarr reads, batched multi-crop on the
training device from explicit random parameters, one forward of the student over all views.
The authors' pattern: one HDF5 file re-opened per item, per-sample torchvision augmentation in
DataLoader workers (``bench_augment.PerSampleMultiCrop``), the online teacher in the step. Each
runs in its own process (so peak RSS is its own); the table gives the median step time after
warm-up, images/s and peak resident memory, and the ratios.

    python benchmarks/bench_train_step.py --samples 96 --batch 8 --steps 12 --workers 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))

from bench_augment import PerSampleMultiCrop

from deo.data.augment import MultiCrop, MultiCropBatch
from deo.data.bands import MS_BANDS
from deo.data.model_input import MODEL_BANDS
from deo.data.stats import band_stats, read_stats, write_stats
from deo.data.store import ShardWriter, merge_shards
from deo.models.teacher import VFMTeacher
from deo.train.config import parse_teacher, parse_train
from deo.train.loop import param_groups, train
from deo.train.meta_arch import DualTeacherDistillation
from deo.train.schedules import build_schedules

ROOT = Path(__file__).parents[1]


def demo_configs() -> tuple[dict, dict]:
    """The embedded default's run and teacher, as the DAG resolves them."""
    import yaml

    from deo.cache.spec import split_teacher_section
    from deo.train.config import run_config

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    return run_config(cfg["train"], "deo"), split_teacher_section(cfg["teacher"])[0]


def build_data(root: Path, n: int, tile: int) -> None:
    rng = np.random.default_rng(0)
    s2 = np.clip(rng.normal(1500, 400, (n, len(MS_BANDS), tile, tile)), 1, 10000).astype(np.uint16)
    rgb = rng.integers(0, 256, (n, 3, tile, tile), dtype=np.uint8)
    with ShardWriter(root / "shard", n, tile, with_rgb=True) as writer:
        for i in range(n):
            meta = {"key": f"s{i}", "order": i, "split": "train", "has_rgb": True}
            writer.write(i, s2[i], rgb[i], meta)
    merge_shards(
        [root / "shard"],
        root / "pretrain.zarr",
        root / "pretrain.parquet",
        samples_per_shard=32,
        clevel=5,
        attrs={},
    )
    table = pd.read_parquet(root / "pretrain.parquet")
    stats = band_stats(root / "pretrain.zarr", table, split=None)
    write_stats(root / "pretrain.zarr", stats, root / "stats.json")
    with h5py.File(root / "all.h5", "w") as f:
        f["s2"], f["rgb"] = s2, rgb


class AuthorsDataset(Dataset):
    """Re-opens the HDF5 file per item and augments the sample alone (``DataAugmentationDINOMS``:
    the partner takes the optical channels of the 10-channel stack, at the tile's size)."""

    def __init__(self, path: Path, n: int, multicrop: MultiCrop) -> None:
        self.path, self.n = path, n
        self.order = [MS_BANDS.index(b) for b in MODEL_BANDS]
        self.augment = PerSampleMultiCrop(multicrop, multicrop.mean, multicrop.std)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        with h5py.File(self.path, "r") as f:
            s2, rgb = f["s2"][i], f["rgb"][i]
        stack = torch.from_numpy(s2.astype(np.float32)[self.order])
        stack[:3] = torch.from_numpy(rgb.astype(np.float32))
        return [view[0] for view in self.augment(stack[None])]


def run_authors(
    root: Path, n: int, steps: int, workers: int, train_cfg: dict, teacher: dict
) -> list[float]:
    cfg, teacher_cfg = parse_train(train_cfg), parse_teacher(teacher)
    mc = MultiCrop.for_training(cfg, read_stats(root / "pretrain.zarr"))
    dataset = AuthorsDataset(root / "all.h5", n, mc)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    torch.manual_seed(0)
    model = DualTeacherDistillation(cfg, VFMTeacher(teacher_cfg))
    optimizer = torch.optim.AdamW(param_groups(model.student), lr=1e-4)
    sched = build_schedules(
        epochs=1000,
        steps_per_epoch=1,
        base_lr=1e-4,
        global_batch=8,
        min_lr=0,
        warmup_epochs=0,
        weight_decay=(0.04, 0.4),
        momentum=(0.996, 1),
        freeze_last_layer_epochs=0,
    )
    times, step = [], 0
    while step < steps:
        tick = time.perf_counter()
        for batch in loader:
            views = MultiCropBatch(
                global_ms=batch[:2],
                global_rgb=[v[:, :3] for v in batch[:2]],
                local_ms=batch[2:],
                local_rgb=[v[:, :3] for v in batch[2:]],
                global_params=[],
            )
            terms = model(views, model.student)
            optimizer.zero_grad()
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.student.parameters(), 3.0)
            optimizer.step()
            model.teacher.update(model.student, float(sched.momentum[step]))
            times.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            step += 1
            if step >= steps:
                break
    return times


def run_ours(root: Path, steps: int, workers: int, train_cfg: dict, teacher: dict) -> list[float]:
    cfg = parse_train({**train_cfg, "workers": workers, "epochs": 1000})
    out = root / f"ours-{time.time_ns()}"
    train(
        cfg,
        parse_teacher(teacher),
        root / "pretrain.zarr",
        root / "pretrain.parquet",
        out,
        device="cpu",
        max_steps=steps,
        progress=False,
    )
    return [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def child(args: argparse.Namespace) -> None:
    train_cfg, teacher = demo_configs()
    train_cfg = {**train_cfg, "batch_size": args.batch}
    teacher = {**teacher, "weights": None}
    root = Path(args.root)
    if args.child == "ours":
        times = run_ours(root, args.steps, args.workers, train_cfg, teacher)
    else:
        times = run_authors(root, args.samples, args.steps, args.workers, train_cfg, teacher)
    peak_mb = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    ) / 1024
    print(json.dumps({"times": times, "peak_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--child", choices=["ours", "authors"])
    p.add_argument("--root")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_data(Path(tmp), args.samples, args.tile)
        rows = {}
        for kind in ("ours", "authors"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--root",
                tmp,
                *[f"--{k}={getattr(args, k)}" for k in ("samples", "batch", "steps", "workers")],
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"\nbatch {args.batch}, tile {args.tile}, {args.workers} workers, median of steps "
        f"{args.warmup + 1}..{args.steps}, CPU ({torch.get_num_threads()} threads)\n"
    )
    print("| pipeline | step ms | images/s | peak RSS MB |\n|---|---:|---:|---:|")
    medians = {}
    for kind, r in rows.items():
        medians[kind] = statistics.median(r["times"][args.warmup :])
        ips = args.batch / medians[kind]
        print(f"| {kind} | {medians[kind] * 1000:.0f} | {ips:.1f} | {r['peak_mb']:.0f} |")
    print(f"\nspeed-up (authors' step time / ours): {medians['authors'] / medians['ours']:.2f}x")


if __name__ == "__main__":
    main()
