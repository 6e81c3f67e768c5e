"""Loading the compared encoders: torchvision-layout round trips, the seeded floor, refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from deo.data.bands import MS_BANDS, SENTINEL2_BANDS, file_index
from deo.errors import ConfigError
from deo.evaluation.encoders import (
    RANDOM_DIGEST,
    FeatureEncoder,
    LoadedEncoder,
    load_encoder,
    random_encoder,
)
from deo.models.export import export_backbone, export_torchgeo, to_torchvision_swin
from deo.models.student import DualEmbedSwin, StudentConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# torchvision's Swin uses one window in every stage, so the round-trip model is built at the
# smallest size whose last stage holds a whole window-4 window (4 * 4 * 8 = 128).
TV_TINY = StudentConfig(
    window_size=4,
    img_size=128,
    embed_dim=16,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 2, 4),
    drop_path_rate=0.0,
)
TINY = StudentConfig(
    arch="swin_tiny_patch4_window7_224",
    window_size=4,
    img_size=32,
    embed_dim=16,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 2, 4),
    drop_path_rate=0.0,
)


class Payload:
    """Not a tensor: unpickling it needs this module's code, which weights_only refuses."""


@pytest.fixture(scope="module")
def student() -> DualEmbedSwin:
    return random_encoder(TV_TINY, seed=3)


def same_outputs(a: DualEmbedSwin, b: DualEmbedSwin, modality: str, size: int = 64) -> bool:
    channels = 3 if modality == "rgb" else 10
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fa, fb = a(x, modality), b(x, modality)
    return torch.equal(fa.pooled, fb.pooled) and all(
        torch.equal(sa, sb) for sa, sb in zip(fa.stages, fb.stages, strict=True)
    )


@pytest.mark.parametrize("modality", ["ms", "rgb"])
def test_torchvision_round_trip(student: DualEmbedSwin, modality: str, tmp_path: Path) -> None:
    path = tmp_path / "swin.pth"
    torch.save(to_torchvision_swin(student, modality), path)
    loaded = load_encoder("torchvision", name="ext", path=path)
    assert loaded.modalities == {modality}
    cfg = loaded.config
    assert (cfg.window_size, cfg.img_size, cfg.embed_dim) == (4, 128, 16)
    assert (cfg.depths, cfg.num_heads) == ((2, 2, 2, 2), (1, 2, 2, 4))
    assert same_outputs(student, loaded.model, modality)
    assert loaded.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="no trained"):
        FeatureEncoder(loaded, "rgb" if modality == "ms" else "ms")


def test_torchgeo_export_twin_and_wrapped_checkpoints(
    student: DualEmbedSwin, tmp_path: Path
) -> None:
    export_torchgeo(student, TV_TINY, tmp_path / "deo.pth", modality="ms")
    from_twin = load_encoder("torchvision", name="twin", path=tmp_path / "deo.safetensors")
    assert same_outputs(student, from_twin.model, "ms")
    # DDP/Lightning-style wrapping and a classifier head are taken apart, not refused.
    state = to_torchvision_swin(student, "ms")
    wrapped = {f"module.backbone.{k}": v for k, v in state.items()}
    wrapped["module.backbone.head.weight"] = torch.zeros(5, 128)
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded = load_encoder("torchvision", name="wrapped", path=tmp_path / "wrapped.pth")
    assert same_outputs(student, loaded.model, "ms")


def test_thirteen_band_checkpoint_needs_band_names(student: DualEmbedSwin, tmp_path: Path) -> None:
    state = to_torchvision_swin(student, "ms")
    ten = state["features.0.0.weight"]
    thirteen = torch.randn(ten.shape[0], 13, 4, 4)
    for i, band in enumerate(MS_BANDS):
        thirteen[:, file_index(band)] = ten[:, i]
    state["features.0.0.weight"] = thirteen
    path = tmp_path / "s2_13.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"13 input channels.*checkpoint_bands"):
        load_encoder("torchvision", name="s2", path=path)
    names = [b.name for b in SENTINEL2_BANDS]
    loaded = load_encoder("torchvision", name="s2", path=path, checkpoint_bands=names)
    assert loaded.modalities == {"ms"}
    assert same_outputs(student, loaded.model, "ms")
    without_b11 = [n if n != "B11" else "B10b" for n in names]
    with pytest.raises(ConfigError, match="B11"):
        load_encoder("torchvision", name="s2", path=path, checkpoint_bands=without_b11)


def test_ten_bands_in_another_order_are_matched_by_name(
    student: DualEmbedSwin, tmp_path: Path
) -> None:
    state = to_torchvision_swin(student, "ms")
    order = list(reversed(range(len(MS_BANDS))))
    state["features.0.0.weight"] = state["features.0.0.weight"][:, order]
    torch.save(state, tmp_path / "reversed.pth")
    bands = [MS_BANDS[i] for i in order]
    loaded = load_encoder(
        "torchvision", name="rev", path=tmp_path / "reversed.pth", checkpoint_bands=bands
    )
    assert same_outputs(student, loaded.model, "ms")


def test_weights_only_refuses_pickled_objects(student: DualEmbedSwin, tmp_path: Path) -> None:
    state = to_torchvision_swin(student, "ms")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": state, "extra": Payload()}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        load_encoder("torchvision", name="evil", path=path)


def test_not_a_swin_checkpoint(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a torchvision Swin"):
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
    assert loaded.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert same_outputs(model, loaded.model, "rgb", size=32)


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
