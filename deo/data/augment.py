"""Batched, replayable multi-crop for DEO, run on the training device: the model's input.

A batch of raw Sentinel-2 tiles ``ms`` ``(B, 10, T, T)`` (DN, bands ``MS_BANDS``), their aerial
partners ``rgb`` ``(B, 3, R, R)`` (any resolution ``R``, raw 0..255) and ``has_rgb`` ``(B,)``
become 2 global and ``n_local`` local views of the model's 10 channels ``[R, G, B, B05 ... B12]``
(``deo.data.model_input``), as the authors' ``DataAugmentationDINOMS`` makes them:

1. one box per view, in normalised tile coordinates, cuts the Sentinel-2 bands at ``T`` and the
   partner at ``R`` (so a view's optical channels keep the aerial detail up to the view's size),
   resampled by antialiased bicubic (``RandomResizedCrop(interpolation=BICUBIC)``) or bilinear
   interpolation, and flipped (all channels alike);
2. the optical channels are the partner's where ``has_rgb``, else B04/B03/B02, divided by their
   maximum over the view and clipped to [0, 1];
3. colour jitter, grayscale, Gaussian blur and solarize act on the optical channels only;
4. all 10 channels are normalised together, ``(x - mean) / std`` (``model_input.normalisation``).

The student's RGB path and the VFM take channels 0-2 of each view (the authors'
``rgb_data = ms_data[:, :3]``): ``MultiCropBatch.global_rgb``/``local_rgb`` are those channels.

Why batched tensors on the training device and not per-sample transforms in loader workers: the
views of one size are a few dozen gathers and elementwise kernels for the whole batch, so an
accelerator renders them without loader workers, and every random choice is an explicit,
storable parameter; see ``benchmarks/bench_augment.py``.

Replay. The teacher-target cache stores, per sample, the parameters of the global views it
computed targets for, and training must re-create exactly those views. So every random number
is drawn into a ``ViewParams`` record first (from an explicit CPU ``torch.Generator``, never the
global RNG), and ``MultiCrop.apply`` is a pure function of (input, record). It is bit-exact also
when a record is split per sample and re-batched in another order or size, because every step
computes a sample's pixels with the same sequence of IEEE operations whatever its neighbours:

- resampling is an explicit sum over filter taps (gathers, then elementwise multiply-add), with
  each sample's taps computed on the CPU in float64 (summed in a fixed order, so padding a
  sample's taps to its batch's widest with zero weights changes nothing) and rounded to float32;
  flips reverse the tap tables, selections are copies;
- colour ops are elementwise ``+ - * /``, ``min``/``max``, ``floor``, ``fmod``; the per-view
  maximum is exact in any order;
- the one sum over pixels (the mean of contrast) is summed in int64 fixed point, which is
  associative, instead of a float reduction whose order depends on the batch shape;
- the Gaussian blur is an explicit sum over taps, computed like the resampling taps (SIMD and
  scalar ``exp`` may differ by an ulp of float64, which the rounding to float32 absorbs except
  with a probability of order 2**-29 per tap).

Results depend on the device (CPU vs CUDA kernels), so a cache is replayed on the device kind
that built it when bit equality matters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness_accumulative, adjust_hue
from torch import Tensor

from deo.data.bands import MS_BANDS
from deo.data.model_input import MAX_EPS, MS_ONLY, S2_OPTICAL
from deo.data.model_input import normalisation as channel_statistics

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
BLUR_KERNEL = 23
"""Gaussian blur taps per axis: the authors' ``GaussianBlurKornia`` (kornia's
``RandomGaussianBlur(kernel_size=23)``), reflect padding."""
GLOBAL_BLUR_P: tuple[float, float] = (1.0, 0.1)
LOCAL_BLUR_P = 0.5
GLOBAL_SOLARIZE_P: tuple[float, float] = (0.0, 0.2)
SOLARIZE_THRESHOLD: tuple[float, float] = (0.0, 1.0)
SOLARIZE_ADDITION: tuple[float, float] = (-0.1, 0.1)
"""The authors' ``SolarizationKornia`` is kornia's ``RandomSolarize(thresholds=0.5)``: per view a
threshold drawn from 0.5 ± 0.5 and an addition from ± 0.1 (kornia's default), applied as
``x = clip(x + addition, 0, 1)``, then ``x >= threshold -> 1 - x``."""
GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R 601 luma, as torchvision's ``rgb_to_grayscale`` (and so ColorJitter's contrast and
saturation)."""

Interpolation = Literal["bicubic", "bilinear"]

_CPU_CHUNK_BYTES = 2**22
"""Bytes of the largest temporary per chunk of samples on the CPU (resampling and photometric
ops): memory-bound elementwise chains run several times faster when it stays in cache."""
_DEVICE_CHUNK_BYTES = 2**28
"""The same bound on an accelerator, where it only caps the memory a render takes."""

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
_GRAY, _BLUR_ON, _SIGMA, _SOLARIZE, _SOL_THRESHOLD, _SOL_ADDITION = 33, 34, 35, 36, 37, 38
_N_DRAWS = 39


@dataclass
class ViewParams:
    """Every random choice of one view for a batch: tensor fields with a leading sample axis.

    Fields (CPU tensors as sampled; ``box`` in Sentinel-2 pixel coordinates where pixel ``i``
    covers ``[i, i + 1)``, so the full tile is ``(0, 0, T, T)``; the partner's box is the same
    box scaled by ``R / T``):

    - ``box`` float32 ``(B, 4)``: ``x0, y0, x1, y1``;
    - ``hflip``, ``vflip`` bool ``(B,)``: the view is the mirrored crop;
    - ``jitter`` float32 ``(B, 4)``: brightness, contrast, saturation factors and hue shift (in
      turns, torchvision's convention), applied in the per-sample order ``jitter_order`` int64
      ``(B, 4)`` (a permutation of 0..3 in that field order, as torchvision's ColorJitter);
    - ``jitter_on``, ``gray``, ``solarize`` bool ``(B,)``; ``blur_sigma`` float32 ``(B,)``,
      0 = no blur; ``solarize_threshold``, ``solarize_addition`` float32 ``(B,)``.
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
    solarize_threshold: Tensor
    solarize_addition: Tensor

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
            **self.to_dict()
            | {
                "jitter_on": off,
                "gray": off,
                "blur_sigma": torch.zeros_like(self.blur_sigma),
                "solarize": off,
            }
        )


@dataclass
class MultiCropBatch:
    """The views of one batch, normalised model input ``(B, 10, s, s)`` per view.

    ``global_rgb``/``local_rgb`` are channels 0-2 of each view (views of the same memory): the
    input of the student's RGB path and of the VFM. ``global_params`` replays the global views.
    """

    global_ms: list[Tensor]
    global_rgb: list[Tensor]
    local_ms: list[Tensor]
    local_rgb: list[Tensor]
    global_params: list[ViewParams]


class MultiCrop:
    """DINO multi-crop of the model's 10-channel input, batched on the data's device, replayable.

    Args:
        global_size, local_size: output side of global and local views, in pixels.
        n_local: local views per sample.
        global_scale, local_scale: range of the crop area as a fraction of the tile area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        vflip_p: probability of a vertical flip. Remote-sensing tiles have no canonical "up",
            so vertical flips are valid here; the default 0.0 keeps the authors' recipe
            (horizontal flips only). Horizontal flips always have probability 0.5.
        optical_aug: photometric augmentation of the optical channels (the ablation row
            "+ optical augmentation"). Off, records are sampled with every photometric op off but
            from the same random draws, so crops and flips of a seed are the same either way.
        partners: whether the optical channels come from the aerial partner where a sample has
            one (``train.ablation.hr_optical``); it selects the optical statistics too.
        band_stats: the stats stage's statistics (``model_input.normalisation``); needed to
            render views, not to sample them.
        normalisation: ``data`` (``band_stats``) or ``authors`` (the authors' fixed constants,
            ``model_input.AUTHORS_MEAN``; ``band_stats`` is then only a go-ahead to render).
        interpolation: ``bicubic`` (the authors' ``RandomResizedCrop``: antialiased, Keys
            a = -0.5 as PIL and torch's ``antialias=True``) or ``bilinear`` (antialiased).
        blur_kernel: taps per axis of the Gaussian blur (odd).
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
        partners: bool = True,
        band_stats: Mapping[str, Mapping[str, float]] | None = None,
        interpolation: Interpolation = "bicubic",
        blur_kernel: int = BLUR_KERNEL,
        normalisation: str = "data",
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
        smallest = min(global_size, local_size if n_local else global_size)
        if optical_aug and blur_kernel // 2 >= smallest:
            raise ValueError(
                f"a {blur_kernel}-tap blur needs views larger than {blur_kernel // 2} px "
                f"(reflect padding), got {smallest} px"
            )
        if interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}: {interpolation!r}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale, self.ratio = global_scale, local_scale, ratio
        self.vflip_p, self.optical_aug, self.blur_kernel = vflip_p, optical_aug, blur_kernel
        self.partners, self.interpolation = partners, interpolation
        self.normalisation = normalisation
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        if band_stats is not None:
            mean, std = channel_statistics(band_stats, partners, source=self.normalisation)
            self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
            self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    @classmethod
    def for_training(
        cls, cfg: TrainConfig, band_stats: Mapping[str, Mapping[str, float]] | None = None
    ) -> MultiCrop:
        """The views a training run with ``cfg`` draws: the loop, ``deo views`` and the teacher
        cache (which must draw the same global views) all build it here."""
        crops = cfg.crops
        return cls(
            global_size=crops.global_size,
            local_size=crops.local_size,
            n_local=crops.n_local,
            global_scale=crops.global_scale,
            local_scale=crops.local_scale,
            optical_aug=cfg.ablation.optical_aug,
            partners=cfg.ablation.hr_optical,
            band_stats=band_stats,
            interpolation=crops.interpolation,
            normalisation=crops.normalisation,
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
        t_lo, t_hi = SOLARIZE_THRESHOLD
        a_lo, a_hi = SOLARIZE_ADDITION
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
            solarize_threshold=(t_lo + (t_hi - t_lo) * u[:, _SOL_THRESHOLD]).float(),
            solarize_addition=(a_lo + (a_hi - a_lo) * u[:, _SOL_ADDITION]).float(),
        )

    # ---- rendering ------------------------------------------------------------------------

    def apply(
        self,
        ms: Tensor,
        rgb: Tensor | None,
        has_rgb: Tensor | None,
        params: ViewParams,
        size: int,
    ) -> Tensor:
        """One view of the batch: the normalised model input ``(B, 10, size, size)`` float32.

        ``ms`` is raw Sentinel-2 DN ``(B, 10, T, T)``, ``rgb`` the raw partners ``(B, 3, R, R)``
        (or None), ``has_rgb`` ``(B,)`` which samples have one (None: none has). A pure
        function of its arguments: the same record gives the same pixels, bit for bit.
        """
        if len(params) != ms.shape[0]:
            raise ValueError(f"{len(params)} view records for a batch of {ms.shape[0]}")
        return self._render(ms, rgb, has_rgb, params, size, torch.arange(ms.shape[0]))

    def whole(self, ms: Tensor, rgb: Tensor | None, has_rgb: Tensor | None, size: int) -> Tensor:
        """The whole tile resampled to ``size``, unflipped and without colour augmentation."""
        b, tile = ms.shape[0], ms.shape[-1]
        params = self.sample_global(b, tile, 0, torch.Generator()).geometric_only()
        params.box = torch.tensor([[0.0, 0.0, tile, tile]]).expand(b, 4).clone()
        params.hflip = params.vflip = torch.zeros(b, dtype=torch.bool)
        return self.apply(ms, rgb, has_rgb, params, size)

    def __call__(
        self,
        ms: Tensor,
        rgb: Tensor | None,
        has_rgb: Tensor | None,
        generator: torch.Generator,
        global_params: list[ViewParams] | None = None,
    ) -> MultiCropBatch:
        """All views of a batch; ``global_params`` replays cached global views, locals are fresh.

        Fresh global records are drawn even when replaying, so a seed yields the same local views
        in a cached run as in an online one.
        """
        b, tile = _check_batch(ms, rgb, has_rgb)
        fresh = [self.sample_global(b, tile, v, generator) for v in range(N_GLOBAL)]
        local = [self.sample_local(b, tile, generator) for _ in range(self.n_local)]
        if global_params is None:
            global_params = fresh
        elif len(global_params) != N_GLOBAL or any(len(p) != b for p in global_params):
            raise ValueError(f"global_params must be {N_GLOBAL} records of {b} samples each")
        g_ms = self._render_views(ms, rgb, has_rgb, global_params, self.global_size)
        l_ms = self._render_views(ms, rgb, has_rgb, local, self.local_size)
        return MultiCropBatch(
            g_ms, [v[:, :3] for v in g_ms], l_ms, [v[:, :3] for v in l_ms], list(global_params)
        )

    def _render_views(
        self,
        ms: Tensor,
        rgb: Tensor | None,
        has_rgb: Tensor | None,
        records: list[ViewParams],
        size: int,
    ) -> list[Tensor]:
        """Views of one size rendered as one batch of ``len(records) * B`` crops (fewer kernels);
        bit-equal to rendering them one by one, as rendering is per-sample independent."""
        if not records:
            return []
        b = ms.shape[0]
        image = torch.arange(b).repeat(len(records))
        return list(self._render(ms, rgb, has_rgb, ViewParams.cat(records), size, image).split(b))

    def _render(
        self,
        ms: Tensor,
        rgb: Tensor | None,
        has_rgb: Tensor | None,
        params: ViewParams,
        size: int,
        image: Tensor,
    ) -> Tensor:
        """The view ``params.box[k]`` of sample ``image[k]`` for every record ``k``."""
        _, tile = _check_batch(ms, rgb, has_rgb)
        if self.mean is None or self.std is None:
            raise ValueError(
                "MultiCrop has no band statistics to normalise the views with: pass "
                "band_stats (the stats stage's, e.g. deo.data.stats.read_stats(store))"
            )
        p = params.to("cpu")
        if p.box.numel() and p.box[:, 2:].max() > tile * (1 + 1e-6):
            raise ValueError(
                f"view boxes reach past the {tile}-pixel tile: sampled for another size?"
            )
        filt = _FILTERS[self.interpolation]
        s2 = _resample(ms.float(), image, p, size, filt, 1.0)
        optical = s2[:, list(S2_OPTICAL)]
        if rgb is not None and has_rgb is not None:
            rows = torch.nonzero(has_rgb.cpu()[image])[:, 0]
            if rows.numel():
                sub = p.index(rows)
                aerial = _resample(rgb.float(), image[rows], sub, size, filt, rgb.shape[-1] / tile)
                optical[rows.to(optical.device)] = aerial
        optical = max_scale(optical)
        optical = self._photometric(optical, p)
        view = torch.cat([optical, s2[:, list(MS_ONLY)]], dim=1)
        return view.sub_(self.mean.to(view.device)).div_(self.std.to(view.device))

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


def max_scale(optical: Tensor) -> Tensor:
    """The authors' per-crop scaling: each view's optical channels divided by their maximum
    (over channels and pixels, when above ``MAX_EPS``), then clipped to [0, 1] (in place)."""
    peak = optical.amax(dim=(1, 2, 3), keepdim=True)
    scaled = torch.where(peak > MAX_EPS, optical / peak, optical)
    return scaled.clamp_(0.0, 1.0)


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
    range (torchvision's rule). Corners are not rounded to pixels (torchvision rounds them to
    the one image grid it has; here one box cuts two grids, Sentinel-2's and the partner's).
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


# ---- resampling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Filter:
    """A resampling kernel: ``fn(x)`` on float64 offsets in input pixels, zero past ``support``."""

    fn: Callable[[Tensor], Tensor]
    support: float


def _bicubic(x: Tensor) -> Tensor:
    """Keys' cubic with a = -0.5: PIL's and torch's antialiased bicubic (``aa_filter``)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _triangle(x: Tensor) -> Tensor:
    return (1 - x.abs()).clamp(min=0)


_FILTERS: dict[str, _Filter] = {
    "bicubic": _Filter(_bicubic, 2.0),
    "bilinear": _Filter(_triangle, 1.0),
}


def _taps(lo: Tensor, hi: Tensor, size: int, extent: int, filt: _Filter) -> tuple[Tensor, Tensor]:
    """Weights float32 and source indices int64, ``(K, size, n)``, of resampling ``[lo, hi)``.

    torch's ``interpolate(..., antialias=True, align_corners=False)`` (PIL's resampling) of the
    box taken as the image: output pixel ``i`` is centred at ``lo + (i + 0.5) * scale`` with
    ``scale = (hi - lo) / size``, the kernel is stretched by ``max(scale, 1)``, and it is cut
    to the pixels the box touches (then renormalised), as cropping first would. For an integer
    box this equals cropping then resizing; taps past a sample's own count have weight 0.
    """
    lo, hi = lo.double(), hi.double()
    scale = (hi - lo) / size
    stretch = scale.clamp(min=1.0)
    support = filt.support * stretch
    center = lo[:, None] + (torch.arange(size, dtype=torch.float64) + 0.5) * scale[:, None]
    first = lo.floor().clamp(min=0)[:, None]
    stop = hi.ceil().clamp(max=extent)[:, None]
    start = torch.maximum((center - support[:, None] + 0.5).floor(), first)
    end = torch.minimum((center + support[:, None] + 0.5).floor(), stop)
    n = max(int((end - start).max().item()), 1)
    index = start[..., None] + torch.arange(n, dtype=torch.float64)
    valid = index < end[..., None]
    weight = torch.where(
        valid, filt.fn((index - center[..., None] + 0.5) / stretch[:, None, None]), 0.0
    )
    total = weight[..., 0].clone()
    for t in range(1, n):  # a fixed order: zero-weight padding taps leave the sum unchanged
        total += weight[..., t]
    weight = weight / torch.where(total != 0, total, 1.0)[..., None]
    index = torch.where(valid, index, start[..., None]).long()
    return weight.float(), index


def _resample(
    x: Tensor, image: Tensor, p: ViewParams, size: int, filt: _Filter, spatial_scale: float
) -> Tensor:
    """``(K, C, size, size)``: the box of record ``k`` (scaled by ``spatial_scale``) of
    ``x[image[k]]``, resampled separably (rows, then columns), flipped as the record says.

    A flip reverses the tap tables along the output axis, so the flipped view is computed with
    exactly the arithmetic of the unflipped one.
    """
    box = p.box.double() * spatial_scale
    height, width = x.shape[-2:]
    wy, iy = _taps(box[:, 1], box[:, 3], size, height, filt)
    wx, ix = _taps(box[:, 0], box[:, 2], size, width, filt)
    wy, iy = _flip_rows(wy, iy, p.vflip)
    wx, ix = _flip_rows(wx, ix, p.hflip)
    k, channels = len(image), x.shape[1]
    out = torch.empty(k, channels, size, size, dtype=x.dtype, device=x.device)
    budget = _CPU_CHUNK_BYTES if x.device.type == "cpu" else _DEVICE_CHUNK_BYTES
    per_record = channels * size * max(width, size) * x.element_size()
    step = max(1, budget // per_record)
    flat = x.reshape(-1, width)
    for start in range(0, k, step):
        rows = slice(start, start + step)
        out[rows] = _resample_chunk(
            flat, image[rows], (wy[rows], iy[rows]), (wx[rows], ix[rows]), channels, height
        )
    return out


def _flip_rows(weight: Tensor, index: Tensor, flip: Tensor) -> tuple[Tensor, Tensor]:
    """Tap tables with the output axis reversed for the flipped records."""
    mask = flip[:, None, None]
    return torch.where(mask, weight.flip(1), weight), torch.where(mask, index.flip(1), index)


def _resample_chunk(
    flat: Tensor,
    image: Tensor,
    rows: tuple[Tensor, Tensor],
    cols: tuple[Tensor, Tensor],
    channels: int,
    height: int,
) -> Tensor:
    """One chunk of ``_resample``: ``flat`` is the input as ``(B * C * H, W)`` rows."""
    device = flat.device
    (wy, iy), (wx, ix) = rows, cols
    k, size = wy.shape[:2]
    width = flat.shape[1]
    plane = (image[:, None] * channels + torch.arange(channels)[None]) * height  # (k, C)
    vertical = _tap_sum(flat, plane[:, :, None, None] + iy[:, None], wy, device)  # (k,C,s,W)
    across = vertical.transpose(-1, -2).reshape(-1, size)  # (k*C*W, s): columns as rows
    base = (torch.arange(k)[:, None] * channels + torch.arange(channels)[None]) * width
    horizontal = _tap_sum(across, base[:, :, None, None] + ix[:, None], wx, device)  # (k,C,s,s)
    return horizontal.transpose(-1, -2)


def _tap_sum(rows: Tensor, index: Tensor, weight: Tensor, device: torch.device) -> Tensor:
    """``sum_t weight[k, i, t] * rows[index[k, c, i, t]]`` as ``(k, C, size, row length)``:
    one gather, multiply and add per tap, in tap order."""
    k, channels, size, n = index.shape
    index = index.to(device)
    weight = weight.to(device)[:, None, :, :, None]  # (k, 1, size, n, 1)
    acc: Tensor | None = None
    for t in range(n):
        picked = rows.index_select(0, index[..., t].reshape(-1)).view(k, channels, size, -1)
        term = picked.mul_(weight[:, :, :, t])
        acc = term if acc is None else acc.add_(term)
    assert acc is not None
    return acc


# ---- rendering helpers -----------------------------------------------------------------------


def _check_batch(ms: Tensor, rgb: Tensor | None, has_rgb: Tensor | None) -> tuple[int, int]:
    """Batch size and tile side of a square ``(B, 10, T, T)`` batch (and a matching partner)."""
    if ms.ndim != 4 or ms.shape[1] != len(MS_BANDS) or ms.shape[-1] != ms.shape[-2]:
        raise ValueError(f"ms must be (B, {len(MS_BANDS)}, T, T), got {tuple(ms.shape)}")
    if rgb is not None and (
        rgb.ndim != 4 or rgb.shape[:2] != (ms.shape[0], 3) or rgb.shape[-1] != rgb.shape[-2]
    ):
        raise ValueError(f"rgb must be (B, 3, R, R) beside ms {tuple(ms.shape)}, got {rgb.shape}")
    if rgb is not None and rgb.device != ms.device:
        raise ValueError(f"ms is on {ms.device} but rgb on {rgb.device}")
    if has_rgb is not None and (has_rgb.shape != (ms.shape[0],) or has_rgb.dtype != torch.bool):
        raise ValueError(
            f"has_rgb must be bool ({ms.shape[0]},), got {has_rgb.dtype} {has_rgb.shape}"
        )
    if has_rgb is not None and rgb is None and bool(has_rgb.any()):
        raise ValueError("has_rgb marks partners, but no rgb was given")
    return ms.shape[0], ms.shape[-1]


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
        threshold = p.solarize_threshold[p.solarize].to(rgb.device)
        addition = p.solarize_addition[p.solarize].to(rgb.device)
        rgb[rows] = solarize(rgb[rows], threshold, addition)


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


def solarize(rgb: Tensor, threshold: Tensor, addition: Tensor) -> Tensor:
    """kornia's solarize with per-sample ``threshold`` and ``addition`` ``(B,)``: add, clip to
    [0, 1], then invert the pixels at or above the threshold (``x >= t -> 1 - x``)."""
    x = (rgb + addition[:, None, None, None]).clamp(0.0, 1.0)
    return torch.where(x >= threshold[:, None, None, None], 1.0 - x, x)
