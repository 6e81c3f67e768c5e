"""Batched multi-crop: exact replay, shared MS/RGB geometry, and the sampled distributions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

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
from deo.data.bands import MS_BANDS, RGB_BANDS, ms_index

T = 32
STATS = {b: {"mean": 1000.0 + 50 * i, "std": 300.0 + 10 * i} for i, b in enumerate(MS_BANDS)}
SMALL = {"global_size": 40, "local_size": 16, "n_local": 3}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_ms(b: int = 6, seed: int = 0) -> torch.Tensor:
    """Normalised MS whose RGB bands stay inside the rgb_scale range (so no clipping)."""
    g = gen(seed)
    dn = 300 + 2400 * torch.rand(b, len(MS_BANDS), T, T, generator=g)
    mean = torch.tensor([STATS[n]["mean"] for n in MS_BANDS])[:, None, None]
    std = torch.tensor([STATS[n]["std"] for n in MS_BANDS])[:, None, None]
    return (dn - mean) / std


def rgb_from_ms(ms: torch.Tensor, rgb_scale: float = 1 / 3000) -> torch.Tensor:
    """The documented derivation, written out independently of the module."""
    idx = [ms_index(b) for b in RGB_BANDS]
    mean = torch.tensor([STATS[b]["mean"] for b in RGB_BANDS])[:, None, None]
    std = torch.tensor([STATS[b]["std"] for b in RGB_BANDS])[:, None, None]
    return ((ms[:, idx] * std + mean) * rgb_scale).clamp(0, 1)


def with_fields(p: ViewParams, **values: object) -> ViewParams:
    """A copy of ``p`` with some fields set to one value (broadcast to every sample)."""
    d = p.to_dict()
    for name, value in values.items():
        d[name] = torch.as_tensor(value, dtype=d[name].dtype).expand_as(d[name]).clone()
    return ViewParams.from_dict(d)


# ---- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("partner", [True, False])
def test_global_views_replay_exactly(partner: bool) -> None:
    ms = make_ms(7)
    rgb = torch.rand(7, 3, T, T, generator=gen(1)) if partner else None
    mc = MultiCrop(**SMALL, vflip_p=0.5, band_stats=STATS)
    out = mc(ms, rgb, gen(2))
    for v, params in enumerate(out.global_params):
        rebuilt = ViewParams.from_dict(params.to_dict())
        ms_v, rgb_v = mc.apply(ms, rgb, rebuilt, SMALL["global_size"])
        assert torch.equal(ms_v, out.global_ms[v])
        assert torch.equal(rgb_v, out.global_rgb[v])
        for idx in ([4], [6, 0, 3], list(range(6, -1, -1))):
            sub = ViewParams.from_dict(params.index(idx).to_dict())
            sub_rgb = None if rgb is None else rgb[idx]
            ms_s, rgb_s = mc.apply(ms[idx], sub_rgb, sub, SMALL["global_size"])
            assert torch.equal(ms_s, out.global_ms[v][idx])
            assert torch.equal(rgb_s, out.global_rgb[v][idx])


def test_replayed_globals_and_fresh_locals() -> None:
    """Replaying cached globals gives the cached views; locals match an online run's."""
    ms = make_ms(5)
    mc = MultiCrop(**SMALL, band_stats=STATS)
    cached = mc(ms, None, gen(3))
    per_sample = [p.index(i) for p in cached.global_params for i in range(5)]
    records = [ViewParams.cat(per_sample[v * 5 : (v + 1) * 5]) for v in range(2)]
    replay = mc(ms, None, gen(3), global_params=records)
    for a, b in zip(
        cached.global_ms + cached.global_rgb, replay.global_ms + replay.global_rgb, strict=True
    ):
        assert torch.equal(a, b)
    other = mc(ms, None, gen(4), global_params=records)
    assert torch.equal(other.global_ms[0], cached.global_ms[0])
    assert not torch.equal(other.local_ms[0], cached.local_ms[0])
    for a, b in zip(cached.local_rgb, replay.local_rgb, strict=True):
        assert torch.equal(a, b)


# ---- shared geometry of MS and RGB ----------------------------------------------------------


