"""Student backbone: any crop size with one set of weights, two embeddings over shared stages."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest
import timm
import torch

from deo.models.student import DualEmbedSwin, StudentConfig, _window_attention

# Narrow but full-depth-pattern Swin: the window/size logic depends on grids, not widths.
NARROW = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)}
# The CPU demo's size: crops of 32 and 16 px.
TINY = StudentConfig(
    embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, img_size=32
)


def narrow(window: int, **kw) -> StudentConfig:
    return StudentConfig(window_size=window, drop_path_rate=0.0, **NARROW, **kw)


def build(cfg: StudentConfig, seed: int = 0, with_rgb: bool = True) -> DualEmbedSwin:
    torch.manual_seed(seed)
    return DualEmbedSwin(cfg, with_rgb=with_rgb).eval()


def ms(px: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 10, px, px, generator=torch.Generator().manual_seed(seed))


def rgb(px: int, batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[7, 12], ids=["window7", "window12"])
def windowed(request: pytest.FixtureRequest) -> DualEmbedSwin:
    """A narrow student per window size, built once per module (building dominates runtime)."""
    return build(narrow(request.param))


def test_shapes_at_global_local_and_eval_sizes(windowed: DualEmbedSwin) -> None:
    with torch.no_grad():
        for px, modality, x in (
            (224, "ms", ms(224)),
            (96, "ms", ms(96)),
            (96, "rgb", rgb(96)),
            (256, "ms", ms(256)),
        ):
            feats = windowed(x, modality=modality)
            grid = px // 4
            for i, stage in enumerate(feats.stages):
                assert stage.shape == (1, 16 * 2**i, grid, grid), (px, i)
                grid = math.ceil(grid / 2)
            assert feats.pooled.shape == (1, windowed.num_features)
            assert all(torch.isfinite(s).all() for s in feats.stages)
            assert feats.patch_final is feats.stages[-1]
            assert feats.patch_mid is feats.stages[-2]


def test_no_state_leaks_between_input_sizes(windowed: DualEmbedSwin) -> None:
    with torch.no_grad():
        before = windowed(ms(224))
        windowed(ms(96))
        windowed(rgb(256), modality="rgb")
        after = windowed(ms(224))
    assert torch.equal(before.pooled, after.pooled)
    for a, b in zip(before.stages, after.stages, strict=True):
        assert torch.equal(a, b)


def test_paper_arch_dims_come_from_the_arch_and_window_from_the_config() -> None:
    # Built on the meta device: only the structure is checked, no weights are materialised.
    with torch.device("meta"):
        model = DualEmbedSwin(
            StudentConfig(arch="swin_base_patch4_window12_384", window_size=12, img_size=224)
        )
    assert model.stage_dims == (128, 256, 512, 1024)
    assert model.distill_dims == (1024, 1024, 512)
    windows = [block.window_size for stage in model.layers for block in stage.blocks]
    # 12 where the 224 px grid is larger (56, 28, 14), clipped to the 7x7 last stage.
    assert windows[0] == (12, 12) and windows[-1] == (7, 7)


def test_tiny_demo_config_is_fast_at_tiny_crops() -> None:
    model = build(TINY)
    with torch.no_grad():
        model(ms(32))  # warm-up
        for px, sizes in ((32, [8, 4, 2, 1]), (16, [4, 2, 1, 1])):
            start = time.perf_counter()
            feats = model(ms(px, batch=4))
            assert time.perf_counter() - start < 1.0
            assert [s.shape[-1] for s in feats.stages] == sizes


def test_equals_timm_swin_where_windows_divide_the_grid() -> None:
    # At 224 px with window 7 no padding is needed: the per-call window logic must reproduce
    # timm's own forward exactly, given the same weights under timm's names.
    model = build(narrow(7), with_rgb=False)
    reference = timm.create_model(
        model.cfg.arch, pretrained=False, num_classes=0, in_chans=10, drop_path_rate=0.0, **NARROW
    ).eval()
    state = {k.replace("ms_embed.", "patch_embed."): v for k, v in model.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    x = ms(224, batch=2)
    with torch.no_grad():
        feats = model(x)
        expected = reference.forward_features(x)  # (B, H, W, C), final norm applied
    got = model.norm(feats.patch_final.permute(0, 2, 3, 1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(feats.pooled, expected.mean(dim=(1, 2)), rtol=0, atol=1e-5)


def test_padding_tokens_are_invisible() -> None:
    # A 3x3 map (96 px, last stage) in a 7x7 window: attention must equal plain attention over
    # the 9 real tokens with the matching entries of the relative-position table.
    model = build(narrow(7))
    block = model.layers[3].blocks[0]
    attn = block.attn
    x = torch.randn(2, 3, 3, block.dim)
    with torch.no_grad():
        got = _window_attention(block, x)
        tokens = x.reshape(2, 9, -1)
        q, k, v = attn.qkv(tokens).reshape(2, 9, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        rows, cols = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        win = attn.window_size[0]
        index = (rows[:, None] - rows[None] + win - 1) * (2 * win - 1) + (
            cols[:, None] - cols[None] + win - 1
        )
        bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, 9, 9)
        weights = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 9, -1)).reshape(x.shape)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_shifted_windows_do_not_cross_the_wraparound_seam() -> None:
    # 10 rows, window 7, shifted block: the roll moves rows 0-2 next to row 9 and padding
    # completes their window. Row 0 may influence its image neighbours, never row 9.
    model = build(narrow(7))
    block = model.layers[0].blocks[1]
    assert any(block.target_shift_size)
    x = torch.randn(1, 10, 10, block.dim)
    bumped = x.clone()
    bumped[:, 0] += 3.0
    with torch.no_grad():
        delta = (_window_attention(block, bumped) - _window_attention(block, x)).abs()
    assert delta[:, 9].max() == 0
    assert delta[:, 1].max() > 0


def test_pooled_is_layer_norm_then_token_mean_of_last_stage() -> None:
    model = build(TINY)
    with torch.no_grad():
        feats = model(ms(32, batch=3))
        tokens = feats.stages[-1].flatten(2).transpose(1, 2)  # (B, N, C)
        mean = tokens.mean(dim=-1, keepdim=True)
        var = tokens.var(dim=-1, unbiased=False, keepdim=True)
        normed = (tokens - mean) / torch.sqrt(var + model.norm.eps)
        normed = normed * model.norm.weight + model.norm.bias
    torch.testing.assert_close(feats.pooled, normed.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_rgb_and_ms_share_the_stages() -> None:
    model = build(TINY)
    assert model.embedding("ms") is not model.embedding("rgb")
    # One set of stage modules, whichever embedding ran.
    stage_param = model.layers[0].blocks[0].attn.qkv.weight
    assert sum(p is stage_param for p in model.parameters()) == 1

    model.zero_grad()
    model(rgb(32, batch=2), modality="rgb").pooled.square().sum().backward()
    assert all(p.grad is None for p in model.ms_embed.parameters())
    assert all(p.grad is not None for p in model.rgb_embed.parameters())
    assert stage_param.grad is not None and stage_param.grad.abs().sum() > 0
    rgb_grad = stage_param.grad.clone()

    model.zero_grad(set_to_none=True)
    model(ms(32, batch=2)).pooled.square().sum().backward()
    assert all(p.grad is None for p in model.rgb_embed.parameters())
    assert all(p.grad is not None for p in model.ms_embed.parameters())
    assert stage_param.grad.data_ptr() != rgb_grad.data_ptr()
    assert stage_param.grad.abs().sum() > 0


def test_ms_only_backbone_has_no_rgb_parameters() -> None:
    teacher = build(TINY, with_rgb=False)
    student = build(TINY)
    names = {n for n, _ in teacher.named_parameters()}
    assert not any(n.startswith("rgb_embed") for n in names)
    # The EMA teacher pairs its parameters with the student's by name.
    assert names < {n for n, _ in student.named_parameters()}
    with pytest.raises(ValueError, match="with_rgb=False"):
        teacher(rgb(32), modality="rgb")


def test_backbone_state_dict_round_trips() -> None:
    source = build(TINY, seed=0)
    state = source.backbone_state_dict()
    assert {k.split(".")[0] for k in state} == {"ms_embed", "rgb_embed", "layers", "norm"}
    fresh = build(TINY, seed=123)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        for modality, x in (("ms", ms(32)), ("rgb", rgb(32))):
            a, b = source(x, modality=modality), fresh(x, modality=modality)
            assert torch.equal(a.pooled, b.pooled)
            assert all(torch.equal(s, t) for s, t in zip(a.stages, b.stages, strict=True))


def test_bad_inputs_and_config_fail_clearly() -> None:
    model = build(TINY)
    with pytest.raises(ValueError, match=r"\(B, 10, H, W\)"):
        model(rgb(32))  # 3 channels into the MS embedding
    with pytest.raises(ValueError, match="last stage"):
        DualEmbedSwin(replace(TINY, mid_stage=-1))
    with pytest.raises(ValueError, match="outside"):
        DualEmbedSwin(replace(TINY, mid_stage=4))
    with pytest.raises(ValueError, match="not a timm SwinTransformer"):
        DualEmbedSwin(StudentConfig(arch="vit_tiny_patch16_224"))
