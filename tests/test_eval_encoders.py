"""Loading the compared encoders: torchvision and torchgeo-DEO checkpoints by band name, their
input specs, the seeded floor, refusals.

torchvision-layout checkpoints are made by torchvision's own ``SwinTransformer``, and the
loaded encoder must compute what that model computes.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from fakes import TINY_STUDENT as TINY
from torch import nn

from deo.data.bands import SENTINEL2_BANDS
from deo.errors import ConfigError
from deo.evaluation.encoders import (
    RANDOM_DIGEST,
    FeatureEncoder,
    LoadedEncoder,
    load_encoder,
    random_encoder,
)
from deo.models.export import export_backbone, to_torchgeo
from deo.models.input_spec import MODEL_BANDS, RELEASED_DEO

pytestmark = pytest.mark.usefixtures("one_thread")

# torchgeo's spelling of the released model's bands.
TORCHGEO_BANDS = ["B4", "B3", "B2", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]


class Payload:
    """Not a tensor: unpickling it needs this module's code, which weights_only refuses."""


def torchvision_swin(in_chans: int, seed: int = 0) -> torchvision.models.SwinTransformer:
    """A tiny torchvision Swin (window 4) with an ``in_chans`` stem and non-trivial weights."""
    torch.manual_seed(seed)
    model = torchvision.models.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 2, 4],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=5,
    )
    model.features[0][0] = nn.Conv2d(in_chans, 16, kernel_size=4, stride=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "relative_position_bias_table")):
                param.normal_(std=0.5)
    return model.eval()


def torchvision_stages(model: torchvision.models.SwinTransformer, x: torch.Tensor) -> list:
    out = []
    for index, layer in enumerate(model.features):
        x = layer(x)
        if index % 2 == 1:
            out.append(x.permute(0, 3, 1, 2))
    return out


def assert_same_stages(ours: list, theirs: list) -> None:
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def image(channels: int, size: int = 40) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("in_chans", "modality"), [(10, "ms"), (3, "rgb")])
def test_torchvision_checkpoint_computes_torchvisions_function(
    in_chans: int, modality: str, tmp_path: Path
) -> None:
    tv = torchvision_swin(in_chans)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    loaded = load_encoder("torchvision", name="tv", path=tmp_path / "tv.pth")
    assert loaded.modalities == {modality}
    assert loaded.input_spec is None  # torchvision's layout carries no normalisation
    x = image(in_chans)
    with torch.no_grad():
        ours = loaded.model(x, modality)
        assert_same_stages(ours.stages, torchvision_stages(tv, x))
        tv.head = nn.Identity()
        torch.testing.assert_close(ours.pooled, tv(x), rtol=1e-5, atol=1e-5)


