"""Heads: SimDINO projection, the authors' DINO-MLP distillation heads, the grid resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deo.models.heads import (
    DistillHeads,
    HeadSwitches,
    ProjectionHead,
    TokenHead,
    to_token_grid,
)
from deo.models.student import DualEmbedSwin, StudentConfig, StudentFeatures


def fake_features(batch: int = 2) -> StudentFeatures:
    """Stage maps of a 4-stage Swin at 224 px, widths 8/16/32/64."""
    stages = [torch.randn(batch, 8 * 2**i, 56 // 2**i, 56 // 2**i) for i in range(4)]
    return StudentFeatures(pooled=torch.randn(batch, 64), stages=stages, mid_stage=-2)


def test_projection_head_is_three_linears_with_unit_norm_output() -> None:
    head = ProjectionHead(in_dim=64, hidden_dim=128, out_dim=32)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 128), (128, 32)]
    assert sum(isinstance(m, nn.GELU) for m in head.modules()) == 2
    # No DINO prototype layer: nothing weight-normed, nothing after the bottleneck.
    names = [n for n, _ in head.named_parameters()]
    assert not any("weight_g" in n or "parametrizations" in n for n in names)
    assert isinstance(list(head.mlp)[-1], nn.Linear)
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))


def test_projection_head_defaults_follow_simdino() -> None:
    head = ProjectionHead(in_dim=16)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [2048, 2048, 256]
    with pytest.raises(ValueError, match="n_layers"):
        ProjectionHead(in_dim=16, n_layers=0)


def test_token_head_is_layernorm_then_one_linear() -> None:
    head = TokenHead(32, 48)
    assert [type(m) for m in head.proj] == [nn.LayerNorm, nn.Linear]
    x = torch.randn(2, 7, 32)
    ln, linear = head.proj
    torch.testing.assert_close(head(x), linear(F.layer_norm(x, (32,), ln.weight, ln.bias)))


def mlp_by_hand(head: ProjectionHead, x: torch.Tensor) -> torch.Tensor:
    """The authors' DINOHead forward written out: Linear, GELU, Linear, GELU, Linear, L2."""
    w = [m for m in head.mlp if isinstance(m, nn.Linear)]
    h = F.gelu(x @ w[0].weight.T + w[0].bias)
    h = F.gelu(h @ w[1].weight.T + w[1].bias)
    out = h @ w[2].weight.T + w[2].bias
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def test_distill_heads_are_dino_mlps_applied_before_the_resize() -> None:
    heads = DistillHeads((64, 64, 32), vfm_dim=24, switches=HeadSwitches(), hidden_dim=40)
    for name, in_dim in (("cls", 64), ("patch_final", 64), ("patch_mid", 32)):
        linears = [m for m in heads.heads[name].modules() if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [
            (in_dim, 40),
            (40, 40),
            (40, 24),
        ]
    feats = fake_features()
    grid = (14, 14)
    out = heads(feats, grid)
    torch.testing.assert_close(out["cls"], mlp_by_hand(heads.heads["cls"], feats.pooled))
    for name, fmap in (("patch_final", feats.patch_final), ("patch_mid", feats.patch_mid)):
        # each token through the MLP at the student's own resolution, then bilinear to the grid
        h, w = fmap.shape[-2:]
        tokens = torch.stack(
            [
                torch.stack(
                    [mlp_by_hand(heads.heads[name], fmap[:, :, i, j]) for j in range(w)], -1
                )
                for i in range(h)
            ],
            -2,
        )  # (B, D, H, W)
        resized = F.interpolate(tokens, size=grid, mode="bilinear", align_corners=False)
        expected = resized.flatten(2).transpose(1, 2)
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)
    # at the student's own grid the patch tokens are unit vectors; resized ones need not be
    same = heads(feats, tuple(feats.patch_mid.shape[-2:]))["patch_mid"]
    torch.testing.assert_close(same.norm(dim=-1), torch.ones(same.shape[:2]))
    # the order matters: resizing first and then projecting gives something else
    resized_first = heads.heads["patch_final"](to_token_grid(feats.patch_final, grid))
    assert not torch.allclose(resized_first, out["patch_final"], atol=1e-4)


