"""Multi-crop cost per batch: our batched ``MultiCrop`` vs the per-sample transforms pattern.

The per-sample pattern (the authors' way, as in DINO-style ``DataAugmentation`` classes) runs
torchvision ``transforms.v2`` on one sample at a time: for every view, RandomResizedCrop and a
horizontal flip of the 13-channel MS+RGB stack (so both share the geometry), then ColorJitter
(p=0.8), RandomGrayscale, GaussianBlur and RandomSolarize on the RGB, then stacks the views.
Ours renders all views of one size for the whole batch at once. Both get the same tensors and
make 2 global and ``--n-local`` local views; ``--repeats`` interleaved runs, best and median.

    python benchmarks/bench_augment.py --batch-size 32 --tile 96
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from deo.data.augment import (
    BLUR_KERNEL,
    BLUR_SIGMA,
    GLOBAL_BLUR_P,
    GLOBAL_SOLARIZE_P,
    GRAY_P,
    JITTER_P,
    JITTER_STRENGTH,
    LOCAL_BLUR_P,
    SOLARIZE_THRESHOLD,
    MultiCrop,
)
from deo.data.bands import MS_BANDS

log = logging.getLogger("bench_augment")


def rgb_ops(blur_p: float, solarize_p: float) -> v2.Compose:
    """The photometric half of DINO's per-view pipeline, as torchvision transforms."""
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(*JITTER_STRENGTH)], p=JITTER_P),
            v2.RandomGrayscale(p=GRAY_P),
            v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, BLUR_SIGMA)], p=blur_p),
            v2.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize_p),
        ]
    )


class PerSampleMultiCrop:
    """The per-sample pattern: a Python loop over samples and views of torchvision transforms."""

    def __init__(self, mc: MultiCrop) -> None:
        def geometry(size: int, scale: tuple[float, float]) -> v2.Compose:
            crop = v2.RandomResizedCrop(size, scale=scale, ratio=mc.ratio, antialias=True)
            return v2.Compose([crop, v2.RandomHorizontalFlip()])

        self.globals = [
            (
                geometry(mc.global_size, mc.global_scale),
                rgb_ops(GLOBAL_BLUR_P[v], GLOBAL_SOLARIZE_P[v]),
            )
            for v in range(2)
        ]
        self.locals = [(geometry(mc.local_size, mc.local_scale), rgb_ops(LOCAL_BLUR_P, 0.0))]
        self.locals *= mc.n_local

    def __call__(self, ms: torch.Tensor, rgb: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        views = []
        for geometry, photometric in self.globals + self.locals:
            ms_views, rgb_views = [], []
            for i in range(ms.shape[0]):
                both = geometry(torch.cat([ms[i], rgb[i]]))
                ms_views.append(both[:-3])
                rgb_views.append(photometric(both[-3:].clamp(0, 1)))
            views.append((torch.stack(ms_views), torch.stack(rgb_views)))
        return views


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Best and median wall time (ms) of each function, after one untimed warm-up each.

    The functions take turns, so a load spike on a shared machine hits them alike; the best
    time is the least disturbed estimate of the cost.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(1000 * (time.perf_counter() - t0))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--n-local", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="device of ours (per-sample: CPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    b, t = args.batch_size, args.tile
    ms = torch.randn(b, len(MS_BANDS), t, t, generator=g)
    rgb = torch.rand(b, 3, t, t, generator=g)
    stats = {band: {"mean": 1500.0, "std": 400.0} for band in MS_BANDS}
    mc = MultiCrop(n_local=args.n_local, band_stats=stats)
    theirs = PerSampleMultiCrop(mc)
    ms_dev, rgb_dev = ms.to(args.device), rgb.to(args.device)

    results = time_interleaved(
        {
            "ours, RGB partner": lambda: mc(ms_dev, rgb_dev, g),
            "ours, RGB derived from MS": lambda: mc(ms_dev, None, g),
            "per-sample transforms.v2": lambda: theirs(ms, rgb),
        },
        args.repeats,
    )
    reference = results["per-sample transforms.v2"][0]
    log.info(
        "B=%d, T=%d, 2 x %d px global + %d x %d px local views, %s, %d torch threads",
        b,
        t,
        mc.global_size,
        mc.n_local,
        mc.local_size,
        args.device,
        torch.get_num_threads(),
    )
    log.info("| method | best ms/batch | median ms/batch | speed-up (best) |")
    log.info("|---|---:|---:|---:|")
    for name, (best, median) in results.items():
        log.info("| %s | %.0f | %.0f | %.2fx |", name, best, median, reference / best)


if __name__ == "__main__":
    main()
