"""Multi-crop cost per batch: our batched ``MultiCrop`` vs the authors' per-sample pattern.

The per-sample pattern is the authors' ``DataAugmentationDINOMS`` run on one sample at a time:
for every view, RandomResizedCrop (bicubic, antialiased) and a horizontal flip of the 10-channel
stack (optical channels first, at the Sentinel-2 resolution, as their HDF5 holds them), the
optical channels divided by their maximum, then ColorJitter (p=0.8), RandomGrayscale, kornia's
23-tap Gaussian blur and kornia's solarize on them, then all 10 channels normalised. Ours renders
all views of one size for the whole batch at once, with the partner at its own resolution
(``--rgb-tile``) or at the tile's. Both make 2 global and ``--n-local`` local views;
``--repeats`` interleaved runs, best and median.

    python benchmarks/bench_augment.py --batch-size 32 --tile 96 --rgb-tile 128
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import kornia.augmentation as K
import torch
from torchvision.transforms import InterpolationMode, v2

from deo.data.augment import (
    BLUR_KERNEL,
    BLUR_SIGMA,
    GLOBAL_BLUR_P,
    GLOBAL_SOLARIZE_P,
    GRAY_P,
    JITTER_P,
    JITTER_STRENGTH,
    LOCAL_BLUR_P,
    MultiCrop,
)
from deo.data.bands import MS_BANDS
from deo.data.model_input import MODEL_BANDS, OPTICAL, OPTICAL_S2

log = logging.getLogger("bench_augment")


def rgb_ops(blur_p: float, solarize_p: float) -> v2.Compose:
    """The photometric half of the authors' per-view pipeline."""
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(*JITTER_STRENGTH)], p=JITTER_P),
            v2.RandomGrayscale(p=GRAY_P),
            K.RandomGaussianBlur(BLUR_KERNEL, BLUR_SIGMA, p=blur_p, keepdim=True),
            K.RandomSolarize(0.5, p=solarize_p, keepdim=True),
        ]
    )


class PerSampleMultiCrop:
    """The per-sample pattern: a Python loop over samples and views of torchvision transforms."""

    def __init__(self, mc: MultiCrop, mean: torch.Tensor, std: torch.Tensor) -> None:
        def geometry(size: int, scale: tuple[float, float]) -> v2.Compose:
            crop = v2.RandomResizedCrop(
                size, scale=scale, ratio=mc.ratio, interpolation=InterpolationMode.BICUBIC
            )
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
        self.mean, self.std = mean, std

    def __call__(self, stack: torch.Tensor) -> list[torch.Tensor]:
        views = []
        for geometry, photometric in self.globals + self.locals:
            out = []
            for i in range(stack.shape[0]):
                crop = geometry(stack[i])
                optical = crop[:3] / crop[:3].max()
                optical = photometric(optical.clamp(0, 1))
                out.append((torch.cat([optical, crop[3:]]) - self.mean) / self.std)
            views.append(torch.stack(out))
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
    parser.add_argument("--rgb-tile", type=int, default=128, help="the partner's side")
    parser.add_argument("--n-local", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="device of ours (per-sample: CPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    b, t, r = args.batch_size, args.tile, args.rgb_tile
    ms = torch.randint(200, 5000, (b, len(MS_BANDS), t, t), generator=g).to(torch.uint16)
    rgb = torch.randint(0, 256, (b, 3, r, r), generator=g).to(torch.uint8)
    rgb_at_tile = torch.randint(0, 256, (b, 3, t, t), generator=g).to(torch.uint8)
    has = torch.arange(b) % 4 != 3
    stats = {band: {"mean": 1500.0, "std": 400.0} for band in MS_BANDS}
    stats |= {key: {"mean": 0.4, "std": 0.28} for key in OPTICAL + OPTICAL_S2}
    mc = MultiCrop(n_local=args.n_local, band_stats=stats)
    theirs = PerSampleMultiCrop(mc, mc.mean, mc.std)
    model_order = [MS_BANDS.index(band) for band in MODEL_BANDS]
    stack = ms.float()[:, model_order]
    stack[:, :3] = rgb_at_tile.float()  # the authors' stack: optical channels at the tile's size
    dev = torch.device(args.device)
    ms_dev, rgb_dev, tile_dev = ms.to(dev), rgb.to(dev), rgb_at_tile.to(dev)

    results = time_interleaved(
        {
            f"ours, partner at {r} px": lambda: mc(ms_dev, rgb_dev, has, g),
            f"ours, partner at {t} px": lambda: mc(ms_dev, tile_dev, has, g),
            "per-sample (authors' pattern)": lambda: theirs(stack),
        },
        args.repeats,
    )
    reference = results["per-sample (authors' pattern)"][0]
    log.info(
        "B=%d, T=%d, R=%d, 2 x %d px global + %d x %d px local views, %s, %d torch threads",
        b,
        t,
        r,
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
