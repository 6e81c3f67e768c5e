"""The frozen DINOv3 teacher: shapes, freezing, layer choice, normalisation and weight loading.

Everything runs on the tiny random-weight teacher (timm's DINOv3 ViT class with small dims);
the full-size architectures are only built on the meta device, so no weights are needed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from deo.errors import ConfigError
from deo.models.attention import xformers_available
from deo.models.teacher import (
    EvaAttention,
    TeacherConfig,
    VFMTeacher,
    arch_depth,
    build_tiny_teacher_weights,
    check_weights,
    default_layers,
    eva_attention,
    resolve_layers,
)

TINY = TeacherConfig(tiny=True)


@pytest.fixture(scope="module")
def teacher() -> VFMTeacher:
    return VFMTeacher(TINY)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny_teacher.safetensors"
    build_tiny_teacher_weights(path, TINY)
    return path


def _rgb(batch: int = 2, height: int = 64, width: int = 96, seed: int = 1) -> Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _normalised(teacher: VFMTeacher, rgb: Tensor) -> Tensor:
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.std).view(1, 3, 1, 1)
    return (rgb - mean) / std


def _to_meta_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Invert timm's DINOv3 key conversion: the layout of Meta's original .pth files."""
    meta: dict[str, Tensor] = {}
    dim = state["cls_token"].shape[-1]
    for key, value in state.items():
        key = key.replace("reg_token", "storage_tokens")
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        meta[key] = value.clone()
        if key.endswith("attn.qkv.weight"):
            # Meta stores an all-zero qkv bias with a mask even where the model has none.
            meta[key.replace("weight", "bias")] = torch.zeros(3 * dim)
            meta[key.replace("weight", "bias_mask")] = torch.ones(3 * dim)
    meta["mask_token"] = torch.zeros(1, dim)
    meta["rope_embed.periods"] = torch.arange(8, dtype=torch.float32)
    return meta


