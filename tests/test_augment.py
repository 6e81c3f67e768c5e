"""Multi-crop of the model's input: composition, exact replay, shared geometry across
resolutions, the authors' resampling and colour ops, and the sampled distributions."""

from __future__ import annotations

import math

import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from deo.cache.spec import GlobalViews
from deo.data.augment import (
    GLOBAL_BLUR_P,
    GLOBAL_SOLARIZE_P,
    GRAY_P,
    JITTER_P,
    LOCAL_BLUR_P,
    MultiCrop,
    ViewParams,
    solarize,
)
from deo.data.bands import MS_BANDS
from deo.data.model_input import MODEL_BANDS, OPTICAL, OPTICAL_S2

T, R = 32, 80  # Sentinel-2 tile and aerial partner sides (R / T = 2.5)
STATS = {b: {"mean": 1000.0 + 50 * i, "std": 300.0 + 10 * i} for i, b in enumerate(MS_BANDS)}
STATS |= {k: {"mean": 0.4 + 0.01 * i, "std": 0.25 + 0.01 * i} for i, k in enumerate(OPTICAL)}
STATS |= {k: {"mean": 0.5 + 0.01 * i, "std": 0.2 + 0.01 * i} for i, k in enumerate(OPTICAL_S2)}
SMALL = {"global_size": 40, "local_size": 16, "n_local": 3}
MEAN = torch.tensor([STATS[k]["mean"] for k in OPTICAL + MODEL_BANDS[3:]])[:, None, None]
STD = torch.tensor([STATS[k]["std"] for k in OPTICAL + MODEL_BANDS[3:]])[:, None, None]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw uint16 DN, uint8 partners at R, and partner flags (every third sample has none)."""
    g = gen(seed)
    ms = torch.randint(200, 5000, (b, len(MS_BANDS), T, T), generator=g).to(torch.uint16)
    rgb = torch.randint(0, 256, (b, 3, R, R), generator=g).to(torch.uint8)
    has = torch.arange(b) % 3 != 2
    rgb[~has] = 0
    return ms, rgb, has


def unnormalise(view: torch.Tensor) -> torch.Tensor:
    return view * STD + MEAN


def with_fields(p: ViewParams, **values: object) -> ViewParams:
    """A copy of ``p`` with some fields set to one value (broadcast to every sample)."""
    d = p.to_dict()
    for name, value in values.items():
        d[name] = torch.as_tensor(value, dtype=d[name].dtype).expand_as(d[name]).clone()
    return ViewParams.from_dict(d)


def plain(mc: MultiCrop, b: int, box: list[float], hflip: bool = False) -> ViewParams:
    """A record of ``b`` samples with this box and flip and no photometric op."""
    p = mc.sample_global(b, T, 0, gen(99)).geometric_only()
    return with_fields(p, box=box, hflip=hflip, vflip=False)


# ---- the hand-built view --------------------------------------------------------------------


def bicubic_aa_1d(n_in: int, n_out: int) -> np.ndarray:
    """PIL's antialiased bicubic resampling matrix ``(n_out, n_in)``, written out with loops."""

    def keys(x: float) -> float:
        a, x = -0.5, abs(x)
        if x < 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    scale = n_in / n_out
    stretch = max(scale, 1.0)
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(math.floor(center - 2 * stretch + 0.5), 0)
        hi = min(math.floor(center + 2 * stretch + 0.5), n_in)
        for j in range(lo, hi):
            matrix[i, j] = keys((j - center + 0.5) / stretch)
        matrix[i] /= matrix[i].sum()
    return matrix


def hand_view(s2, rgb, has, box, size, hflip) -> np.ndarray:
    """The authors' view of one sample in numpy: crop the integer box (scaled by R / T for the
    partner), resize by antialiased bicubic, flip, take the optical channels from the partner if
    there is one, divide them by their maximum, clip, then normalise the 10 channels."""
    x0, y0, x1, y1 = box
    k = rgb.shape[-1] // s2.shape[-1]  # an integer ratio keeps the partner's box integer

    def crop(image, a, b, c, d):
        region = image[:, b:d, a:c].astype(np.float64)
        rows, cols = bicubic_aa_1d(d - b, size), bicubic_aa_1d(c - a, size)
        return np.einsum("ij,cjk,lk->cil", rows, region, cols)

    bands = crop(s2, x0, y0, x1, y1)
    if has:
        optical = crop(rgb, int(x0 * k), int(y0 * k), int(x1 * k), int(y1 * k))
    else:
        optical = bands[[MS_BANDS.index("B04"), MS_BANDS.index("B03"), MS_BANDS.index("B02")]]
    optical = np.clip(optical / optical.max(), 0, 1)
    view = np.concatenate([optical, bands[[MS_BANDS.index(b) for b in MODEL_BANDS[3:]]]])
    if hflip:
        view = view[:, :, ::-1]
    return (view - MEAN.numpy()) / STD.numpy()


