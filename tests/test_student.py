"""Student backbone: torchvision's Swin function, any crop size with one set of weights, two
embeddings over shared stages, and the attention kernel switch.

The reference for the function is torchvision itself: its ``shifted_window_attention`` (a
matmul-softmax), run on the same modules by restoring their torchvision class. The released
model's function at its real size is checked against torchgeo's code in test_torchgeo_deo.py.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import pytest
import torch
import torchvision
from torchvision.models.swin_transformer import ShiftedWindowAttention
from torchvision.ops import StochasticDepth

from deo.errors import ConfigError
from deo.models.attention import resolve_kernel, xformers_available
from deo.models.student import (
    TORCHVISION_ARCHS,
    DualEmbedSwin,
    StudentConfig,
    WindowAttention,
    window_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")

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
    model = DualEmbedSwin(cfg, with_rgb=with_rgb).eval()
    # Position tables far from their 0.02 init, so relative positions and masks matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_()
    return model


def ms(px: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 10, px, px, generator=torch.Generator().manual_seed(seed))


def rgb(px: int, batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(seed))


def as_torchvision(model: DualEmbedSwin) -> DualEmbedSwin:
    """A copy whose attention modules run torchvision's own forward (matmul attention)."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, WindowAttention):
            module.__class__ = ShiftedWindowAttention
    return reference


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


def test_paper_student_is_torchvision_swin_b_with_window_12() -> None:
    # Built on the meta device: only the structure is checked, no weights are materialised.
    cfg = StudentConfig(arch="swin_b", window_size=12, img_size=224, drop_path_rate=0.5)
    with torch.device("meta"):
        model = DualEmbedSwin(cfg)
    assert model.stage_dims == (128, 256, 512, 1024)
    assert model.distill_dims == (1024, 1024, 512)
    n_params = sum(p.numel() for p in model.parameters())
    assert 86e6 < n_params < 88e6, n_params
    # torchgeo's DEO: 355 tensors (both embeddings, position indices, final norm, no head).
    assert len(model.state_dict()) == 355
    attns = [m for m in model.modules() if isinstance(m, WindowAttention)]
    assert all(a.window_size == [12, 12] for a in attns)
    assert [a.shift_size for a in attns[:2]] == [[0, 0], [6, 6]]
    # torchvision's stochastic depth: linear from 0 to the rate over the 24 blocks.
    drops = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert drops == pytest.approx([0.5 * i / 23 for i in range(24)])


@pytest.mark.parametrize("arch", sorted(TORCHVISION_ARCHS))
def test_arch_widths_are_torchvisions_builders(arch: str) -> None:
    with torch.device("meta"):
        ours = DualEmbedSwin(StudentConfig(arch=arch, window_size=7))
        theirs = getattr(torchvision.models, arch)()
    shapes = {k: v.shape for k, v in ours.state_dict().items() if k.startswith("features.")}
    expected = {
        f"features.{int(k.split('.')[1]) - 1}.{k.split('.', 2)[2]}": v.shape
        for k, v in theirs.state_dict().items()
        if k.startswith("features.") and not k.startswith("features.0.")
    }
    assert shapes == expected


