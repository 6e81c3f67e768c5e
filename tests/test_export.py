"""Backbone export: deo's own file, and torchvision-Swin weights checked by running both models.

Equivalence is established by computation, not by reading key names: the torchvision model
built from the exported state dict must produce the student's stage maps and pooled embedding
on inputs whose stage grids are multiples of the window (the regime where torchvision's
unmasked padding never comes into play).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging as TimmPatchMerging
from torch import Tensor, nn
from torchvision.models.swin_transformer import _patch_merging_pad

from deo import __version__
from deo.data.bands import MS_BANDS
from deo.errors import ConfigError
from deo.models.export import (
    TIMM_MERGE_ORDER,
    TORCHVISION_MERGE_ORDER,
    export_backbone,
    export_torchgeo,
    load_backbone,
    relative_position_index,
    to_torchvision_swin,
    torchvision_swin,
)
from deo.models.student import DualEmbedSwin, StudentConfig

SMALL = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)}


def small(window: int, img_size: int, **kw) -> StudentConfig:
    return StudentConfig(window_size=window, img_size=img_size, drop_path_rate=0.0, **kw)


W4 = small(4, 128, **SMALL)  # 256 px input: grids 64, 32, 16, 8 — every stage shifts
W7 = small(7, 224, **SMALL)  # 224 x 448 input: grids 56x112 ... 7x14 — last stage shifts in W only
# The paper's window on a tiny model: 384 px gives grids 96, 48, 24, 12.
W12 = small(12, 384, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
PAPER = StudentConfig(arch="swin_base_patch4_window12_384", window_size=12, img_size=224)


@pytest.fixture(scope="module")
def w4() -> DualEmbedSwin:
    """The window-4 student, shared by the tests that only read it (building dominates)."""
    return build(W4)


def build(cfg: StudentConfig, seed: int = 0, with_rgb: bool = True) -> DualEmbedSwin:
    torch.manual_seed(seed)
    model = DualEmbedSwin(cfg, with_rgb=with_rgb).eval()
    # Non-trivial norms and biases, so a swapped or missing tensor cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def image(channels: int, hw: tuple[int, int], batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, channels, *hw, generator=torch.Generator().manual_seed(seed))


def torchvision_stages(model: torchvision.models.SwinTransformer, x: Tensor) -> list[Tensor]:
    """Each stage's output of a torchvision Swin (features 1, 3, 5, 7), as NCHW."""
    stages = []
    for index, layer in enumerate(model.features):
        x = layer(x)
        if index % 2 == 1:
            stages.append(x.permute(0, 3, 1, 2))
    return stages


def exported(student: DualEmbedSwin, modality: str = "ms") -> torchvision.models.SwinTransformer:
    channels = student.embedding(modality).proj.in_channels
    model = torchvision_swin(student.cfg, channels).eval()
    model.load_state_dict(to_torchvision_swin(student, modality), strict=True)
    return model


def assert_same_features(
    student: DualEmbedSwin, model: nn.Module, x: Tensor, modality: str = "ms"
) -> None:
    """Stage maps and pooled embedding of the torchvision model equal the student's."""
    with torch.no_grad():
        expected = student(x, modality)
        stages = torchvision_stages(model, x)
        last = stages[-1].permute(0, 2, 3, 1)
        pooled = model.norm(last).mean(dim=(1, 2))
    assert len(stages) == len(expected.stages)
    for got, want in zip(stages, expected.stages, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, expected.pooled, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- layout conventions


def test_merge_orders_describe_the_libraries() -> None:
    # Each constant is checked against its own library: slot k of the concatenation holds
    # the input at (2i + dr, 2j + dc) for offset (dr, dc) = ORDER[k].
    dim = 3
    x = torch.randn(1, 4, 6, dim)
    merging = TimmPatchMerging(dim, out_dim=4 * dim)
    merging.norm = nn.Identity()
    with torch.no_grad():
        merging.reduction.weight.copy_(torch.eye(4 * dim))
        concatenations = {"timm": merging(x), "torchvision": _patch_merging_pad(x)}
    for library, order in (("timm", TIMM_MERGE_ORDER), ("torchvision", TORCHVISION_MERGE_ORDER)):
        cat = concatenations[library]
        for slot, (dr, dc) in enumerate(order):
            torch.testing.assert_close(
                cat[..., slot * dim : (slot + 1) * dim], x[:, dr::2, dc::2], rtol=0, atol=0
            )


def test_relative_position_index_and_bias_match_torchvision(w4: DualEmbedSwin) -> None:
    student = w4
    fresh = torchvision_swin(W4, 10)
    state = to_torchvision_swin(student)
    key = "features.3.1.attn.relative_position_index"
    assert torch.equal(state[key], fresh.state_dict()[key])
    assert torch.equal(
        relative_position_index(4), fresh.features[1][0].attn.relative_position_index
    )
    model = exported(student)
    for stage in range(4):
        for block in range(2):
            timm_attn = student.layers[stage].blocks[block].attn
            tv_attn = model.features[2 * stage + 1][block].attn
            torch.testing.assert_close(
                tv_attn.get_relative_position_bias(), timm_attn._get_rel_pos_bias(), rtol=0, atol=0
            )


def test_paper_backbone_has_torchvision_swin_b_names_and_shapes() -> None:
    # Swin-B at img_size 384 keeps window 12 in every stage; structure only (meta device).
    cfg = StudentConfig(arch=PAPER.arch, window_size=12, img_size=384)
    with torch.device("meta"):
        state = to_torchvision_swin(DualEmbedSwin(cfg))
        model = torchvision_swin(cfg, 10)
        reference = torchvision.models.swin_b(weights=None)  # window 7, 3 channels, 1000 classes
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].shape == expected[k].shape for k in state)
    assert state["features.0.0.weight"].shape == (128, 10, 4, 4)
    assert model.features[1][0].attn.window_size == [12, 12]
    # The names are torchvision's Swin-B's, head aside; only the window-sized tables and the
    # input conv differ in shape from the 3-channel window-7 model.
    ref = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    assert state.keys() == ref.keys()
    differing = {k for k in state if state[k].shape != ref[k].shape}
    assert "features.0.0.weight" in differing
    assert all(k == "features.0.0.weight" or "relative_position" in k for k in differing)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("cfg", "hw"),
    [(W4, (256, 256)), (W7, (224, 448)), (W12, (384, 384))],
    ids=["window4", "window7-rect", "window12"],
)
def test_torchvision_model_computes_the_student_ms_path(
    cfg: StudentConfig, hw: tuple[int, int]
) -> None:
    student = build(cfg)
    assert_same_features(student, exported(student, "ms"), image(10, hw, batch=1))