@pytest.mark.parametrize("hflip", [False, True])
def test_a_view_equals_the_hand_built_view(hflip: bool) -> None:
    ms, rgb, has = make_batch(3)
    rgb = torch.randint(0, 256, (3, 3, 2 * T, 2 * T), generator=gen(5)).to(torch.uint8)
    mc = MultiCrop(band_stats=STATS)
    view = mc.apply(ms, rgb, has, plain(mc, 3, [4.0, 6.0, 26.0, 30.0], hflip), 20)
    for i in range(3):
        want = hand_view(ms[i].numpy(), rgb[i].numpy(), bool(has[i]), [4, 6, 26, 30], 20, hflip)
        np.testing.assert_allclose(view[i].numpy(), want, rtol=0, atol=2e-4)


def test_authors_normalisation_switch_uses_their_constants_on_the_same_pixels() -> None:
    ms, rgb, has = make_batch(3)
    ours = MultiCrop(band_stats=STATS)
    theirs = MultiCrop(band_stats=STATS, normalisation="authors")
    params = plain(ours, 3, [4.0, 6.0, 26.0, 30.0], False)
    view = ours.apply(ms, rgb, has, params, 20)
    authors = theirs.apply(ms, rgb, has, params, 20)
    # normalize_hr as written in DEO/utils/augmentations.py (torchgeo's _deo_transforms)
    mean = torch.tensor([0.4182007312774658, 0.4214799106121063, 0.3991275727748871, 1263.73947144])
    std = torch.tensor([0.28774282336235046, 0.27541765570640564, 0.2764017581939697, 948.9819932])
    raw = unnormalise(view)[:, :4]
    torch.testing.assert_close(authors[:, :4], (raw - mean[:, None, None]) / std[:, None, None])
    assert GlobalViews.of(theirs).normalisation == "authors"
    with pytest.raises(ValueError, match="'data' or 'authors'"):
        MultiCrop(band_stats=STATS, normalisation="imagenet")


def test_resampling_is_the_authors_random_resized_crop() -> None:
    """For an integer box, torchvision's ``resized_crop`` (bicubic, antialias: the authors'
    ``RandomResizedCrop``) of the S2 bands and the partner gives the same views."""
    ms, rgb, has = make_batch(4)
    mc = MultiCrop(band_stats=STATS)
    box, size = [5.0, 10.0, 25.0, 30.0], 24  # partner box: 12.5 .. 62.5 -> not integer at 2.5x
    view = unnormalise(mc.apply(ms, rgb, has, plain(mc, 4, box, False), size))
    theirs = TF.resized_crop(ms.float(), 10, 5, 20, 20, [size, size], InterpolationMode.BICUBIC)
    bands = [MS_BANDS.index(b) for b in MODEL_BANDS[3:]]
    torch.testing.assert_close(view[:, 3:], theirs[:, bands], rtol=1e-5, atol=0.05)
    s2_rgb = theirs[~has][:, [MS_BANDS.index(b) for b in ("B04", "B03", "B02")]]
    peak = s2_rgb.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(view[~has, :3], (s2_rgb / peak).clamp(0, 1), rtol=0, atol=1e-5)


def test_bilinear_switch_is_antialiased_bilinear() -> None:
    ms, rgb, has = make_batch(2)
    mc = MultiCrop(band_stats=STATS, interpolation="bilinear")
    view = unnormalise(mc.apply(ms, rgb, has, plain(mc, 2, [0.0, 0.0, T, T]), 20))
    ref = F.interpolate(ms.float(), size=(20, 20), mode="bilinear", antialias=True)
    torch.testing.assert_close(view[:, 3:], ref[:, 3:], rtol=1e-5, atol=0.05)


# ---- composition ----------------------------------------------------------------------------


