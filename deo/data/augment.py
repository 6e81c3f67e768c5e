"""Batched, replayable multi-crop for DEO, run on the training device.

A batch of normalised 10-channel MS tiles ``ms`` ``(B, 10, T, T)`` (bands ``MS_BANDS``) and,
optionally, a co-registered RGB partner ``rgb`` ``(B, 3, T', T')`` in ``[0, 1]`` becomes 2 global
views and ``n_local`` local views. A view crops the same box from every MS channel and from the
RGB, flips both the same way, and then perturbs the colours of the RGB only (DINO's recipe):
the MS channels carry physical reflectances that the student must learn to read, while the RGB
path and the optical teacher are trained on photometrically augmented natural images.

Why batched tensors on the training device and not per-sample transforms in loader workers: the
views of one size are one ``roi_align`` call plus a few dozen elementwise kernels for the whole
batch, so an accelerator renders them without loader workers, and every random choice is an
explicit, storable parameter. On a CPU the cost per batch is about that of the per-sample
torchvision pipeline (the work per pixel is the same and it is memory-bound); see
``benchmarks/bench_augment.py``.

Replay. The teacher-target cache stores, per sample, the parameters of the global views it
computed targets for, and training must re-create exactly those views. So every random number
is drawn into a ``ViewParams`` record first (from an explicit CPU ``torch.Generator``, never the
global RNG), and ``MultiCrop.apply`` is a pure function of (input, record). It is bit-exact also
when a record is split per sample and re-batched in another order or size, because every step
computes a sample's pixels with the same sequence of IEEE operations whatever its neighbours:

- crops are ``roi_align`` (each output pixel computed independently), flips and selections are
  copies, colour ops are elementwise ``+ - * /``, ``min``/``max``, ``floor``, ``fmod``;
- the one reduction over pixels (the mean of contrast) is summed in int64 fixed point, which is
  associative, instead of a float reduction whose order depends on the batch shape;
- the Gaussian blur is an explicit sum over taps (elementwise multiply-add, no convolution
  algorithm chosen by shape), with taps computed on the CPU in float64 and rounded to float32
  (SIMD and scalar ``exp`` may differ by an ulp of float64, which the rounding absorbs except
  with a probability of order 2**-29 per tap).

Results depend on the device (CPU vs CUDA kernels), so a cache is replayed on the device kind
that built it when bit equality matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness_accumulative, adjust_hue
from torch import Tensor
from torchvision.ops import roi_align

from deo.data.bands import MS_BANDS, RGB_BANDS

if TYPE_CHECKING:
    from deo.train.config import TrainConfig

N_GLOBAL = 2
"""Global views per sample (DINO, DEO). The teacher sees these; the student sees all views."""

JITTER_STRENGTH: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
"""ColorJitter brightness, contrast, saturation, hue of DINO/DEO; factors are drawn from
``[1 - s, 1 + s]`` for the first three and ``[-s, s]`` (fraction of a hue turn) for hue."""
JITTER_P = 0.8
GRAY_P = 0.2
BLUR_SIGMA: tuple[float, float] = (0.1, 2.0)
BLUR_KERNEL = 9
"""Gaussian blur taps per axis, as DINOv2's ``GaussianBlur(kernel_size=9)``; reflect padding."""
GLOBAL_BLUR_P: tuple[float, float] = (1.0, 0.1)
LOCAL_BLUR_P = 0.5
GLOBAL_SOLARIZE_P: tuple[float, float] = (0.0, 0.2)
SOLARIZE_THRESHOLD = 0.5
GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R 601 luma, as torchvision's ``rgb_to_grayscale`` (and so ColorJitter's contrast and
saturation)."""

_CPU_CHUNK_BYTES = 2**22
"""RGB bytes per chunk of the photometric ops on the CPU (see ``MultiCrop._photometric``)."""

CROP_ATTEMPTS = 10
"""Rejection-sampling tries per box before the centre-crop fallback, as RandomResizedCrop."""

_MEAN_FIXED_POINT = 2.0**40
"""Scale of the int64 fixed-point sum behind the contrast mean: values in [0, 1] keep 40
fractional bits and 2**23 pixels still fit in int64."""

# Columns of the one uniform draw per view (see ``_draw``); a fixed width keeps the generator's
# stream aligned whatever the probabilities, so toggling an option never shifts later views.
_AREA = slice(0, CROP_ATTEMPTS)
_LOGR = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_POS = slice(2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 2)
_HFLIP, _VFLIP, _JITTER_ON = 22, 23, 24
_FACTORS, _ORDER = slice(25, 29), slice(29, 33)
_GRAY, _BLUR_ON, _SIGMA, _SOLARIZE = 33, 34, 35, 36
_N_DRAWS = 37


@dataclass
class ViewParams:
    """Every random choice of one view for a batch: tensor fields with a leading sample axis.

    Fields (CPU tensors as sampled; ``box`` in input MS pixel coordinates where pixel ``i``
    covers ``[i, i + 1)``, so the full tile is ``(0, 0, T, T)``):

    - ``box`` float32 ``(B, 4)``: ``x0, y0, x1, y1``;
    - ``hflip``, ``vflip`` bool ``(B,)``: the view is the mirrored crop;
    - ``jitter`` float32 ``(B, 4)``: brightness, contrast, saturation factors and hue shift (in
      turns, torchvision's convention), applied in the per-sample order ``jitter_order`` int64
      ``(B, 4)`` (a permutation of 0..3 in that field order, as torchvision's ColorJitter);
    - ``jitter_on``, ``gray``, ``solarize`` bool ``(B,)``; ``blur_sigma`` float32 ``(B,)``,
      0 = no blur.
    """

    box: Tensor
    hflip: Tensor
    vflip: Tensor
    jitter: Tensor
    jitter_order: Tensor
    jitter_on: Tensor
    gray: Tensor
    blur_sigma: Tensor
    solarize: Tensor

    def __len__(self) -> int:
        return self.box.shape[0]

    def to_dict(self) -> dict[str, Tensor]:
        """Plain name -> tensor mapping, for a Zarr cache or a checkpoint."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Tensor]) -> ViewParams:
        """Inverse of ``to_dict``; a missing or unknown key fails loudly (a stale cache format)."""
        names = {f.name for f in fields(cls)}
        if missing := names - data.keys():
            raise KeyError(f"view parameters lack {sorted(missing)}")
        if unknown := data.keys() - names:
            raise KeyError(f"unknown view parameters {sorted(unknown)}")
        return cls(**{name: torch.as_tensor(data[name]) for name in names})

    def index(self, idx: int | slice | Sequence[int] | Tensor) -> ViewParams:
        """The records of some samples (an int keeps the sample axis), e.g. to cache per sample."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, Sequence) and not isinstance(idx, str):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return ViewParams(**{k: v[idx] for k, v in self.to_dict().items()})

    @classmethod
    def cat(cls, records: Sequence[ViewParams]) -> ViewParams:
        """Records of several batches (or per-sample records from a cache) as one batch."""
        return cls(
            **{f.name: torch.cat([getattr(r, f.name) for r in records]) for f in fields(cls)}
        )

    def to(self, device: torch.device | str) -> ViewParams:
        return ViewParams(**{k: v.to(device) for k, v in self.to_dict().items()})

    def geometric_only(self) -> ViewParams:
        """The same crops and flips with every photometric op off (the optical-aug ablation)."""
        off = torch.zeros_like(self.gray)
        return ViewParams(
            box=self.box,
            hflip=self.hflip,
            vflip=self.vflip,
            jitter=self.jitter,
            jitter_order=self.jitter_order,
            jitter_on=off,
            gray=off,
            blur_sigma=torch.zeros_like(self.blur_sigma),
            solarize=off,
        )


@dataclass
class MultiCropBatch:
    """The views of one batch. ``global_params`` replays the global views (teacher cache)."""

    global_ms: list[Tensor]
    global_rgb: list[Tensor]
    local_ms: list[Tensor]
    local_rgb: list[Tensor]
    global_params: list[ViewParams]


class MultiCrop:
    """DINO multi-crop of MS tiles and their RGB, batched on the data's device and replayable.

    Args:
        global_size, local_size: output side of global and local views, in pixels.
        n_local: local views per sample.
        global_scale, local_scale: range of the crop area as a fraction of the tile area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        vflip_p: probability of a vertical flip. Remote-sensing tiles have no canonical "up",
            so vertical flips are valid here; the default 0.0 keeps the authors' DINO recipe
            (horizontal flips only). Horizontal flips always have probability 0.5.
        optical_aug: photometric augmentation of the RGB channels (the ablation row
            "+ optical augmentation"). Off, records are sampled with every photometric op off but
            from the same random draws, so crops and flips of a seed are the same either way.
        band_stats: ``{band: {"mean", "std"}}`` of the store (the loader's normalisation); needed
            only to derive RGB from the MS tiles when no RGB partner is given.
        rgb_scale: derived RGB = clip(DN * rgb_scale, 0, 1) of B04, B03, B02 after undoing the
            normalisation. Sentinel-2 L1C DN are reflectance x 10000 and natural scenes rarely pass
            a reflectance of 0.3, so 1/3000 is the usual true-colour stretch.
        blur_kernel: taps per axis of the Gaussian blur (odd).
        bands: band order of the MS channels.
    """

    def __init__(
        self,
        *,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 10,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        vflip_p: float = 0.0,
        optical_aug: bool = True,
        band_stats: Mapping[str, Mapping[str, float]] | None = None,
        rgb_scale: float = 1 / 3000,
        blur_kernel: int = BLUR_KERNEL,
        bands: Sequence[str] = MS_BANDS,
    ) -> None:
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        if not 0 <= vflip_p <= 1:
            raise ValueError(f"vflip_p must be in [0, 1], got {vflip_p}")
        if min(global_size, local_size) < 1 or n_local < 0:
            raise ValueError("view sizes must be positive and n_local non-negative")
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd integer, got {blur_kernel}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale, self.ratio = global_scale, local_scale, ratio
        self.vflip_p, self.optical_aug, self.blur_kernel = vflip_p, optical_aug, blur_kernel
        self.rgb_scale = rgb_scale
        self.rgb_index = [list(bands).index(b) for b in RGB_BANDS]
        self.rgb_mean, self.rgb_std = _rgb_stats(band_stats)

    @classmethod
    def for_training(
        cls, cfg: TrainConfig, band_stats: Mapping[str, Mapping[str, float]] | None = None
    ) -> MultiCrop:
        """The views a training run with ``cfg`` draws: the loop and the teacher cache (which
        must draw the same global views) both build it here."""
        crops = cfg.crops
        return cls(
            global_size=crops.global_size,
            local_size=crops.local_size,
            n_local=crops.n_local,
            global_scale=crops.global_scale,
            local_scale=crops.local_scale,
            optical_aug=cfg.ablation.optical_aug,
            band_stats=band_stats,
            rgb_scale=crops.rgb_scale,
        )

    # ---- sampling -------------------------------------------------------------------------

    def sample_global(
        self, batch_size: int, tile_size: int, view: int, generator: torch.Generator
    ) -> ViewParams:
        """Parameters of global view ``view`` (0 or 1: blur and solarize odds differ by view)."""
        if view not in range(N_GLOBAL):
            raise ValueError(f"view must be in 0..{N_GLOBAL - 1}, got {view}")
        return self._sample(
            batch_size,
            tile_size,
            generator,
            scale=self.global_scale,
            blur_p=GLOBAL_BLUR_P[view],
            solarize_p=GLOBAL_SOLARIZE_P[view],
        )

    def sample_local(
        self, batch_size: int, tile_size: int, generator: torch.Generator
    ) -> ViewParams:
        """Parameters of one local view (blur 0.5, never solarized)."""
        return self._sample(
            batch_size, tile_size, generator, self.local_scale, blur_p=LOCAL_BLUR_P, solarize_p=0.0
        )

    def _sample(
        self,
        n: int,
        tile: int,
        generator: torch.Generator,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
    ) -> ViewParams:
        u = _draw(n, generator)
        b, c, s, h = JITTER_STRENGTH
        start = torch.tensor([1 - b, 1 - c, 1 - s, -h], dtype=torch.float64)
        span = torch.tensor([2 * b, 2 * c, 2 * s, 2 * h], dtype=torch.float64)
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, _SIGMA]
        blur_on = u[:, _BLUR_ON] < blur_p
        photometric = self.optical_aug
        return ViewParams(
            box=_sample_boxes(u, tile, scale, self.ratio),
            hflip=u[:, _HFLIP] < 0.5,
            vflip=u[:, _VFLIP] < self.vflip_p,
            jitter=(start + span * u[:, _FACTORS]).float(),
            jitter_order=u[:, _ORDER].argsort(dim=1),
            jitter_on=(u[:, _JITTER_ON] < JITTER_P) & photometric,
            gray=(u[:, _GRAY] < GRAY_P) & photometric,
            blur_sigma=torch.where(blur_on & photometric, sigma, 0.0).float(),
            solarize=(u[:, _SOLARIZE] < solarize_p) & photometric,
        )

    # ---- rendering ------------------------------------------------------------------------

    def apply(
        self, ms: Tensor, rgb: Tensor | None, params: ViewParams, size: int
    ) -> tuple[Tensor, Tensor]:
        """One view of the batch, ``(ms_view (B, 10, s, s), rgb_view (B, 3, s, s))``.

        A pure function of its arguments: the same record gives the same pixels, bit for bit.
        The RGB view is cropped from ``rgb`` when given (its box scaled by ``T' / T`` if the
        partner has another resolution), else derived from the MS view (``derive_rgb``).
        """
        if len(params) != ms.shape[0]:
            raise ValueError(f"{len(params)} view records for a batch of {ms.shape[0]}")
        return self._render(ms, rgb, params, size, torch.arange(ms.shape[0]))

    def __call__(
        self,
        ms: Tensor,
        rgb: Tensor | None,
        generator: torch.Generator,
        global_params: list[ViewParams] | None = None,
    ) -> MultiCropBatch:
        """All views of a batch; ``global_params`` replays cached global views, locals are fresh.

        Fresh global records are drawn even when replaying, so a seed yields the same local views
        in a cached run as in an online one.
        """
        b, tile = _check_batch(ms, rgb)
        fresh = [self.sample_global(b, tile, v, generator) for v in range(N_GLOBAL)]
        local = [self.sample_local(b, tile, generator) for _ in range(self.n_local)]
        if global_params is None:
            global_params = fresh
        elif len(global_params) != N_GLOBAL or any(len(p) != b for p in global_params):
            raise ValueError(f"global_params must be {N_GLOBAL} records of {b} samples each")
        g_ms, g_rgb = self._render_views(ms, rgb, global_params, self.global_size)
        l_ms, l_rgb = self._render_views(ms, rgb, local, self.local_size)
        return MultiCropBatch(g_ms, g_rgb, l_ms, l_rgb, list(global_params))

    def _render_views(
        self, ms: Tensor, rgb: Tensor | None, records: list[ViewParams], size: int
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Views of one size rendered as one batch of ``len(records) * B`` crops (fewer kernels);
        bit-equal to rendering them one by one, as rendering is per-sample independent."""
        if not records:
            return [], []
        b = ms.shape[0]
        image = torch.arange(b).repeat(len(records))
        ms_v, rgb_v = self._render(ms, rgb, ViewParams.cat(records), size, image)
        return list(ms_v.split(b)), list(rgb_v.split(b))

    def _render(
        self, ms: Tensor, rgb: Tensor | None, params: ViewParams, size: int, image: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Crops ``params.box[k]`` of sample ``image[k]`` for every record ``k``.

        Flips are folded into the crop: the mirrored box is cropped from a flipped copy of the
        tile, so only the (small) input tiles are flipped, once per flip kind in use, never the
        (larger, 10-channel) output views.
        """
        _, tile = _check_batch(ms, rgb)
        p = params.to("cpu")
        if p.box.numel() and p.box[:, 2:].max() > tile * (1 + 1e-6):
            raise ValueError(
                f"view boxes reach past the {tile}-pixel tile: sampled for another size?"
            )
        kinds, rois = _flip_plan(p, image, ms.shape[0], tile)
        rois = rois.to(ms.device)
        ms_v = _crop(_flipped(ms.float(), kinds), rois, size, 1.0)
        if rgb is None:
            rgb_v = self.derive_rgb(ms_v)
        else:
            scale = rgb.shape[-1] / ms.shape[-1]
            rgb_v = _crop(_flipped(rgb.float(), kinds), rois, size, scale).clamp_(0.0, 1.0)
        rgb_v = self._photometric(rgb_v, p)
        return ms_v.to(ms.dtype), rgb_v.to(ms.dtype if rgb is None else rgb.dtype)

    def derive_rgb(self, ms: Tensor) -> Tensor:
        """RGB in [0, 1] from normalised MS: B04, B03, B02 un-normalised to DN, times rgb_scale."""
        if self.rgb_mean is None or self.rgb_std is None:
            raise ValueError(
                "no RGB partner was given and MultiCrop has no band_stats to derive RGB from the "
                "MS channels: pass band_stats={band: {'mean', 'std'}} (the store's statistics)"
            )
        mean = self.rgb_mean.to(ms.device)[:, None, None]
        std = self.rgb_std.to(ms.device)[:, None, None]
        dn = ms[:, self.rgb_index].float() * std + mean
        return (dn * self.rgb_scale).clamp(0.0, 1.0)

    def _photometric(self, rgb: Tensor, p: ViewParams) -> Tensor:
        """DINO's colour pipeline in its order: jitter, grayscale, blur, solarize (in place).

        On the CPU the rows go through in chunks of about ``_CPU_CHUNK_BYTES``: the ops are
        memory-bound chains of elementwise passes, which run several times faster when their
        temporaries stay in cache (blur ~10x, hue ~3x faster at 224 px here). Rows are independent,
        so chunking does not change a bit of the result. Accelerators take the batch whole.
        """
        n = rgb.shape[0]
        step = n if rgb.device.type != "cpu" else max(1, _CPU_CHUNK_BYTES // rgb[:1].nbytes)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            _photometric_rows_(rgb[rows], p.index(rows), self.blur_kernel)
        return rgb


# ---- sampling helpers ------------------------------------------------------------------------


def _draw(n: int, generator: torch.Generator) -> Tensor:
    """All uniform numbers of one view, ``(n, _N_DRAWS)`` float64, from the caller's generator."""
    if generator.device.type != "cpu":
        raise ValueError("MultiCrop samples on the CPU: pass a CPU torch.Generator")
    return torch.rand(n, _N_DRAWS, generator=generator, dtype=torch.float64)


def _sample_boxes(
    u: Tensor, tile: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Tensor:
    """RandomResizedCrop's box distribution, vectorised, with sub-pixel box corners.

    Each sample tries ``CROP_ATTEMPTS`` (area, log-ratio) pairs and keeps the first that fits the
    tile; if none fits, it falls back to the largest centred box with the ratio clamped to the
    range (torchvision's rule). Corners are not rounded to pixels: ``roi_align`` samples any box.
    """
    area = tile * tile * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _LOGR])
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= tile) & (h <= tile)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    found = fits.any(dim=1)
    fallback_w = tile * min(1.0, ratio[1])
    fallback_h = tile * min(1.0, 1 / ratio[0])
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    pos = torch.where(found[:, None], u[:, _POS], 0.5)
    x0, y0 = pos[:, 0] * (tile - w), pos[:, 1] * (tile - h)
    box = torch.stack([x0, y0, (x0 + w).clamp(max=tile), (y0 + h).clamp(max=tile)], dim=1)
    return box.float()


# ---- rendering helpers -----------------------------------------------------------------------


def _check_batch(ms: Tensor, rgb: Tensor | None) -> tuple[int, int]:
    """Batch size and tile side of a square ``(B, C, T, T)`` batch (and a matching partner)."""
    if ms.ndim != 4 or ms.shape[-1] != ms.shape[-2]:
        raise ValueError(f"ms must be (B, C, T, T), got {tuple(ms.shape)}")
    if rgb is not None and (
        rgb.ndim != 4 or rgb.shape[:2] != (ms.shape[0], 3) or rgb.shape[-1] != rgb.shape[-2]
    ):
        raise ValueError(f"rgb must be (B, 3, T', T') beside ms {tuple(ms.shape)}, got {rgb.shape}")
    if not ms.is_floating_point() or (rgb is not None and not rgb.is_floating_point()):
        raise TypeError("ms and rgb must be floating point (normalised MS, RGB in [0, 1])")
    if rgb is not None and rgb.device != ms.device:
        raise ValueError(f"ms is on {ms.device} but rgb on {rgb.device}")
    return ms.shape[0], ms.shape[-1]


def _rgb_stats(
    band_stats: Mapping[str, Mapping[str, float]] | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Mean and std of B04, B03, B02 (R, G, B order) from the store's per-band statistics."""
    if band_stats is None:
        return None, None
    if missing := [b for b in RGB_BANDS if b not in band_stats]:
        raise ValueError(f"band_stats lack {missing}, needed to derive RGB from MS")
    mean = torch.tensor([band_stats[b]["mean"] for b in RGB_BANDS], dtype=torch.float32)
    std = torch.tensor([band_stats[b]["std"] for b in RGB_BANDS], dtype=torch.float32)
    return mean, std


def _crop(x: Tensor, boxes: Tensor, size: int, spatial_scale: float) -> Tensor:
    """Bilinear crop-and-resize of ``boxes`` ``(K, 5)`` = (image, x0, y0, x1, y1) to ``size``².

    ``aligned=True`` treats pixel ``i`` as the interval ``[i, i + 1)``, so output pixel ``j``
    samples ``x0 + (j + 0.5) * w / size - 0.5`` (align_corners=False; a full-tile box equals
    ``F.interpolate(..., mode="bilinear", align_corners=False)``). Shrinking boxes average
    ``ceil(w / size)``² bilinear samples per output pixel (adaptive sampling_ratio), a box
    prefilter against aliasing.
    """
    return roi_align(x, boxes.to(x.dtype), size, spatial_scale, sampling_ratio=-1, aligned=True)


def _flip_plan(p: ViewParams, image: Tensor, batch: int, tile: int) -> tuple[list[int], Tensor]:
    """Flip kinds in use (0 none, 1 h, 2 v, 3 both) and ``roi_align`` rows (source, box).

    Record ``k`` crops its box mirrored within the tile from the copy of sample ``image[k]``
    flipped the record's way; copies of one kind are stacked ``batch`` apart (see ``_flipped``).
    """
    kind = p.hflip.long() + 2 * p.vflip.long()
    kinds = torch.unique(kind)
    source = torch.searchsorted(kinds, kind) * batch + image
    x0, y0, x1, y1 = p.box.unbind(dim=1)
    x0, x1 = torch.where(p.hflip, tile - x1, x0), torch.where(p.hflip, tile - x0, x1)
    y0, y1 = torch.where(p.vflip, tile - y1, y0), torch.where(p.vflip, tile - y0, y1)
    rois = torch.stack([source.to(x0), x0, y0, x1, y1], dim=1)
    return kinds.tolist(), rois


def _flipped(x: Tensor, kinds: list[int]) -> Tensor:
    """``x`` flipped each of the ``kinds`` ways, stacked on the batch axis (no copy for [0])."""
    dims = {0: (), 1: (-1,), 2: (-2,), 3: (-2, -1)}
    copies = [x.flip(dims[k]) if dims[k] else x for k in kinds]
    return copies[0] if len(copies) == 1 else torch.cat(copies)


def _rows(mask: Tensor, device: torch.device) -> Tensor | None:
    """Indices (on ``device``) of the rows a CPU mask selects, or None if it selects none."""
    rows = torch.nonzero(mask)[:, 0]
    return rows.to(device) if rows.numel() else None


def _grayscale(rgb: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)`` as separate multiplies and adds (no fused multiply-add, whose
    rounding could differ between vectorised and scalar tails)."""
    r, g, b = rgb.unbind(dim=1)
    wr, wg, wb = GRAY_WEIGHTS
    return (r * wr + g * wg + b * wb)[:, None]


def _adjust_contrast(rgb: Tensor, factor: Tensor) -> Tensor:
    """torchvision contrast: blend with the mean luma; the mean is an exact int64 sum so it does
    not depend on how many samples share the reduction kernel."""
    fixed = torch.round(_grayscale(rgb).double() * _MEAN_FIXED_POINT).long()
    mean = fixed.sum(dim=(1, 2, 3)).double() / (_MEAN_FIXED_POINT * fixed[0].numel())
    mean = mean.float()[:, None, None, None]
    factor = factor[:, None, None, None]
    return (rgb * factor + mean * (1.0 - factor)).clamp(0.0, 1.0)


def _adjust_saturation(rgb: Tensor, factor: Tensor) -> Tensor:
    """torchvision saturation: blend with the luma image."""
    factor = factor[:, None, None, None]
    return (rgb * factor + _grayscale(rgb) * (1.0 - factor)).clamp(0.0, 1.0)


def _jitter_op(rgb: Tensor, op: int, factor: Tensor) -> Tensor:
    """One ColorJitter step (0 brightness, 1 contrast, 2 saturation, 3 hue in turns)."""
    if op == 0:
        return adjust_brightness_accumulative(rgb, factor)
    if op == 1:
        return _adjust_contrast(rgb, factor)
    if op == 2:
        return _adjust_saturation(rgb, factor)
    return adjust_hue(rgb, factor * (2 * math.pi))


def _photometric_rows_(rgb: Tensor, p: ViewParams, blur_kernel: int) -> None:
    """Jitter, grayscale, blur, solarize of ``rgb`` in place; each op touches only the rows it
    applies to, selected on the CPU record (no device sync)."""
    _color_jitter_(rgb, p)
    if (rows := _rows(p.gray, rgb.device)) is not None:
        rgb[rows] = _grayscale(rgb[rows]).expand(-1, 3, -1, -1)
    if (rows := _rows(p.blur_sigma > 0, rgb.device)) is not None:
        rgb[rows] = _blur(rgb[rows], p.blur_sigma[p.blur_sigma > 0], blur_kernel)
    if (rows := _rows(p.solarize, rgb.device)) is not None:
        rgb[rows] = solarize(rgb[rows])


def _color_jitter_(rgb: Tensor, p: ViewParams) -> None:
    """ColorJitter with per-sample factors and order, in place.

    At each of the 4 steps every op runs once, on the samples whose order puts it at that step,
    so each jittered sample costs 4 ops.
    """
    for step in range(4):
        for op in range(4):
            mask = p.jitter_on & (p.jitter_order[:, step] == op)
            if (rows := _rows(mask, rgb.device)) is not None:
                factor = p.jitter[mask, op].to(rgb.device)
                rgb[rows] = _jitter_op(rgb[rows], op, factor)


def _gaussian_taps(sigma: Tensor, kernel: int) -> Tensor:
    """Normalised 1-D Gaussian taps ``(n, kernel)`` float32, evaluated in float64 on the CPU."""
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    taps = torch.exp(-(x**2) / (2 * sigma.double()[:, None] ** 2))
    return (taps / taps.sum(dim=1, keepdim=True)).float()


def _blur(rgb: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` (CPU, > 0), reflect padding.

    An explicit sum over shifted copies instead of a convolution: each output pixel is the same
    sequence of multiplies and adds whatever the batch, which keeps replay bit-exact.
    """
    taps = _gaussian_taps(sigma, kernel).to(rgb.device)[:, :, None, None, None]
    pad = kernel // 2
    x = _blur_axis(F.pad(rgb, (pad, pad, 0, 0), mode="reflect"), taps, dim=-1)
    return _blur_axis(F.pad(x, (0, 0, pad, pad), mode="reflect"), taps, dim=-2)


def _blur_axis(padded: Tensor, taps: Tensor, dim: int) -> Tensor:
    """Correlate ``padded`` with symmetric per-sample ``taps`` ``(n, k, 1, 1, 1)`` along ``dim``.

    Symmetric taps (``taps[t] == taps[k-1-t]`` exactly) let mirrored pairs share a multiply.
    """
    k = taps.shape[1]
    r, length = k // 2, padded.shape[dim] - k + 1
    acc = padded.narrow(dim, r, length) * taps[:, r]
    for t in range(r):
        pair = padded.narrow(dim, t, length) + padded.narrow(dim, k - 1 - t, length)
        acc += pair.mul_(taps[:, t])
    return acc


def solarize(rgb: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Solarize: invert pixels at or above ``threshold`` (torchvision's ``x >= t -> 1 - x``)."""
    return torch.where(rgb >= threshold, 1.0 - rgb, rgb)