def test_rgb_export_uses_the_rgb_embedding(w4: DualEmbedSwin) -> None:
    student = w4
    ms_state = to_torchvision_swin(student, "ms")
    rgb_state = to_torchvision_swin(student, "rgb")
    assert rgb_state["features.0.0.weight"].shape == (16, 3, 4, 4)
    assert torch.equal(rgb_state["features.0.0.weight"], student.rgb_embed.proj.weight)
    assert torch.equal(rgb_state["features.0.2.bias"], student.rgb_embed.norm.bias)
    # Only the patch embedding differs between the two modalities' exports.
    assert {k for k in ms_state if not torch.equal(ms_state[k], rgb_state[k])} <= {
        f"features.0.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")
    }
    assert_same_features(student, exported(student, "rgb"), image(3, (128, 128)), "rgb")


# --------------------------------------------------------------------------- deo backbone file


def read_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def test_backbone_round_trip_is_exact(tmp_path: Path, w4: DualEmbedSwin) -> None:
    student = w4
    path = tmp_path / "backbone.safetensors"
    export_backbone(student, W4, path, modality="ms")
    loaded, cfg = load_backbone(path)
    assert not loaded.training
    assert loaded.rgb_embed is not None
    assert cfg.window_size == 4 and cfg.img_size == 128 and cfg.depths == (2, 2, 2, 2)
    for name, tensor in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        for modality, channels in (("ms", 10), ("rgb", 3)):
            x = image(channels, (96, 64))  # a size whose grids the window does not divide
            a, b = student(x, modality), loaded(x, modality)
            assert torch.equal(a.pooled, b.pooled)
            assert all(torch.equal(s, t) for s, t in zip(a.stages, b.stages, strict=True))


def test_backbone_file_is_pure_safetensors_with_metadata(tmp_path: Path, w4: DualEmbedSwin) -> None:
    student = w4
    path = tmp_path / "backbone.safetensors"
    export_backbone(student, W4, path, modality="rgb")
    length, header = read_header(path)
    # Header JSON, then exactly the tensors' bytes back to back: no room for a pickle.
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    assert path.stat().st_size == 8 + length + max(ends)
    assert not path.read_bytes().startswith(b"PK")  # torch.save's zip container
    meta = header["__metadata__"]
    assert meta["format"] == "deo-backbone"
    assert meta["deo_version"] == __version__
    assert meta["arch"] == W4.arch
    assert meta["window_size"] == "4"
    assert json.loads(meta["embed_dims"]) == [16, 32, 64, 128]
    assert json.loads(meta["depths"]) == [2, 2, 2, 2]
    assert json.loads(meta["num_heads"]) == [1, 2, 2, 4]
    assert meta["modality"] == "rgb" and meta["in_chans"] == "3"
    assert json.loads(meta["bands"]) == list(MS_BANDS)
    names = {name for name in header if name != "__metadata__"}
    assert {"ms_embed.proj.weight", "rgb_embed.proj.weight", "norm.weight"} <= names