def test_optical_channels_are_the_partner_or_sentinel_rgb_never_black() -> None:
    ms, rgb, has = make_batch(6)
    mc = MultiCrop(**SMALL, band_stats=STATS, optical_aug=False)
    out = mc(ms, rgb, has, gen(1))
    views = zip(out.global_ms + out.local_ms, out.global_rgb + out.local_rgb, strict=True)
    for view, optical in views:
        assert torch.equal(view[:, :3], optical)  # the RGB path's input is channels 0-2
        raw = unnormalise(view)[:, :3]
        peak = raw.amax(dim=(1, 2, 3))
        torch.testing.assert_close(peak, torch.ones_like(peak))  # scaled by the view's max
        assert (raw.flatten(1).std(dim=1) > 0.05).all()  # not a black (or flat) image
    box = [8.0, 8.0, 24.0, 24.0]  # at its own size a slice of the tile; 40 -> 16 px of the partner
    view = unnormalise(mc.apply(ms, rgb, has, plain(mc, 6, box), 16))[:, :3]
    s2_rgb = ms[:, [MS_BANDS.index(b) for b in ("B04", "B03", "B02")], 8:24, 8:24].float()
    s2_rgb = s2_rgb / s2_rgb.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(view[~has], s2_rgb[~has], rtol=0, atol=1e-5)
    aerial = TF.resized_crop(rgb.float(), 20, 20, 40, 40, [16, 16], InterpolationMode.BICUBIC)
    aerial = (aerial / aerial.amax(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    torch.testing.assert_close(view[has], aerial[has], rtol=0, atol=1e-5)


def test_runs_without_partners_use_sentinel_rgb_and_its_statistics() -> None:
    ms, _, _ = make_batch(3)
    mc = MultiCrop(band_stats=STATS, partners=False)
    view = mc.apply(ms, None, None, plain(mc, 3, [0.0, 0.0, T, T]), T)
    s2_rgb = ms[:, [MS_BANDS.index(b) for b in ("B04", "B03", "B02")]].float()
    s2_rgb = s2_rgb / s2_rgb.amax(dim=(1, 2, 3), keepdim=True)
    mean = torch.tensor([STATS[k]["mean"] for k in OPTICAL_S2])[:, None, None]
    std = torch.tensor([STATS[k]["std"] for k in OPTICAL_S2])[:, None, None]
    torch.testing.assert_close(view[:, :3], (s2_rgb - mean) / std, rtol=0, atol=1e-5)


def test_photometric_ops_touch_only_the_optical_channels() -> None:
    ms, rgb, has = make_batch(8)
    mc = MultiCrop(**SMALL, band_stats=STATS)
    params = mc.sample_global(8, T, 0, gen(7))
    view = mc.apply(ms, rgb, has, params, 24)
    geometric = mc.apply(ms, rgb, has, params.geometric_only(), 24)
    assert torch.equal(view[:, 3:], geometric[:, 3:])
    assert not torch.allclose(view[:, :3], geometric[:, :3])  # view 0 always blurs


# ---- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_global_views_replay_exactly(interpolation: str) -> None:
    ms, rgb, has = make_batch(7)
    mc = MultiCrop(**SMALL, vflip_p=0.5, band_stats=STATS, interpolation=interpolation)
    out = mc(ms, rgb, has, gen(2))
    for v, params in enumerate(out.global_params):
        rebuilt = ViewParams.from_dict(params.to_dict())
        assert torch.equal(mc.apply(ms, rgb, has, rebuilt, SMALL["global_size"]), out.global_ms[v])
        for idx in ([4], [6, 0, 3], list(range(6, -1, -1))):
            sub = ViewParams.from_dict(params.index(idx).to_dict())
            view = mc.apply(ms[idx], rgb[idx], has[idx], sub, SMALL["global_size"])
            assert torch.equal(view, out.global_ms[v][idx])


def test_replayed_globals_and_fresh_locals() -> None:
    """Replaying cached globals gives the cached views; locals match an online run's."""
    ms, rgb, has = make_batch(5)
    mc = MultiCrop(**SMALL, band_stats=STATS)
    cached = mc(ms, rgb, has, gen(3))
    per_sample = [p.index(i) for p in cached.global_params for i in range(5)]
    records = [ViewParams.cat(per_sample[v * 5 : (v + 1) * 5]) for v in range(2)]
    replay = mc(ms, rgb, has, gen(3), global_params=records)
    for a, b in zip(cached.global_ms, replay.global_ms, strict=True):
        assert torch.equal(a, b)
    other = mc(ms, rgb, has, gen(4), global_params=records)
    assert torch.equal(other.global_ms[0], cached.global_ms[0])
    assert not torch.equal(other.local_ms[0], cached.local_ms[0])
    for a, b in zip(cached.local_ms, replay.local_ms, strict=True):
        assert torch.equal(a, b)


def test_one_box_cuts_both_resolutions() -> None:
    """The box in S2 pixels, scaled by R / T, is the partner's crop (flipped alike)."""
    ms, _, _ = make_batch(4)
    partner = torch.rand(4, 3, 2 * T, 2 * T, generator=gen(8)) * 255
    mc = MultiCrop(band_stats=STATS, optical_aug=False)
    both = torch.ones(4, dtype=torch.bool)
    view = mc.apply(ms, partner, both, plain(mc, 4, [3.0, 5.0, 15.0, 17.0], True), 12)
    crop = TF.resized_crop(partner, 10, 6, 24, 24, [12, 12], InterpolationMode.BICUBIC).flip(-1)
    crop = (crop / crop.amax(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    torch.testing.assert_close(unnormalise(view)[:, :3], crop, rtol=0, atol=1e-5)
    s2 = ms[:, 3:, 5:17, 3:15].float().flip(-1)  # at its own size an integer box is a slice
    torch.testing.assert_close(unnormalise(view)[:, 3:], s2, rtol=1e-6, atol=1e-3)


# ---- crop boxes -----------------------------------------------------------------------------


@pytest.mark.parametrize("local", [False, True])
def test_box_and_flag_statistics(local: bool) -> None:
    n, tile = 20000, 96
    mc = MultiCrop(vflip_p=0.25)
    p = mc.sample_local(n, tile, gen(14)) if local else mc.sample_global(n, tile, 1, gen(14))
    lo, hi = mc.local_scale if local else mc.global_scale
    x0, y0, x1, y1 = p.box.double().unbind(1)
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= tile).all() and (y1 <= tile).all()
    area = w * h / tile**2
    assert area.min() >= lo - 1e-5 and area.max() <= hi + 1e-5
    aspect = w / h
    assert aspect.min() >= 3 / 4 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    # log-uniform aspect: its log has mean 0 and spans the range
    assert abs(aspect.log().mean().item()) < 0.01
    assert aspect.log().std().item() > 0.8 * math.log(4 / 3) / math.sqrt(3)

    def rate(flag: torch.Tensor) -> float:
        return flag.double().mean().item()

    assert abs(rate(p.hflip) - 0.5) < 0.02
    assert abs(rate(p.vflip) - 0.25) < 0.02
    assert abs(rate(p.jitter_on) - JITTER_P) < 0.02
    assert abs(rate(p.gray) - GRAY_P) < 0.02
    assert abs(rate(p.blur_sigma > 0) - (LOCAL_BLUR_P if local else GLOBAL_BLUR_P[1])) < 0.02
    assert abs(rate(p.solarize) - (0.0 if local else GLOBAL_SOLARIZE_P[1])) < 0.02
    assert sorted(p.jitter_order[0].tolist()) == [0, 1, 2, 3]
    # kornia's RandomSolarize(thresholds=0.5): threshold ~ U(0, 1), addition ~ U(-0.1, 0.1)
    t, a = p.solarize_threshold.double(), p.solarize_addition.double()
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.01
    assert a.min() >= -0.1 and a.max() <= 0.1 and abs(a.mean().item()) < 0.002


def test_view_specific_probabilities() -> None:
    mc = MultiCrop()
    first = mc.sample_global(500, T, 0, gen(15))
    assert (first.blur_sigma > 0).all() and not first.solarize.any()
    assert not mc.sample_global(500, T, 0, gen(15)).vflip.any()  # vflip_p defaults to 0


# ---- determinism ----------------------------------------------------------------------------


def test_generator_determinism_and_global_rng_untouched() -> None:
    ms, rgb, has = make_batch(4)
    mc = MultiCrop(**SMALL, band_stats=STATS)
    state = torch.get_rng_state()
    a, b, c = (mc(ms, rgb, has, gen(s)) for s in (16, 16, 17))
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a.global_ms + a.local_ms, b.global_ms + b.local_ms, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.global_ms[0], c.global_ms[0])
    assert not torch.equal(a.local_rgb[0], c.local_rgb[0])


def test_optical_aug_off_keeps_geometry_and_drops_photometry() -> None:
    on, off = MultiCrop(), MultiCrop(optical_aug=False)
    p_on, p_off = on.sample_global(64, T, 0, gen(18)), off.sample_global(64, T, 0, gen(18))
    for name in ("box", "hflip", "vflip"):
        assert torch.equal(getattr(p_on, name), getattr(p_off, name))
    assert not (p_off.jitter_on.any() or p_off.gray.any() or p_off.solarize.any())
    assert not (p_off.blur_sigma > 0).any()


def test_cuda_generator_is_refused() -> None:
    class FakeGen:
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="CPU"):
        MultiCrop().sample_local(2, T, FakeGen())  # type: ignore[arg-type]


# ---- shapes and individual ops ---------------------------------------------------------------


def test_shapes_and_dtypes() -> None:
    ms, rgb, has = make_batch(3)
    mc = MultiCrop(**SMALL, band_stats=STATS)
    out = mc(ms, rgb, has, gen(19))
    assert len(out.global_ms) == len(out.global_rgb) == len(out.global_params) == 2
    assert len(out.local_ms) == len(out.local_rgb) == SMALL["n_local"]
    assert all(x.shape == (3, 10, 40, 40) and x.dtype == torch.float32 for x in out.global_ms)
    assert all(x.shape == (3, 3, 40, 40) for x in out.global_rgb)
    assert all(x.shape == (3, 10, 16, 16) for x in out.local_ms)
    assert all(x.shape == (3, 3, 16, 16) for x in out.local_rgb)
    none = MultiCrop(n_local=0, global_size=16, band_stats=STATS)(ms, None, None, gen(0))
    assert none.local_ms == [] and none.local_rgb == []


def test_bad_inputs_are_refused() -> None:
    ms, rgb, has = make_batch(2)
    with pytest.raises(ValueError, match="band statistics"):
        MultiCrop(**SMALL)(ms, rgb, has, gen(0))
    with pytest.raises(ValueError, match="no rgb"):
        MultiCrop(**SMALL, band_stats=STATS)(ms, None, has, gen(0))
    with pytest.raises(ValueError, match="blur"):
        MultiCrop(global_size=32, local_size=8)


def test_grayscale_makes_optical_channels_equal() -> None:
    ms, rgb, has = make_batch(4)
    mc = MultiCrop(band_stats=STATS)
    p = with_fields(mc.sample_global(4, T, 1, gen(20)).geometric_only(), gray=True)
    raw = unnormalise(mc.apply(ms, rgb, has, p, 24))
    torch.testing.assert_close(raw[:, 0], raw[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(raw[:, 1], raw[:, 2], rtol=0, atol=1e-6)


def test_solarize_is_kornias() -> None:
    x = torch.rand(4, 3, 8, 8, generator=gen(21))
    threshold, addition = torch.tensor([0.0, 0.3, 0.7, 1.0]), torch.tensor([0.1, -0.05, 0.0, 0.1])
    ref = kornia.enhance.solarize(x, threshold, addition)
    torch.testing.assert_close(solarize(x, threshold, addition), ref, rtol=0, atol=1e-7)
    hand = (x + addition[:, None, None, None]).clamp(0, 1)
    hand = torch.where(hand >= threshold[:, None, None, None], 1 - hand, hand)
    assert torch.equal(solarize(x, threshold, addition), hand)


def test_jitter_and_blur_follow_the_authors_ops() -> None:
    """ColorJitter's formulas (torchvision) and the 23-tap Gaussian blur (kornia's, reflect)."""
    ms, _, _ = make_batch(1)
    partner = torch.rand(1, 3, T, T, generator=gen(23)) * 200 + 20
    one = torch.ones(1, dtype=torch.bool)
    mc = MultiCrop(band_stats=STATS)
    p = plain(mc, 1, [0.0, 0.0, T, T])
    p = with_fields(p, jitter_on=True, jitter=[1.3, 0.7, 1.15, 0.07])
    p.jitter_order = torch.tensor([[2, 0, 3, 1]])
    got = unnormalise(mc.apply(ms, partner, one, p, T))[:, :3]
    rgb = partner / partner.amax()
    ref = TF.adjust_saturation(rgb, 1.15)
    ref = TF.adjust_brightness(ref, 1.3)
    ref = TF.adjust_hue(ref, 0.07)
    ref = TF.adjust_contrast(ref, 0.7)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)

    blur = with_fields(p, jitter_on=False, blur_sigma=1.3)
    got = unnormalise(mc.apply(ms, partner, one, blur, T))[:, :3]
    ref = kornia.filters.gaussian_blur2d(rgb, (23, 23), (1.3, 1.3), border_type="reflect")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