def test_wrapped_checkpoints_are_unwrapped(tmp_path: Path) -> None:
    tv = torchvision_swin(10)
    wrapped = {f"module.backbone.{k}": v for k, v in tv.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded = load_encoder("torchvision", name="wrapped", path=tmp_path / "wrapped.pth")
    x = image(10)
    with torch.no_grad():
        assert_same_stages(loaded.model(x, "ms").stages, torchvision_stages(tv, x))


def test_thirteen_band_checkpoint_takes_the_model_bands_by_name(tmp_path: Path) -> None:
    tv = torchvision_swin(13)
    path = tmp_path / "s2_13.pth"
    torch.save(tv.state_dict(), path)
    with pytest.raises(ConfigError, match=r"10 band names.*13-channel"):
        load_encoder("torchvision", name="s2", path=path)
    names = [b.name for b in SENTINEL2_BANDS]  # file order B01 ... B12
    loaded = load_encoder("torchvision", name="s2", path=path, checkpoint_bands=names)
    assert loaded.modalities == {"ms"}
    x13 = image(13)
    x10 = x13[:, [names.index(b) for b in MODEL_BANDS]]
    # Bands absent from the model input contribute nothing in this comparison: zero them.
    x13 = torch.zeros_like(x13)
    x13[:, [names.index(b) for b in MODEL_BANDS]] = x10
    with torch.no_grad():
        assert_same_stages(loaded.model(x10, "ms").stages, torchvision_stages(tv, x13))
    without_b11 = [n if n != "B11" else "B10b" for n in names]
    with pytest.raises(ConfigError, match="not a Sentinel-2 band name"):
        load_encoder("torchvision", name="s2", path=path, checkpoint_bands=without_b11)
    no_b11 = [n if n != "B11" else "B09" for n in names]
    with pytest.raises(ConfigError, match="name a band twice"):
        load_encoder("torchvision", name="s2", path=path, checkpoint_bands=no_b11)


def test_bands_in_either_spelling_and_order_are_matched_by_name(tmp_path: Path) -> None:
    tv = torchvision_swin(10)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    # ESA order (B02 first) in torchgeo's spelling: channel 0 of the file is blue.
    esa_order = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
    loaded = load_encoder(
        "torchvision", name="esa", path=tmp_path / "tv.pth", checkpoint_bands=esa_order
    )
    x_file = image(10)
    x_model = x_file[:, [esa_order.index(b.replace("0", "", 1)) for b in MODEL_BANDS]]
    with torch.no_grad():
        assert_same_stages(loaded.model(x_model, "ms").stages, torchvision_stages(tv, x_file))
    # bands null: the released model's order, which is the model's: the conv as it is.
    plain = load_encoder("torchvision", name="plain", path=tmp_path / "tv.pth")
    assert torch.equal(plain.model.ms_embed.proj.weight, tv.features[0][0].weight)


def test_torchgeo_layout_loads_both_embeddings_with_its_spec(tmp_path: Path) -> None:
    source = random_encoder(TINY, seed=4)
    state = to_torchgeo(source)
    torch.save(state, tmp_path / "deo_torchgeo.pth")
    loaded = load_encoder("torchvision", name="deo", path=tmp_path / "deo_torchgeo.pth")
    assert loaded.modalities == {"ms", "rgb"}
    assert loaded.input_spec == RELEASED_DEO  # torchgeo's layout without a spec: the release
    for modality, channels in (("ms", 10), ("rgb", 3)):
        x = image(channels, 32)
        with torch.no_grad():
            assert_same_stages(loaded.model(x, modality).stages, source(x, modality).stages)
    # A sidecar spec in another band order (torchgeo's spelling): conv and spec reordered.
    order = list(reversed(range(10)))
    state["feat_extr.conv_ms.0.weight"] = state["feat_extr.conv_ms.0.weight"][:, order]
    torch.save(state, tmp_path / "deo_torchgeo.pth")
    sidecar = replace(
        RELEASED_DEO,
        bands=tuple(MODEL_BANDS[i] for i in order),
        optical_channels=(9, 8, 7),
        mean=tuple(RELEASED_DEO.mean[i] for i in order),
        std=tuple(RELEASED_DEO.std[i] for i in order),
    )
    text = sidecar.to_json()
    for esa, tg in zip(MODEL_BANDS, TORCHGEO_BANDS, strict=True):
        text = text.replace(f'"{esa}"', f'"{tg}"')
    (tmp_path / "input_spec.json").write_text(text)
    reordered = load_encoder("torchvision", name="deo", path=tmp_path / "deo_torchgeo.pth")
    assert reordered.input_spec == RELEASED_DEO
    assert torch.equal(reordered.model.ms_embed.proj.weight, source.ms_embed.proj.weight)


def test_weights_only_refuses_pickled_objects(tmp_path: Path) -> None:
    state = torchvision_swin(10).state_dict()
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": state, "extra": Payload()}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        load_encoder("torchvision", name="evil", path=path)


def test_not_a_swin_checkpoint(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="neither torchgeo's DEO layout"):
        load_encoder("torchvision", name="other", path=tmp_path / "other.pth")


def test_random_floor_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_encoder("random", name="floor", config=TINY, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    b = load_encoder("random", name="floor", config=TINY, seed=5)
    c = load_encoder("random", name="floor", config=TINY, seed=6)
    sa, sb, sc = (e.model.state_dict() for e in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.digest == RANDOM_DIGEST and a.modalities == {"ms", "rgb"}
    with pytest.raises(ConfigError, match="architecture"):
        load_encoder("random", name="floor")


def test_student_export_loads_with_digest(tmp_path: Path) -> None:
    model = random_encoder(TINY, seed=0)
    path = tmp_path / "backbone.safetensors"
    export_backbone(model, TINY, path)
    loaded = load_encoder("student", name="deo", path=path)
    assert loaded.modalities == {"ms", "rgb"}
    assert loaded.input_spec is None  # no spec exported beside it
    spec = replace(RELEASED_DEO, window_size=4, img_size=32)
    spec.write(tmp_path / "input_spec.json")
    assert load_encoder("student", name="deo", path=path).input_spec == spec
    assert loaded.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    x = image(3, 32)
    with torch.no_grad():
        a, b = model(x, "rgb"), loaded.model(x, "rgb")
    assert torch.equal(a.pooled, b.pooled)
    assert all(torch.equal(s, t) for s, t in zip(a.stages, b.stages, strict=True))


def test_feature_encoder_frozen_or_private_copy() -> None:
    loaded: LoadedEncoder = load_encoder("random", name="floor", config=TINY, seed=0)
    frozen = FeatureEncoder(loaded, "ms")
    frozen.train()
    assert not frozen.backbone.training
    assert not any(p.requires_grad for p in frozen.parameters())
    features = frozen(torch.randn(2, 10, 32, 32))
    assert features.pooled.shape == (2, 128) and not features.pooled.requires_grad
    assert [s.shape[1] for s in features.stages] == [16, 32, 64, 128]
    assert frozen.stride == 32

    tuned = FeatureEncoder(loaded, "ms", trainable=True)
    assert tuned.backbone is not loaded.model
    tuned(torch.randn(2, 10, 32, 32)).pooled.sum().backward()
    assert all(p.grad is None for p in loaded.model.parameters())
    with pytest.raises(ValueError, match="patch size"):
        frozen(torch.randn(1, 10, 30, 30))