@pytest.mark.parametrize("window", [7, 12])
@pytest.mark.parametrize("size", [(24, 24), (12, 12), (6, 6), (3, 3), (13, 19), (56, 56)])
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_equals_torchvisions(window: int, size: tuple, shifted: bool) -> None:
    torch.manual_seed(window)
    shift = [window // 2] * 2 if shifted else [0, 0]
    module = WindowAttention(8, [window, window], shift, num_heads=2).eval()
    with torch.no_grad():
        module.relative_position_bias_table.normal_()
        module.qkv.bias.normal_()
        x = torch.randn(2, *size, 8)
        ours = window_attention(module, x, resolve_kernel("sdpa", x.device))
        reference = ShiftedWindowAttention.forward(module, x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_student_is_torchvisions_function_at_padded_sizes(windowed: DualEmbedSwin) -> None:
    reference = as_torchvision(windowed)
    with torch.no_grad():
        for x, modality in ((ms(224), "ms"), (ms(96), "ms"), (rgb(100), "rgb")):
            ours, theirs = windowed(x, modality), reference(x, modality)
            for a, b in zip(ours.stages, theirs.stages, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.pooled, theirs.pooled, rtol=1e-4, atol=1e-5)


def test_padding_is_attended_to_as_in_torchvision() -> None:
    # A 7x7 map in one 12x12 window: torchvision zero-pads to 144 tokens and every query
    # attends to all 144 keys, the 95 padding keys being the qkv bias alone. Written out by
    # hand on the padded window, and contrasted with attention over the 49 real keys only.
    torch.manual_seed(0)
    dim, win = 8, 12
    module = WindowAttention(dim, [win, win], [0, 0], num_heads=1).eval()
    with torch.no_grad():
        module.relative_position_bias_table.normal_()
        module.qkv.bias.normal_()
        x = torch.randn(1, 7, 7, dim)
        ours = window_attention(module, x, "sdpa")[0].reshape(49, dim)

        tokens = torch.zeros(win, win, dim)
        tokens[:7, :7] = x[0]
        q, k, v = module.qkv(tokens.reshape(win * win, dim)).split(dim, dim=-1)
        rows, cols = torch.arange(win).repeat_interleave(win), torch.arange(win).repeat(win)
        table = module.relative_position_bias_table[:, 0]
        bias = table[
            (rows[:, None] - rows[None, :] + win - 1) * (2 * win - 1)
            + (cols[:, None] - cols[None, :] + win - 1)
        ]
        logits = q @ k.T / math.sqrt(dim) + bias
        real = ((rows < 7) & (cols < 7)).nonzero().flatten()
        attended = module.proj(logits.softmax(-1) @ v)[real]
        masked_logits = logits[:, real]
        masked = module.proj(masked_logits.softmax(-1) @ v[real])[real]
    torch.testing.assert_close(ours, attended, rtol=1e-5, atol=1e-5)
    assert (ours - masked).abs().max() > 1e-2


def test_attention_settings_resolve_and_fail_clearly() -> None:
    cpu = torch.device("cpu")
    assert resolve_kernel("sdpa", cpu) == "sdpa"
    assert resolve_kernel("auto", cpu) == "sdpa"
    with pytest.raises(ConfigError, match="not one of"):
        resolve_kernel("flash", cpu)
    if xformers_available():
        with pytest.raises(ConfigError, match="CUDA only"):
            resolve_kernel("xformers", cpu)
    else:
        with pytest.raises(ConfigError, match="not installed"):
            DualEmbedSwin(replace(TINY, attention="xformers"))


@pytest.mark.skipif(
    not (torch.cuda.is_available() and xformers_available()), reason="needs CUDA and xformers"
)
def test_xformers_equals_sdpa_on_gpu() -> None:
    model = build(narrow(12)).cuda()
    x = ms(96, batch=2).cuda()
    with torch.no_grad():
        model.set_attention("sdpa")
        sdpa = model(x)
        model.set_attention("xformers")
        xformers = model(x)
    for a, b in zip(sdpa.stages, xformers.stages, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tiny_demo_config_is_fast_at_tiny_crops() -> None:
    model = build(TINY)
    with torch.no_grad():
        model(ms(32))  # warm-up
        for px, sizes in ((32, [8, 4, 2, 1]), (16, [4, 2, 1, 1])):
            start = time.perf_counter()
            feats = model(ms(px, batch=4))
            assert time.perf_counter() - start < 1.0
            assert [s.shape[-1] for s in feats.stages] == sizes


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
    stage_param = model.features[0][0].attn.qkv.weight
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
    assert {k.split(".")[0] for k in state} == {"ms_embed", "rgb_embed", "features", "norm"}
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
    with pytest.raises(ValueError, match="not a torchvision Swin"):
        DualEmbedSwin(StudentConfig(arch="swin_base_patch4_window12_384"))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(ms(30))