def test_rgb_partner_and_derived_rgb_share_geometry() -> None:
    ms = make_ms(6)
    mc = MultiCrop(**SMALL, vflip_p=0.5, optical_aug=False, band_stats=STATS)
    out = mc(ms, rgb_from_ms(ms), gen(5))
    derived = mc(ms, None, gen(5))
    for ms_v, rgb_v, d_rgb in zip(
        out.global_ms + out.local_ms,
        out.global_rgb + out.local_rgb,
        derived.global_rgb + derived.local_rgb,
        strict=True,
    ):
        torch.testing.assert_close(rgb_v, rgb_from_ms(ms_v), atol=1e-5, rtol=0)
        torch.testing.assert_close(rgb_v, d_rgb, atol=1e-5, rtol=0)


def test_photometric_ops_touch_only_rgb() -> None:
    ms, rgb = make_ms(8), torch.rand(8, 3, T, T, generator=gen(6))
    mc = MultiCrop(**SMALL, band_stats=STATS)
    params = mc.sample_global(8, T, 0, gen(7))
    ms_v, rgb_v = mc.apply(ms, rgb, params, 24)
    ms_g, rgb_g = mc.apply(ms, rgb, params.geometric_only(), 24)
    assert torch.equal(ms_v, ms_g)
    assert not torch.allclose(rgb_v, rgb_g)  # view 0 always blurs


def test_partner_of_higher_resolution_uses_scaled_box() -> None:
    ms = make_ms(2)
    rgb = F.interpolate(torch.rand(2, 3, T, T, generator=gen(8)), scale_factor=2, mode="nearest")
    mc = MultiCrop(optical_aug=False)
    p = with_fields(mc.sample_global(2, T, 0, gen(9)), box=[3.0, 5.0, 15.0, 17.0], hflip=False)
    _, rgb_v = mc.apply(ms, rgb, p, 24)
    assert torch.equal(rgb_v, rgb[:, :, 10:34, 6:30])


# ---- crop boxes -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [T, 45])
@pytest.mark.parametrize("hflip", [False, True])
def test_full_tile_box_is_bilinear_resize(size: int, hflip: bool) -> None:
    ms, rgb = make_ms(3), torch.rand(3, 3, T, T, generator=gen(10))
    mc = MultiCrop(optical_aug=False)
    p = with_fields(mc.sample_global(3, T, 0, gen(11)), box=[0.0, 0.0, T, T], hflip=hflip)
    ms_v, rgb_v = mc.apply(ms, rgb, p, size)
    for view, x in ((ms_v, ms), (rgb_v, rgb)):
        ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        # |values| reach ~8: float32 rounding of the sample coordinates differs between the two
        torch.testing.assert_close(view, ref.flip(-1) if hflip else ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hflip", [False, True])
def test_integer_box_at_its_own_size_is_a_slice(hflip: bool) -> None:
    ms, rgb = make_ms(3), torch.rand(3, 3, T, T, generator=gen(12))
    mc = MultiCrop(optical_aug=False)
    box = [4.0, 9.0, 24.0, 29.0]
    p = with_fields(mc.sample_local(3, T, gen(13)), box=box, hflip=hflip, vflip=False)
    ms_v, rgb_v = mc.apply(ms, rgb, p, 20)
    flip = (lambda x: x.flip(-1)) if hflip else (lambda x: x)
    assert torch.equal(ms_v, flip(ms[:, :, 9:29, 4:24]))
    assert torch.equal(rgb_v, flip(rgb[:, :, 9:29, 4:24]))


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


def test_view_specific_probabilities() -> None:
    mc = MultiCrop()
    first = mc.sample_global(500, T, 0, gen(15))
    assert (first.blur_sigma > 0).all() and not first.solarize.any()
    assert not mc.sample_global(500, T, 0, gen(15)).vflip.any()  # vflip_p defaults to 0


# ---- determinism ----------------------------------------------------------------------------


def test_generator_determinism_and_global_rng_untouched() -> None:
    ms = make_ms(4)
    mc = MultiCrop(**SMALL, band_stats=STATS)
    state = torch.get_rng_state()
    a, b, c = mc(ms, None, gen(16)), mc(ms, None, gen(16)), mc(ms, None, gen(17))
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a.global_rgb + a.local_ms, b.global_rgb + b.local_ms, strict=True):
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


