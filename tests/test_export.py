"""Backbone export: deo's own file, torchgeo's DEO layout with its input spec, and the renames.

That the torchgeo layout computes torchgeo's function at the released size is checked against
torchgeo's own code in test_torchgeo_deo.py; here, on tiny models, the layout's names and the
refusals.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deo import __version__
from deo.errors import ConfigError
from deo.models.export import (
    export_backbone,
    export_torchgeo,
    from_torchgeo,
    from_torchvision,
    load_backbone,
    to_torchgeo,
    torchgeo_mismatches,
)
from deo.models.input_spec import MODEL_BANDS, RELEASED_DEO, InputSpec, training_input_spec
from deo.models.student import DualEmbedSwin, StudentConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)}
W4 = StudentConfig(window_size=4, img_size=128, drop_path_rate=0.0, **SMALL)
W7 = StudentConfig(window_size=7, img_size=224, drop_path_rate=0.0, **SMALL)
STATS = {b: {"mean": 1000.0 + i, "std": 500.0 + i} for i, b in enumerate(MODEL_BANDS)}
STATS |= {f"optical_{c}": {"mean": 0.4 + i / 10, "std": 0.2 + i / 10} for i, c in enumerate("RGB")}
STATS |= {f"optical_s2_{c}": {"mean": 0.3, "std": 0.25} for c in "RGB"}


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


def image(channels: int, hw: tuple[int, int], batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, *hw, generator=torch.Generator().manual_seed(seed))


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
    assert cfg == W4
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
    assert json.loads(meta["bands"]) == list(MODEL_BANDS)
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
    for path in (random_bytes, pickled, foreign):
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


# --------------------------------------------------------------------------- torchgeo's DEO


def test_torchgeo_layout_names_and_round_trip(tmp_path: Path, w4: DualEmbedSwin) -> None:
    spec = training_input_spec(STATS, W4.img_size, W4.window_size)
    weights, spec_path = export_torchgeo(w4, W4, tmp_path, spec)
    state = torch.load(weights, weights_only=True)
    assert len(state) == len(w4.state_dict())
    assert all(k.startswith("feat_extr.") for k in state)
    ours = w4.state_dict()
    assert torch.equal(state["feat_extr.conv_ms.0.weight"], ours["ms_embed.proj.weight"])
    assert torch.equal(state["feat_extr.conv_rgb.2.bias"], ours["rgb_embed.norm.bias"])
    assert torch.equal(
        state["feat_extr.features.6.1.attn.relative_position_index"],
        ours["features.6.1.attn.relative_position_index"],
    )
    back = from_torchgeo(state, weights)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    # A tiny student is torchgeo's layout but not DEO()'s shapes; the difference is named.
    problems = torchgeo_mismatches(state)
    assert any("feat_extr.conv_ms.0.weight" in p for p in problems)
    assert InputSpec.read(spec_path) == spec


def test_training_input_spec_is_the_normalisation_training_used() -> None:
    spec = training_input_spec(STATS, 224, 12)
    assert spec.bands == MODEL_BANDS
    assert spec.optical_channels == (0, 1, 2) and spec.optical_scale == "max"
    assert spec.mean[:3] == pytest.approx((0.4, 0.5, 0.6))
    assert spec.std[:3] == pytest.approx((0.2, 0.3, 0.4))
    assert spec.mean[3:] == tuple(1000.0 + i for i in range(3, 10))
    assert spec.std[9] == 509.0
    s2_only = training_input_spec(STATS, 224, 12, partners=False)
    assert s2_only.mean[:3] == (0.3, 0.3, 0.3) and s2_only.mean[3:] == spec.mean[3:]
    with pytest.raises(ConfigError, match="B12"):
        training_input_spec({k: v for k, v in STATS.items() if k != "B12"}, 224, 12)
    authors = training_input_spec(STATS, 224, 12, source="authors")
    assert (authors.mean, authors.std) == (RELEASED_DEO.mean, RELEASED_DEO.std)


def test_torchvision_layout_maps_the_stem_to_one_embedding(w4: DualEmbedSwin) -> None:
    ours = w4.state_dict()
    tv = {"features.0.0.weight": ours["rgb_embed.proj.weight"], "norm.bias": ours["norm.bias"]}
    tv["features.1.0.norm1.weight"] = ours["features.0.0.norm1.weight"]
    tv["features.2.reduction.weight"] = ours["features.1.reduction.weight"]
    mapped = from_torchvision(tv, "rgb")
    assert set(mapped) == {
        "rgb_embed.proj.weight",
        "norm.bias",
        "features.0.0.norm1.weight",
        "features.1.reduction.weight",
    }
    with pytest.raises(ConfigError, match=r"head\.weight"):
        from_torchvision({"head.weight": torch.zeros(1)}, "ms", "x.pth")


def test_torchgeo_export_refusals(tmp_path: Path) -> None:
    student = build(W4, with_rgb=False)
    spec = training_input_spec(STATS, W4.img_size, W4.window_size)
    with pytest.raises(ConfigError, match="built from"):
        export_torchgeo(student, W7, tmp_path, spec)
    with pytest.raises(ConfigError, match="without an optical path"):
        export_torchgeo(student, W4, tmp_path, spec)
    with pytest.raises(ConfigError, match="does not describe"):
        export_torchgeo(build(W4), W4, tmp_path, RELEASED_DEO)  # window 12, not 4
    with pytest.raises(ConfigError, match=r"x\.pth.*not a torchgeo DEO key"):
        from_torchgeo({"features.0.0.norm1.weight": torch.zeros(1)}, "x.pth")
    with pytest.raises(ConfigError, match="unknown modality"):
        export_backbone(student, W4, tmp_path / "b.safetensors", modality="sar")  # type: ignore[arg-type]


@pytest.mark.parametrize("optical_path", [True, False])
def test_export_run_writes_backbone_spec_and_torchgeo_layout(
    tmp_path: Path, optical_path: bool
) -> None:
    from fakes import TINY_TRAIN

    from deo.config import to_dict
    from deo.train.checkpoint import save_checkpoint
    from deo.train.config import parse_train
    from deo.train.finish import export_run

    cfg = parse_train({**TINY_TRAIN, "ablation": {"optical_path": optical_path}})
    student = build(cfg.student, with_rgb=optical_path)
    checkpoint = tmp_path / "checkpoint.pt"
    state = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    save_checkpoint(checkpoint, {"config": json.dumps({"train": to_dict(cfg)}), "student": state})
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(STATS))
    summary = export_run(checkpoint, tmp_path / "export", stats)
    out = tmp_path / "export"
    assert json.loads((out / "export.json").read_text()) == summary
    loaded, _ = load_backbone(out / "backbone.safetensors")
    assert loaded.state_dict().keys() == student.state_dict().keys()
    spec = InputSpec.read(out / "input_spec.json")
    assert spec == training_input_spec(STATS, cfg.student.img_size, cfg.student.window_size)
    if optical_path:
        assert summary["torchgeo"] == "deo_torchgeo.pth"
        assert summary["torchgeo_deo_strict"] is False  # a tiny model is not DEO()'s shape
        exported = torch.load(out / "deo_torchgeo.pth", weights_only=True)
        assert exported.keys() == to_torchgeo(student).keys()
    else:
        assert summary["torchgeo"] is None
        assert "without an optical path" in summary["torchgeo_refused"]