# --- outputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(224, 224), (64, 96), (96, 64)])
def test_output_shapes_and_grid(teacher: VFMTeacher, height: int, width: int) -> None:
    out = teacher(_rgb(height=height, width=width))
    grid = (height // 16, width // 16)
    patches = grid[0] * grid[1]
    dim = TINY.tiny_embed_dim
    assert out.grid == grid
    assert out.cls.shape == (2, dim)
    assert out.patch_final.shape == (2, patches, dim)
    assert out.patch_mid.shape == (2, patches, dim)


def test_register_tokens_are_excluded(teacher: VFMTeacher) -> None:
    rgb = _rgb()
    tokens = teacher.model.forward_features(_normalised(teacher, rgb))
    out = teacher(rgb)
    assert teacher.num_prefix_tokens == 1 + 4  # [cls] + DINOv3's 4 registers, read from timm
    assert tokens.shape[1] == out.patch_final.shape[1] + teacher.num_prefix_tokens


def test_cls_and_final_patches_match_timm_forward_features(teacher: VFMTeacher) -> None:
    rgb = _rgb()
    tokens = teacher.model.forward_features(_normalised(teacher, rgb))
    out = teacher(rgb)
    torch.testing.assert_close(out.cls, tokens[:, 0])
    torch.testing.assert_close(out.patch_final, tokens[:, teacher.num_prefix_tokens :])


def test_mid_patches_match_a_hook_on_the_mid_block(teacher: VFMTeacher) -> None:
    captured: list[Tensor] = []
    block = teacher.model.blocks[teacher.mid_layer]
    handle = block.register_forward_hook(lambda _m, _i, output: captured.append(output))
    rgb = _rgb()
    try:
        with torch.no_grad():
            teacher.model.forward_features(_normalised(teacher, rgb))
    finally:
        handle.remove()
    (hooked,) = captured
    expected = teacher.model.norm(hooked)[:, teacher.num_prefix_tokens :]  # documented: normed
    out = teacher(rgb)
    torch.testing.assert_close(out.patch_mid, expected)
    # The middle block must really differ from the final one, or the test above proves nothing.
    assert not torch.allclose(out.patch_mid, out.patch_final, atol=1e-3)


def test_input_in_unit_range_is_normalised_with_the_weights_constants(teacher: VFMTeacher) -> None:
    assert teacher.mean == (0.485, 0.456, 0.406)  # ImageNet: the LVD-1689M weights
    assert teacher.std == (0.229, 0.224, 0.225)
    rgb = _rgb()
    raw = teacher.model.forward_features(_normalised(teacher, rgb))
    unnormalised = teacher.model.forward_features(rgb)
    torch.testing.assert_close(teacher(rgb).cls, raw[:, 0])
    assert not torch.allclose(teacher(rgb).cls, unnormalised[:, 0], atol=1e-3)


def test_sat493m_tag_selects_satellite_normalisation() -> None:
    cfg = TeacherConfig(arch="vit_large_patch16_dinov3.sat493m", tiny=True)
    sat = VFMTeacher(cfg)
    assert sat.mean == (0.430, 0.411, 0.296)
    assert sat.std == (0.213, 0.156, 0.143)


def test_input_not_multiple_of_patch_is_refused(teacher: VFMTeacher) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        teacher(_rgb(height=70, width=96))


# --- frozen, eval, deterministic -------------------------------------------------------------


def test_no_gradients_flow(teacher: VFMTeacher) -> None:
    assert not any(p.requires_grad for p in teacher.parameters())
    rgb = _rgb().requires_grad_(True)
    out = teacher(rgb)
    assert not (
        out.cls.requires_grad or out.patch_final.requires_grad or out.patch_mid.requires_grad
    )


def test_train_keeps_eval_mode_even_inside_a_parent(teacher: VFMTeacher) -> None:
    parent = nn.ModuleDict({"teacher": teacher, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not teacher.training
    assert not any(m.training for m in teacher.modules())
    teacher.train(True)
    assert not teacher.training


def test_tiny_teacher_is_deterministic_per_seed(teacher: VFMTeacher) -> None:
    rgb = _rgb()
    torch.manual_seed(123)  # the caller's RNG state must not matter
    same = VFMTeacher(TINY)(rgb)
    other = VFMTeacher(TeacherConfig(tiny=True, seed=1))(rgb)
    ref = teacher(rgb)
    torch.testing.assert_close(same.patch_final, ref.patch_final, rtol=0, atol=0)
    assert not torch.allclose(other.patch_final, ref.patch_final, atol=1e-3)


def test_tiny_teacher_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deo.models.teacher"):
        VFMTeacher(TINY)
    assert any(
        "RANDOM-WEIGHT" in r.message and r.levelno == logging.WARNING for r in caplog.records
    )


# --- layer indices ---------------------------------------------------------------------------


def test_default_layers_reproduce_the_paper() -> None:
    assert default_layers(arch_depth("vit_base_patch16_dinov3")) == (8, 11)
    assert default_layers(arch_depth("vit_large_patch16_dinov3")) == (15, 23)
    assert default_layers(4) == (2, 3)  # tiny: mid stays below final
    assert default_layers(1) == (0, 0)


def test_layers_are_configurable_and_checked() -> None:
    assert resolve_layers(TeacherConfig(mid_layer=3, final_layer=9), 12) == (3, 9)
    with pytest.raises(ConfigError, match="0-based"):
        resolve_layers(TeacherConfig(mid_layer=11, final_layer=12), 12)
    with pytest.raises(ConfigError):
        resolve_layers(TeacherConfig(mid_layer=5, final_layer=4), 12)


def test_final_layer_below_the_last_block_is_honoured() -> None:
    cfg = TeacherConfig(tiny=True, mid_layer=1, final_layer=2)
    early = VFMTeacher(cfg)
    captured: list[Tensor] = []
    handle = early.model.blocks[2].register_forward_hook(lambda _m, _i, o: captured.append(o))
    rgb = _rgb()
    with torch.no_grad():
        early.model.forward_features(_normalised(early, rgb))
    handle.remove()
    expected = early.model.norm(captured[0])
    out = early(rgb)
    torch.testing.assert_close(out.cls, expected[:, 0])
    torch.testing.assert_close(out.patch_final, expected[:, early.num_prefix_tokens :])


# --- weights files ---------------------------------------------------------------------------


def _outputs_equal(a: VFMTeacher, b: VFMTeacher) -> None:
    rgb = _rgb()
    out_a, out_b = a(rgb), b(rgb)
    for name in ("cls", "patch_final", "patch_mid"):
        torch.testing.assert_close(getattr(out_a, name), getattr(out_b, name), rtol=0, atol=0)


def test_safetensors_file_loads_the_same_weights(teacher: VFMTeacher, tiny_file: Path) -> None:
    # seed=1 would build other random weights: equality shows the file's weights were loaded.
    loaded = VFMTeacher(TeacherConfig(tiny=True, seed=1, weights=str(tiny_file)))
    _outputs_equal(loaded, teacher)


def test_meta_layout_pth_is_converted(teacher: VFMTeacher, tmp_path: Path) -> None:
    meta = _to_meta_layout(teacher.model.state_dict())
    assert "storage_tokens" in meta and "blocks.0.ls1.gamma" in meta
    path = tmp_path / "dinov3_tiny_pretrain.pth"
    torch.save(meta, path)
    cfg = TeacherConfig(tiny=True, seed=1, weights=str(path))
    check_weights(cfg)
    _outputs_equal(VFMTeacher(cfg), teacher)


def test_timm_layout_pth_and_nested_state_dict_load(teacher: VFMTeacher, tmp_path: Path) -> None:
    path = tmp_path / "tiny_timm.pth"
    torch.save({"model": teacher.model.state_dict()}, path)
    _outputs_equal(VFMTeacher(TeacherConfig(tiny=True, seed=1, weights=str(path))), teacher)


class _Payload:
    """Stands for any pickled object: weights_only=True must refuse to build it."""


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"payload": _Payload()}, path)
    with pytest.raises(ConfigError, match=re.escape(path.name)):
        check_weights(TeacherConfig(tiny=True, weights=str(path)))


def test_weights_digest(teacher: VFMTeacher, tiny_file: Path) -> None:
    loaded = VFMTeacher(TeacherConfig(tiny=True, weights=str(tiny_file)))
    assert loaded.weights_digest() == hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    assert teacher.weights_digest() == VFMTeacher(TINY).weights_digest()
    assert teacher.weights_digest() != VFMTeacher(TeacherConfig(tiny=True, seed=1)).weights_digest()


# --- pre-flight ------------------------------------------------------------------------------


def test_check_weights_missing_file_names_path_arch_and_licence(tmp_path: Path) -> None:
    path = tmp_path / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"
    with pytest.raises(ConfigError) as err:
        check_weights(TeacherConfig(weights=str(path)))
    message = str(err.value)
    assert str(path) in message
    assert "vit_base_patch16_dinov3" in message
    assert "licence" in message.lower() or "license" in message.lower()
    assert "https://ai.meta.com/dinov3/" in message
    with pytest.raises(ConfigError, match=re.escape("https://ai.meta.com/dinov3/")):
        check_weights(TeacherConfig(weights=None))


def test_check_weights_wrong_architecture(tiny_file: Path) -> None:
    check_weights(TeacherConfig(tiny=True, weights=str(tiny_file)))  # the right arch passes
    with pytest.raises(ConfigError) as err:
        check_weights(TeacherConfig(arch="vit_base_patch16_dinov3", weights=str(tiny_file)))
    message = str(err.value)
    assert str(tiny_file) in message and "vit_base_patch16_dinov3" in message
    assert "shape mismatches" in message and "cls_token" in message
    assert "(1, 1, 64)" in message and "(1, 1, 768)" in message
    assert "missing keys" in message and "blocks.4." in message


def test_check_weights_unknown_keys_and_foreign_layouts(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, junk)
    with pytest.raises(ConfigError, match="unexpected keys"):
        check_weights(TeacherConfig(tiny=True, weights=str(junk)))
    hf = tmp_path / "model.safetensors"
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 64)}, hf)
    with pytest.raises(ConfigError, match="transformers layout"):
        check_weights(TeacherConfig(tiny=True, weights=str(hf)))


