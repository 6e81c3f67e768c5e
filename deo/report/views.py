"""What the model sees: the first training batches' views, written out and drawn.

``dump_views`` runs the training loop's own input path (``deo.train.inputs``: dataset, sampler,
seed, ``MultiCrop``) for a run's first batches, as a one-rank run draws them, and writes each
batch as it enters the model. ``plot_views`` draws a few samples of the first batch: the optical
channels as RGB and an MS false-colour composite, for the global and some local views.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # file output only: no display on cluster nodes

import matplotlib.pyplot as plt
import numpy as np
import torch

from deo.cache.reader import CachedTargets
from deo.cache.spec import GlobalViews
from deo.data.model_input import MODEL_BANDS
from deo.data.store import open_store, read_store_table
from deo.errors import DataError
from deo.models.teacher import TeacherConfig
from deo.train.config import TrainConfig
from deo.train.inputs import render_views, training_data, view_generator

log = logging.getLogger(__name__)

FALSE_COLOUR = ("B11", "B08", "B05")
"""SWIR, NIR and red edge as R, G, B: bands the optical channels do not hold."""
LOCALS_SHOWN = 2


def dump_views(
    cfg: TrainConfig,
    store: Path,
    table: Path,
    out: Path,
    batches: int,
    device: str = "cpu",
    cache: tuple[Path, TeacherConfig] | None = None,
) -> list[Path]:
    """The first ``batches`` training batches' views, one ``batch_NNNN.npz`` each in ``out``.

    With ``cache`` (the teacher cache of a ``teacher.mode: cached`` run and the teacher config,
    checked as training checks it) the global views are the cached ones training replays.

    Arrays: ``global_ms`` ``(2, B, 10, H, W)`` and ``local_ms`` ``(n, B, 10, h, w)`` (normalised
    model input), ``global_rgb`` / ``local_rgb`` (the optical input of each view: its channels
    0-2), ``channels`` (the 10 names), ``keys`` (each row's sample key), ``index`` (store rows),
    ``has_rgb`` and the normalisation ``mean`` / ``std`` (to show the views in physical units).
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    data = training_data(cfg, store, table)
    targets = None
    if cache is not None:
        targets = CachedTargets(cache[0])
        targets.verify_run(cache[1], store, table, GlobalViews.of(data.multicrop))
    keys = read_store_table(table, open_store(store))["key"].to_numpy()
    generator = view_generator(cfg, rank=0)
    sampler = data.loader.batch_sampler
    if batches > len(sampler):
        raise DataError(store, f"{batches} batches asked, an epoch has {len(sampler)}")
    sampler.set_epoch(0)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, batch in enumerate(data.loader):
        if i == batches:
            break
        views, _ = render_views(data.multicrop, batch, generator, torch.device(device), targets)
        rows = batch["index"].numpy()
        small = (len(rows), len(MODEL_BANDS), data.multicrop.local_size, data.multicrop.local_size)
        has_rgb = batch.get("has_rgb", torch.zeros(len(rows), dtype=torch.bool))
        arrays = {
            "global_ms": _stacked(views.global_ms, small),
            "local_ms": _stacked(views.local_ms, small),
            "global_rgb": _stacked(views.global_rgb, small),
            "local_rgb": _stacked(views.local_rgb, (*small[:1], 3, *small[2:])),
            "channels": np.array(MODEL_BANDS),
            "keys": keys[rows].astype(str),
            "index": rows,
            "has_rgb": has_rgb.numpy(),
            "mean": data.multicrop.mean.flatten().numpy(),
            "std": data.multicrop.std.flatten().numpy(),
        }
        path = out / f"batch_{i:04d}.npz"
        np.savez(path, **arrays)
        written.append(path)
    log.info("wrote the views of %d batch(es) to %s", len(written), out)
    return written


def _stacked(views: list[torch.Tensor], shape: tuple[int, ...]) -> np.ndarray:
    """Views of one kind as ``(n, B, C, H, W)``; none (``n_local: 0``) as ``(0, *shape)``."""
    if not views:
        return np.zeros((0, *shape), np.float32)
    return np.stack([v.cpu().numpy() for v in views])


def _physical(view: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalised ``(10, H, W)`` back to max-scaled optical [0, 1] and Sentinel-2 DN."""
    return view * std[:, None, None] + mean[:, None, None]


def _stretch(x: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` to an ``(H, W, 3)`` image, each channel between its 2nd and 98th percentile."""
    lo = np.percentile(x, 2, axis=(1, 2), keepdims=True)
    hi = np.percentile(x, 98, axis=(1, 2), keepdims=True)
    return np.clip((x - lo) / np.maximum(hi - lo, 1e-9), 0, 1).transpose(1, 2, 0)


def plot_views(npz: Path, out: Path, samples: int = 4) -> None:
    """A grid: one row per sample, per view its optical channels and an MS false colour."""
    with np.load(npz) as f:
        d = {k: f[k] for k in f.files}
    channels = list(d["channels"])
    composite = [channels.index(b) for b in FALSE_COLOUR]
    views = [(f"global {j + 1}", v) for j, v in enumerate(d["global_ms"])]
    views += [(f"local {j + 1}", v) for j, v in enumerate(d["local_ms"][:LOCALS_SHOWN])]
    n = min(samples, d["global_ms"].shape[1])
    fig, axes = plt.subplots(
        n, 2 * len(views), figsize=(2.2 * 2 * len(views), 2.4 * n), squeeze=False
    )
    for i in range(n):
        source = "aerial" if d["has_rgb"][i] else "S2 RGB"
        for j, (name, stack) in enumerate(views):
            x = _physical(stack[i], d["mean"], d["std"])
            panels = (
                (np.clip(x[:3], 0, 1).transpose(1, 2, 0), f"{name}: optical ({source})"),
                (_stretch(x[composite]), f"{name}: {'/'.join(FALSE_COLOUR)}"),
            )
            for k, (image, title) in enumerate(panels):
                ax = axes[i, 2 * j + k]
                ax.imshow(image, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(title, fontsize="x-small")
        axes[i, 0].set_ylabel(Path(str(d["keys"][i])).stem, fontsize="x-small")
    fig.suptitle("What the model sees: the first training batch's views (optical, MS false colour)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
