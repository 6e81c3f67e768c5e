"""The authors' training recipe, item by item, against independent computations.

[cls] distillation over every view (explicit double loop over the student's RGB-path views),
the EMA teacher's stochastic depth, per-tensor gradient clipping, weight-decay groups and the
precision fallback. The loss formula itself is in test_losses.py, the heads in test_heads.py.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import pytest
import torch
from fakes import TINY_TEACHER, TINY_TRAIN
from torch import Tensor, nn

from deo.data.augment import MultiCropBatch
from deo.models.student import DualEmbedSwin, StudentConfig
from deo.models.teacher import VFMTeacher
from deo.train.config import parse_teacher, parse_train
from deo.train.distributed import DistContext
from deo.train.loop import _precision
from deo.train.meta_arch import DualTeacherDistillation
from deo.train.optim import clip_gradients, param_groups

BATCH, N_LOCAL = 3, 2


def build(**overrides: object) -> DualTeacherDistillation:
    cfg = parse_train({**TINY_TRAIN, **overrides})
    return DualTeacherDistillation(cfg, VFMTeacher(parse_teacher(TINY_TEACHER)))


def views(seed: int = 0) -> MultiCropBatch:
    """Hand-built views: the optical input of each view is its channels 0-2 (contract C2)."""
    g = torch.Generator().manual_seed(seed)
    global_ms = [torch.randn(BATCH, 10, 32, 32, generator=g) for _ in range(2)]
    local_ms = [torch.randn(BATCH, 10, 16, 16, generator=g) for _ in range(N_LOCAL)]
    return MultiCropBatch(
        global_ms=global_ms,
        global_rgb=[v[:, :3] for v in global_ms],
        local_ms=local_ms,
        local_rgb=[v[:, :3] for v in local_ms],
        global_params=[],
    )


def cosine(x: Tensor, y: Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def cls_pairs_by_loop(student_cls: list[Tensor], vfm_cls: list[Tensor]) -> tuple[float, int]:
    """DistLoss by hand: every (VFM global view g, student view v) with v != g, batch-averaged."""
    total, pairs = 0.0, 0
    for g, target in enumerate(vfm_cls):
        for v, mine in enumerate(student_cls):
            if v == g:
                continue
            total += sum(cosine(target[b], mine[b]) for b in range(BATCH)) / BATCH
            pairs += 1
    return total / pairs, pairs


@torch.no_grad()
def test_cls_is_distilled_from_every_view_of_the_rgb_path() -> None:
    model = build()
    batch = views()
    terms = model(batch)
    student = model.student
    head = student.distill.heads["cls"]
    # each view on its own through the RGB embedding, the shared stages and the [cls] head
    student_cls = [head(student.backbone(v, "rgb").pooled) for v in batch.global_rgb]
    student_cls += [head(student.backbone(v, "rgb").pooled) for v in batch.local_rgb]
    vfm_cls = [model.vfm(v, normalised=True).cls for v in batch.global_rgb]
    expected, pairs = cls_pairs_by_loop(student_cls, vfm_cls)
    assert pairs == 2 * (2 + N_LOCAL) - 2
    assert terms["cls"].item() == pytest.approx(expected, abs=1e-6)

    global_only = build(loss={"cls_views": "global"})
    global_only.load_state_dict(model.state_dict())
    expected_global, pairs = cls_pairs_by_loop(student_cls[:2], vfm_cls)
    assert pairs == 2
    assert global_only(batch)["cls"].item() == pytest.approx(expected_global, abs=1e-6)
    assert expected_global != pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def test_patch_terms_project_the_global_rgb_stage_maps_then_resize() -> None:
    model = build()
    batch = views(3)
    terms = model(batch)
    heads = model.student.distill.heads
    for name in ("patch_final", "patch_mid"):
        total, count = 0.0, 0
        for view in batch.global_rgb:
            feats = model.student.backbone(view, "rgb")
            target = getattr(model.vfm(view, normalised=True), name)  # (B, P, D)
            fmap = getattr(feats, name)  # (B, C, h, w)
            projected = heads[name](fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            grid = model.vfm(view, normalised=True).grid
            resized = nn.functional.interpolate(projected, size=grid, mode="bilinear")
            for b in range(BATCH):
                for row in range(grid[0]):
                    for col in range(grid[1]):
                        token = target[b, row * grid[1] + col]
                        total += cosine(resized[b, :, row, col], token)
                        count += 1
        assert terms[name].item() == pytest.approx(total / count, abs=1e-6)


@torch.no_grad()
def test_without_optical_path_the_ms_views_give_the_cls() -> None:
    model = build(ablation={"optical_path": False, "vfm_patches": False})
    batch = views(1)
    head = model.student.distill.heads["cls"]
    student_cls = [head(model.student.backbone(v, "ms").pooled) for v in batch.global_ms]
    student_cls += [head(model.student.backbone(v, "ms").pooled) for v in batch.local_ms]
    vfm_cls = [model.vfm(v, normalised=True).cls for v in batch.global_rgb]
    expected, _ = cls_pairs_by_loop(student_cls, vfm_cls)
    assert model(batch)["cls"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("ema_drop_path", [True, False])
@torch.no_grad()
def test_ema_teacher_stochastic_depth_switch(ema_drop_path: bool) -> None:
    student = {**TINY_TRAIN["student"], "drop_path_rate": 0.5}
    model = build(student=student, ema_drop_path=ema_drop_path)
    assert model.student.training
    assert model.teacher.training is ema_drop_path
    model.eval()
    assert not model.teacher.training and not model.student.training
    model.train()
    assert model.teacher.training is ema_drop_path
    x = torch.cat(views(2).global_ms)
    torch.manual_seed(0)
    first = model.teacher(x)
    second = model.teacher(x)
    assert torch.equal(first, second) is not ema_drop_path


def grads_of(*norms: float) -> list[nn.Parameter]:
    params = []
    for i, norm in enumerate(norms):
        p = nn.Parameter(torch.zeros(3, 4))
        direction = torch.randn(3, 4, generator=torch.Generator().manual_seed(i))
        p.grad = direction / direction.norm() * norm
        params.append(p)
    return params


def test_per_tensor_clipping_bounds_each_gradient_on_its_own() -> None:
    params = grads_of(10.0, 1.0, 2.9)
    before = [p.grad.clone() for p in params]
    total = clip_gradients(params, 3.0, "per_tensor")
    assert float(total) == pytest.approx((100 + 1 + 2.9**2) ** 0.5)
    for p, g in zip(params, before, strict=True):
        norm = float(g.norm())
        factor = 3.0 / (norm + 1e-6) if 3.0 / (norm + 1e-6) < 1 else 1.0  # DINO's clip_gradients
        torch.testing.assert_close(p.grad, g * factor)
    assert float(params[0].grad.norm()) == pytest.approx(3.0, rel=1e-6)


def test_global_clipping_scales_all_gradients_together_and_zero_disables() -> None:
    params = grads_of(10.0, 1.0)
    total = clip_gradients(params, 3.0, "global")
    assert float(total) == pytest.approx(101**0.5)
    assert float(params[1].grad.norm()) == pytest.approx(3.0 / 101**0.5, rel=1e-5)
    untouched = grads_of(10.0, 1.0)
    for mode in ("per_tensor", "global"):
        clip_gradients(untouched, 0.0, mode)  # type: ignore[arg-type]
        assert float(untouched[0].grad.norm()) == pytest.approx(10.0)


def test_weight_decay_groups_follow_the_authors_or_exempt_the_tables() -> None:
    cfg = StudentConfig(
        embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4, img_size=32
    )
    model = DualEmbedSwin(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    tables = {n for n in names.values() if "relative_position_bias_table" in n}
    one_d = {n for n, p in model.named_parameters() if p.ndim == 1}
    assert tables and all(model.get_parameter(n).ndim == 2 for n in tables)
    for decay_tables in (True, False):
        groups = param_groups(model, decay_tables)
        decay = {names[id(p)] for p in groups[0]["params"]}
        no_decay = {names[id(p)] for p in groups[1]["params"]}
        assert groups[0]["apply_wd"] and not groups[1]["apply_wd"]
        assert decay | no_decay == set(names.values()) and not decay & no_decay
        assert one_d <= no_decay  # biases and norms never decay
        assert "ms_embed.proj.weight" in decay and "rgb_embed.proj.weight" in decay
        assert (tables <= decay) is decay_tables and (tables <= no_decay) is not decay_tables


def test_precision_on_cpu_falls_back_to_float32_and_says_so(caplog) -> None:
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for precision in ("fp16", "bf16"):
        with caplog.at_level(logging.WARNING, logger="deo.train.loop"):
            scaler, autocast = _precision(precision, ctx)
        assert not scaler.is_enabled() and isinstance(autocast, nullcontext)
        assert f"train.precision {precision} applies on CUDA only" in caplog.text
    caplog.clear()
    _precision("fp32", ctx)
    assert not caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast and GradScaler are CUDA-only")
def test_fp16_on_cuda_uses_a_grad_scaler() -> None:
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    scaler, autocast = _precision("fp16", ctx)
    assert scaler.is_enabled() and autocast.fast_dtype == torch.float16
    scaler, autocast = _precision("bf16", ctx)
    assert not scaler.is_enabled() and autocast.fast_dtype == torch.bfloat16