def test_local_views_get_the_cls_head_only() -> None:
    heads = DistillHeads((64, 64, 32), vfm_dim=24, switches=HeadSwitches())
    assert heads.has_cls
    assert set(heads(fake_features(), None)) == {"cls"}
    assert not DistillHeads((64, 64, 32), 24, HeadSwitches(cls=False)).has_cls


def test_linear_distill_heads_switch() -> None:
    heads = DistillHeads((64, 64, 32), vfm_dim=24, switches=HeadSwitches(), kind="linear")
    assert all(isinstance(h, TokenHead) for h in heads.heads.values())
    assert heads(fake_features(), (7, 7))["patch_mid"].shape == (2, 49, 24)
    with pytest.raises(ValueError, match="mlp or linear"):
        DistillHeads((64, 64, 32), vfm_dim=24, switches=HeadSwitches(), kind="conv")


@pytest.mark.parametrize("grid", [(14, 14), (3, 5), (7, 7)])
def test_to_token_grid_matches_interpolate_then_flatten(grid: tuple[int, int]) -> None:
    fmap = torch.randn(2, 6, 7, 7)
    expected = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
    expected = expected.reshape(2, 6, grid[0] * grid[1]).permute(0, 2, 1)
    torch.testing.assert_close(to_token_grid(fmap, grid), expected)


def test_to_token_grid_is_row_major_like_a_vit() -> None:
    fmap = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    fmap = torch.cat([fmap, 10 * fmap], dim=1)  # two channels
    tokens = to_token_grid(fmap, (2, 2))
    assert tokens.shape == (1, 4, 2)
    assert tokens[0, :, 0].tolist() == [1.0, 2.0, 3.0, 4.0]  # (0,0) (0,1) (1,0) (1,1)
    assert tokens[0, :, 1].tolist() == [10.0, 20.0, 30.0, 40.0]


def test_to_token_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="B, C, H, W"):
        to_token_grid(torch.randn(2, 49, 8), (7, 7))
    with pytest.raises(ValueError, match="positive"):
        to_token_grid(torch.randn(1, 8, 7, 7), (0, 7))


@pytest.mark.parametrize("grid", [(14, 14), (6, 4)])
def test_distill_heads_output_shapes_follow_the_grid_passed(grid: tuple[int, int]) -> None:
    heads = DistillHeads((64, 64, 32), vfm_dim=24, switches=HeadSwitches(), hidden_dim=32)
    out = heads(fake_features(), grid)
    n_tokens = grid[0] * grid[1]
    assert set(out) == {"cls", "patch_final", "patch_mid"}
    assert out["cls"].shape == (2, 24)
    assert out["patch_final"].shape == (2, n_tokens, 24)
    assert out["patch_mid"].shape == (2, n_tokens, 24)


def test_switched_off_heads_do_not_exist() -> None:
    switches = HeadSwitches(cls=True, patch_final=False, patch_mid=False)
    heads = DistillHeads((64, 64, 32), vfm_dim=24, switches=switches)
    keys = heads.state_dict().keys()
    assert keys and all(k.startswith("heads.cls.") for k in keys)
    assert set(heads(fake_features(), (14, 14))) == {"cls"}

    none = DistillHeads((64, 64, 32), vfm_dim=24, switches=HeadSwitches(False, False, False))
    assert not list(none.parameters())
    assert none(fake_features(), (14, 14)) == {}


def test_heads_take_their_widths_from_the_student() -> None:
    with pytest.raises(ValueError, match="pooled"):
        DistillHeads((64, 64), vfm_dim=24, switches=HeadSwitches())
    cfg = StudentConfig(
        embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4, img_size=32
    )
    student = DualEmbedSwin(cfg)
    heads = DistillHeads(student.distill_dims, vfm_dim=12, switches=HeadSwitches(), hidden_dim=16)
    out = heads(student(torch.randn(2, 3, 32, 32), modality="rgb"), (2, 2))
    assert out["cls"].shape == (2, 12)
    assert out["patch_final"].shape == out["patch_mid"].shape == (2, 4, 12)
    out["patch_mid"].sum().backward()  # the mid head's gradient reaches the RGB embedding
    assert student.rgb_embed.proj.weight.grad is not None