def test_unknown_arch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a DINOv3 ViT"):
        VFMTeacher(TeacherConfig(arch="resnet50", tiny=True))


def test_mid_equal_to_final_is_allowed() -> None:
    same = VFMTeacher(TeacherConfig(tiny=True, mid_layer=3, final_layer=3))
    out = same(_rgb())
    torch.testing.assert_close(out.patch_mid, out.patch_final, rtol=0, atol=0)


def test_attention_routes_give_timms_matmul_attention(teacher: VFMTeacher) -> None:
    # Reference: timm's own EvaAttention with its unfused (matmul-softmax) path. Candidates:
    # the routed SDPA path (what runs by default) and the step-for-step copy that the xformers
    # route runs, here with the SDPA kernel (xformers needs CUDA).
    rgb = _rgb()
    routed = teacher(rgb)
    attns = [m for m in teacher.model.modules() if isinstance(m, EvaAttention)]
    routes = [attn.forward for attn in attns]
    try:
        for attn in attns:
            attn.forward = functools.partial(_unfused, attn)
        reference = teacher(rgb)
        for attn in attns:
            attn.forward = functools.partial(_copied, attn)
        copied = teacher(rgb)
    finally:
        for attn, route in zip(attns, routes, strict=True):
            attn.forward = route
    for out in (routed, copied):
        torch.testing.assert_close(out.cls, reference.cls, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.patch_mid, reference.patch_mid, rtol=1e-5, atol=1e-5)


def _unfused(attn: EvaAttention, x: Tensor, **kwargs) -> Tensor:
    attn.fused_attn = False
    try:
        return EvaAttention.forward(attn, x, **kwargs)
    finally:
        attn.fused_attn = True


def _copied(attn: EvaAttention, x: Tensor, rope=None, **kwargs) -> Tensor:
    return eva_attention(attn, x, rope, "sdpa")


def test_xformers_without_the_package_is_a_config_error() -> None:
    if xformers_available():
        pytest.skip("xformers is installed here")
    with pytest.raises(ConfigError, match="xformers package is not installed"):
        VFMTeacher(TeacherConfig(tiny=True, attention="xformers"))