def test_ms_only_backbone_round_trips_without_rgb(tmp_path: Path) -> None:
    teacher = build(W4, with_rgb=False)
    path = tmp_path / "teacher.safetensors"
    export_backbone(teacher, W4, path)
    loaded, _ = load_backbone(path)
    assert loaded.rgb_embed is None
    with pytest.raises(ConfigError, match="no RGB embedding"):
        export_backbone(teacher, W4, path, modality="rgb")


def test_loading_something_else_names_the_file(tmp_path: Path, w4: DualEmbedSwin) -> None:
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    pickled = tmp_path / "pickled.pt"
    torch.save(w4.state_dict(), pickled)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    torchgeo = tmp_path / "tv.pth"
    export_torchgeo(w4, W4, torchgeo)
    for path in (random_bytes, pickled, foreign, torchgeo.with_suffix(".safetensors")):
        with pytest.raises(ConfigError, match=rf"{re.escape(path.name)}.*not a deo backbone"):
            load_backbone(path)
    with pytest.raises(ConfigError, match=r"missing\.safetensors"):
        load_backbone(tmp_path / "missing.safetensors")


def test_backbone_whose_weights_do_not_fit_its_metadata(tmp_path: Path, w4: DualEmbedSwin) -> None:
    path = tmp_path / "backbone.safetensors"
    export_backbone(w4, W4, path)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    config = json.loads(meta["student_config"])
    config["embed_dim"] = 32
    save_file(tensors, str(path), metadata={**meta, "student_config": json.dumps(config)})
    with pytest.raises(ConfigError, match=r"backbone\.safetensors.*do not fit"):
        load_backbone(path)


# --------------------------------------------------------------------------- torchgeo export


def test_torchgeo_export_loads_strictly_and_computes_the_student(
    tmp_path: Path, w4: DualEmbedSwin
) -> None:
    student = w4
    path = tmp_path / "deo_tiny.pth"
    export_torchgeo(student, W4, path, modality="ms")
    state = torch.load(path, weights_only=True)
    model = torchvision_swin(W4, 10).eval()
    model.load_state_dict(state, strict=True)
    x = image(10, (128, 128), batch=1)
    assert_same_features(student, model, x)
    with torch.no_grad():  # the head is Identity: forward is norm -> token mean
        torch.testing.assert_close(model(x), student(x).pooled, rtol=1e-5, atol=1e-5)

    twin = path.with_suffix(".safetensors")
    with safe_open(str(twin), framework="pt") as handle:
        meta = handle.metadata()
        assert set(handle.keys()) == set(state)
        assert all(torch.equal(handle.get_tensor(k), state[k]) for k in state)
    assert meta["format"] == "deo-torchvision-swin"
    assert json.loads(meta["window_size"]) == [4, 4]
    assert meta["in_chans"] == "10" and json.loads(meta["bands"]) == list(MS_BANDS)


def test_refuses_windows_fitted_to_small_stage_grids(tmp_path: Path) -> None:
    # img_size 64 gives grids 16, 8, 4, 2: timm fits window 7 down to 4 and 2 in the last two
    # stages; torchvision has one window for all stages.
    cfg = small(7, 64, **SMALL)
    path = tmp_path / "deo.pth"
    with pytest.raises(
        ConfigError, match=r"stage 2 uses a \(4, 4\) window.*stage 3 uses a \(2, 2\)"
    ):
        export_torchgeo(build(cfg), cfg, path)
    assert not path.exists() and not path.with_suffix(".safetensors").exists()
    with pytest.raises(ConfigError, match="img_size >= 224"):
        torchvision_swin(cfg, 10)


def test_paper_config_at_224_is_refused_but_at_384_is_not() -> None:
    # The last stage of Swin-B at 224 px is 7x7, so timm builds its window as 7, not 12.
    with torch.device("meta"):
        with pytest.raises(ConfigError, match=r"stage 3 uses a \(7, 7\) window"):
            torchvision_swin(PAPER, 10)
        torchvision_swin(StudentConfig(arch=PAPER.arch, window_size=12, img_size=384), 10)


def test_refuses_a_patch_size_other_than_four() -> None:
    student = build(W4)
    student.ms_embed = PatchEmbed(
        img_size=128, patch_size=2, in_chans=10, embed_dim=16, output_fmt="NHWC",
        norm_layer=nn.LayerNorm, strict_img_size=False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="ms patch size"):
        to_torchvision_swin(student, "ms")


def test_refuses_mismatched_config_and_missing_modality(tmp_path: Path) -> None:
    student = build(W4, with_rgb=False)
    with pytest.raises(ConfigError, match="built from"):
        export_torchgeo(student, W7, tmp_path / "a.pth")
    with pytest.raises(ConfigError, match="no RGB embedding"):
        export_torchgeo(student, W4, tmp_path / "a.pth", modality="rgb")
    with pytest.raises(ConfigError, match="unknown modality"):
        to_torchvision_swin(student, "sar")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\.pth"):
        export_torchgeo(student, W4, tmp_path / "a.safetensors")