# ---- shapes, dtypes and individual ops ------------------------------------------------------


def test_shapes_and_dtypes() -> None:
    ms = make_ms(3).to(torch.bfloat16)
    mc = MultiCrop(**SMALL, band_stats=STATS)
    out = mc(ms, None, gen(19))
    assert len(out.global_ms) == len(out.global_rgb) == len(out.global_params) == 2
    assert len(out.local_ms) == len(out.local_rgb) == SMALL["n_local"]
    assert all(x.shape == (3, 10, 40, 40) and x.dtype == torch.bfloat16 for x in out.global_ms)
    assert all(x.shape == (3, 3, 40, 40) for x in out.global_rgb)
    assert all(x.shape == (3, 10, 16, 16) for x in out.local_ms)
    assert all(x.shape == (3, 3, 16, 16) for x in out.local_rgb)
    assert all(x.min() >= 0 and x.max() <= 1 for x in out.global_rgb + out.local_rgb)
    none = MultiCrop(n_local=0, global_size=16, band_stats=STATS)(make_ms(2), None, gen(0))
    assert none.local_ms == [] and none.local_rgb == []


def test_derived_rgb_needs_band_stats() -> None:
    with pytest.raises(ValueError, match="band_stats"):
        MultiCrop(**SMALL)(make_ms(2), None, gen(0))


def test_grayscale_makes_channels_equal() -> None:
    mc = MultiCrop()
    p = mc.sample_global(4, T, 1, gen(20)).geometric_only()
    p = with_fields(p, gray=True)
    _, rgb_v = mc.apply(make_ms(4), torch.rand(4, 3, T, T, generator=gen(21)), p, 24)
    assert torch.equal(rgb_v[:, 0], rgb_v[:, 1]) and torch.equal(rgb_v[:, 1], rgb_v[:, 2])


def test_solarize_formula() -> None:
    x = torch.tensor([0.0, 0.2, 0.4999, 0.5, 0.7, 1.0])
    expected = torch.tensor([0.0, 0.2, 0.4999, 0.5, 1 - 0.7, 0.0])
    assert torch.equal(solarize(x), expected)
    mc = MultiCrop()
    p = with_fields(mc.sample_global(2, T, 1, gen(22)).geometric_only(), solarize=True)
    p = with_fields(p, box=[0.0, 0.0, T, T])
    rgb = torch.full((2, 3, T, T), 0.8)
    rgb[:, 0] = 0.3
    _, rgb_v = mc.apply(make_ms(2), rgb, p, T)
    assert torch.allclose(rgb_v[:, 0], torch.tensor(0.3)) and torch.allclose(
        rgb_v[:, 1:], torch.tensor(0.2)
    )


def test_jitter_and_blur_follow_torchvision() -> None:
    """The colour ops are torchvision's formulas (the authors' ColorJitter / GaussianBlur)."""
    mc = MultiCrop()
    rgb = torch.rand(1, 3, T, T, generator=gen(23))
    p = with_fields(mc.sample_global(1, T, 1, gen(24)).geometric_only(), box=[0.0, 0.0, T, T])
    p = with_fields(p, hflip=False, vflip=False, jitter_on=True, jitter=[1.3, 0.7, 1.15, 0.07])
    p.jitter_order = torch.tensor([[2, 0, 3, 1]])
    _, got = mc.apply(make_ms(1), rgb, p, T)
    ref = TF.adjust_saturation(rgb, 1.15)
    ref = TF.adjust_brightness(ref, 1.3)
    ref = TF.adjust_hue(ref, 0.07)
    ref = TF.adjust_contrast(ref, 0.7)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)

    blur = with_fields(p, jitter_on=False, blur_sigma=1.3)
    _, got = mc.apply(make_ms(1), rgb, blur, T)
    torch.testing.assert_close(got, TF.gaussian_blur(rgb, [9, 9], [1.3, 1.3]), atol=1e-5, rtol=0)
