"""Loss terms against independent computations: explicit loops, torch.logdet, numpy slogdet."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from deo.losses import (
    CovarianceLayout,
    LossWeights,
    cls_distillation,
    coding_rate,
    compression,
    dual_teacher_loss,
    expansion,
    mcr_loss,
    patch_distillation,
)

RTOL = 1e-5


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(actual: Tensor | float, expected: Tensor | float) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=RTOL,
        atol=1e-12,
    )


def unit(x: Tensor) -> Tensor:
    """Rows divided by their norms, as the projection heads' outputs are."""
    return x / x.norm(dim=-1, keepdim=True)


def cosine(x: Tensor, y: Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def rate_by_logdet(z: Tensor, eps: float, world_size: int) -> Tensor:
    """½·logdet(I + p/(B·N·eps)·ZᵀZ)·(p + N·B)/(p·N·B) with torch.logdet."""
    batch, dim = z.shape
    zn = z
    a = dim / (batch * world_size * eps)
    scale = (dim + world_size * batch) / (dim * world_size * batch)
    return 0.5 * torch.logdet(torch.eye(dim, dtype=z.dtype) + a * zn.T @ zn) * scale


def rate_by_numpy(z: np.ndarray, eps: float, world_size: int) -> float:
    batch, dim = z.shape
    zn = z
    sign, logdet = np.linalg.slogdet(np.eye(dim) + dim / (batch * world_size * eps) * zn.T @ zn)
    assert sign == 1
    return 0.5 * logdet * (dim + world_size * batch) / (dim * world_size * batch)


def compression_by_loops(student: Tensor, teacher: Tensor) -> float:
    total, pairs = 0.0, 0
    for g in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if g == v:
                continue
            batch = student.shape[1]
            total += sum(cosine(teacher[g, b], student[v, b]) for b in range(batch)) / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize(("batch", "dim"), [(16, 8), (5, 12)])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_coding_rate_matches_logdet_and_numpy(
    world_size: int, batch: int, dim: int, eps: float
) -> None:
    z = 3.0 * randn(batch, dim, seed=batch + dim)
    rate = coding_rate(z, eps, world_size)  # N = world_size, local covariance
    assert rate.shape == ()
    close(rate, rate_by_logdet(z, eps, world_size))
    close(rate, rate_by_numpy(z.numpy(), eps, world_size))


def test_coding_rate_upcasts_low_precision() -> None:
    z = randn(32, 16, seed=1)
    rate = coding_rate(z.to(torch.bfloat16), 0.05)
    assert rate.dtype == torch.float32
    expected = rate_by_logdet(z.to(torch.bfloat16).double(), 0.05, 1)
    torch.testing.assert_close(rate.double(), expected, rtol=1e-4, atol=0)


def test_coding_rate_collapsed_is_minimum_and_orthogonal_is_maximum() -> None:
    dim, batch, eps = 8, 32, 0.05
    scale = (dim + batch) / (dim * batch)
    # rows of unit norm give trace(a·ZᵀZ) = a·B; logdet is concave in the eigenvalues, so one
    # direction (rank one) is the minimum and equal eigenvalues (orthogonal spread) the maximum
    collapsed = unit(randn(1, dim, seed=2)).expand(batch, dim)
    spread = torch.eye(dim, dtype=torch.float64).repeat(batch // dim, 1)
    low = coding_rate(collapsed, eps)
    high = coding_rate(spread, eps)
    close(low, 0.5 * math.log(1 + dim / eps) * scale)
    close(high, 0.5 * dim * math.log(1 + 1 / eps) * scale)
    random_rates = [coding_rate(unit(randn(batch, dim, seed=s)), eps) for s in range(5)]
    assert all(low < r < high for r in random_rates)


def test_coding_rate_gradient_is_exact() -> None:
    z = randn(6, 4, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: coding_rate(x, 0.5), (z,))


def test_coding_rate_rejects_nan() -> None:
    z = randn(8, 4, seed=4)
    z[2, 1] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        coding_rate(z, 0.05)


@pytest.mark.parametrize(("views", "n_global"), [(2, 2), (6, 2), (4, 1)])
def test_compression_matches_loops(views: int, n_global: int) -> None:
    student, teacher = randn(views, 5, 7, seed=5), randn(n_global, 5, 7, seed=6)
    close(compression(student, teacher), compression_by_loops(student, teacher))


def test_compression_excludes_the_diagonal() -> None:
    x = randn(4, 8, seed=7)
    # every cross pair is aligned and every diagonal pair is opposite: 1 without the
    # diagonal, 0 with it
    teacher = torch.stack([x, -2.0 * x])
    student = torch.stack([-0.5 * x, 3.0 * x])
    close(compression(student, teacher), 1.0)
    identical = x.expand(5, 4, 8)
    close(compression(identical, identical[:2]), 1.0)


def test_compression_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="0 < G <= V"):
        compression(randn(1, 4, 8), randn(2, 4, 8))
    with pytest.raises(ValueError, match="0 < G <= V"):
        compression(randn(4, 4, 8), randn(2, 3, 8))
    with pytest.raises(ValueError, match="views, batch, dim"):
        compression(randn(4, 8), randn(2, 4, 8))


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_mcr_loss_is_minus_compression_minus_gamma_expansion(gamma: float) -> None:
    student, teacher, eps = unit(randn(6, 16, 8, seed=8)), unit(randn(2, 16, 8, seed=9)), 0.05
    loss, comp, expa = mcr_loss(student, teacher, eps, gamma)
    close(comp, compression_by_loops(student, teacher))
    expected_expansion = (
        rate_by_logdet((student[0] + teacher[0]) / 2, eps, 1)
        + rate_by_logdet((student[1] + teacher[1]) / 2, eps, 1)
    ) / 2
    close(expa, expected_expansion)
    close(expansion(student[:2], teacher, eps), expected_expansion)
    close(loss, -comp - gamma * expa)


def cls_by_double_loop(student: Tensor, teacher: Tensor) -> tuple[float, int]:
    """The authors' DistLoss spelled out: every (VFM view g, student view v) pair but g == v."""
    total, pairs = 0.0, 0
    for g in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v == g:
                continue
            batch = student.shape[1]
            total += sum(cosine(teacher[g, b], student[v, b]) for b in range(batch)) / batch
            pairs += 1
    return total / pairs, pairs


def test_cls_over_every_view_is_the_22_pair_double_loop() -> None:
    student, teacher = randn(12, 3, 10, seed=40), randn(2, 3, 10, seed=41)
    expected, pairs = cls_by_double_loop(student, teacher)
    assert pairs == 22
    close(cls_distillation(student, teacher), expected)
    # which pairs are left out: a student whose views 0 and 1 copy the VFM's views 0 and 1
    # scores 1 on exactly the two excluded pairs, so the value must not see them
    copied = student.clone()
    copied[0], copied[1] = teacher[0], teacher[1]
    by_hand = sum(
        sum(cosine(teacher[g, b], copied[v, b]) for b in range(3)) / 3
        for g in range(2)
        for v in range(12)
        if (g, v) not in ((0, 0), (1, 1))
    )
    close(cls_distillation(copied, teacher), by_hand / 22)


@pytest.mark.parametrize("cross_view", [True, False])
def test_cls_distillation_matches_loops(cross_view: bool) -> None:
    student, teacher = randn(4, 6, 10, seed=10), randn(2, 6, 10, seed=11)
    if cross_view:
        pairs = [(g, v) for g in range(2) for v in range(4) if g != v]
    else:
        pairs = [(0, 0), (1, 1)]
    cosines = [cosine(teacher[g, b], student[v, b]) for g, v in pairs for b in range(6)]
    expected = sum(cosines) / len(cosines)
    close(cls_distillation(student, teacher, cross_view=cross_view), expected)


def test_cls_distillation_defaults_to_cross_view() -> None:
    student, teacher = randn(2, 6, 10, seed=12), randn(2, 6, 10, seed=13)
    close(cls_distillation(student, teacher), cls_distillation(student, teacher, True))
    assert not torch.isclose(
        cls_distillation(student, teacher), cls_distillation(student, teacher, False)
    )


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 3, 5, 8)])
def test_patch_distillation_matches_loop(shape: tuple[int, ...]) -> None:
    student, teacher = randn(*shape, seed=14), randn(*shape, seed=15)
    flat_s, flat_t = student.reshape(-1, shape[-1]), teacher.reshape(-1, shape[-1])
    expected = sum(cosine(s, t) for s, t in zip(flat_s, flat_t, strict=True)) / len(flat_s)
    close(patch_distillation(student, teacher), expected)
    with pytest.raises(ValueError, match="shapes differ"):
        patch_distillation(student, teacher[..., :-1])


def optical_inputs(
    batch: int = 4, tokens: int = 9, dim: int = 12
) -> dict[str, tuple[Tensor, Tensor]]:
    return {
        "cls": (randn(2, batch, dim, seed=16), randn(2, batch, dim, seed=17)),
        "patch_final": (randn(batch, tokens, dim, seed=18), randn(batch, tokens, dim, seed=19)),
        "patch_mid": (randn(batch, tokens, dim, seed=20), randn(batch, tokens, dim, seed=21)),
    }


def test_dual_teacher_loss_total() -> None:
    student, teacher = randn(4, 8, 6, seed=22), randn(2, 8, 6, seed=23)
    optical = optical_inputs()
    weights = LossWeights(
        alpha_cls=1.0, alpha_final=0.5, alpha_mid=0.25, gamma=2.0, eps=0.1, optical_normalise=False
    )
    terms = dual_teacher_loss(student, teacher, optical, weights)
    ms_terms = {"loss", "ms_loss", "compression", "expansion"}
    assert set(terms) == ms_terms | {"optical_loss", "cls", "patch_final", "patch_mid"}
    assert all(t.shape == () for t in terms.values())
    close(terms["ms_loss"], mcr_loss(student, teacher, 0.1, 2.0)[0])
    close(terms["cls"], cls_distillation(*optical["cls"]))
    close(terms["patch_final"], patch_distillation(*optical["patch_final"]))
    close(terms["patch_mid"], patch_distillation(*optical["patch_mid"]))
    optical_loss = -(terms["cls"] + 0.5 * terms["patch_final"] + 0.25 * terms["patch_mid"])
    close(terms["optical_loss"], optical_loss)
    close(terms["loss"], -terms["compression"] - 2.0 * terms["expansion"] + optical_loss)


def test_dual_teacher_loss_skips_zero_weights() -> None:
    student, teacher = randn(4, 8, 6, seed=24), randn(2, 8, 6, seed=25)
    optical = optical_inputs()
    del optical["patch_mid"]  # weight 0: no inputs needed
    weights = LossWeights(alpha_final=0.0, alpha_mid=0.0, cls_cross_view=False)
    terms = dual_teacher_loss(student, teacher, optical, weights)
    assert set(terms) == {"loss", "ms_loss", "compression", "expansion", "optical_loss", "cls"}
    close(terms["cls"], cls_distillation(*optical["cls"], cross_view=False))
    close(terms["loss"], terms["ms_loss"] - terms["cls"])

    none_weighted = LossWeights(alpha_cls=0.0, alpha_final=0.0, alpha_mid=0.0)
    for opt in (optical, None):
        terms = dual_teacher_loss(student, teacher, opt, none_weighted)
        assert set(terms) == {"loss", "ms_loss", "compression", "expansion"}
        close(terms["loss"], terms["ms_loss"])
    assert "cls" not in dual_teacher_loss(student, teacher, None, LossWeights())


def test_dual_teacher_loss_rejects_bad_optical_inputs() -> None:
    student, teacher = randn(4, 8, 6, seed=26), randn(2, 8, 6, seed=27)
    optical = optical_inputs()
    with pytest.raises(ValueError, match=r"'patch_mid' has weight 0\.5 but no inputs"):
        dual_teacher_loss(student, teacher, {"cls": optical["cls"]}, LossWeights(alpha_final=0))
    with pytest.raises(ValueError, match="unknown optical terms"):
        extra = {**optical, "patch_early": optical["patch_mid"]}
        dual_teacher_loss(student, teacher, extra, LossWeights())
    with pytest.raises(ValueError, match="eps must be > 0"):
        LossWeights(eps=0.0)
    with pytest.raises(ValueError, match="alpha_mid must be >= 0"):
        LossWeights(alpha_mid=-1.0)


def test_gradients_reach_students_only() -> None:
    student, teacher = randn(4, 8, 6, seed=28), randn(2, 8, 6, seed=29)
    optical = optical_inputs()
    leaves = [student, teacher] + [t for pair in optical.values() for t in pair]
    for leaf in leaves:
        leaf.requires_grad_()
    dual_teacher_loss(student, teacher, optical, LossWeights())["loss"].backward()
    for grad in [student.grad] + [s.grad for s, _ in optical.values()]:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert teacher.grad is None and all(t.grad is None for _, t in optical.values())


def test_gradients_with_frozen_teachers_and_bf16() -> None:
    student = randn(4, 8, 6, seed=30).to(torch.bfloat16).requires_grad_()
    teacher = randn(2, 8, 6, seed=31).to(torch.bfloat16)
    cls = randn(2, 8, 6, seed=32).requires_grad_(), randn(2, 8, 6, seed=33)
    terms = dual_teacher_loss(student, teacher, {"cls": cls}, LossWeights(0.5, 0.0, 0.0))
    terms["loss"].backward()
    assert student.grad is not None and torch.isfinite(student.grad.float()).all()
    assert cls[0].grad is not None and torch.isfinite(cls[0].grad).all()


def test_covariance_layouts() -> None:
    assert CovarianceLayout.of(None, 1) == CovarianceLayout(1, 1, False)
    assert CovarianceLayout.of(None, 16) == CovarianceLayout(16, 1, False)  # reduce_cov=0
    assert CovarianceLayout.of(1, 1) == CovarianceLayout(1, 1, False)
    assert CovarianceLayout.of(1, 4) == CovarianceLayout(4, 1, True)  # reduce_cov=1
    assert CovarianceLayout.of(16, 1) == CovarianceLayout(16, 16, False)
    assert CovarianceLayout.of(16, 4) == CovarianceLayout(16, 4, False)
    with pytest.raises(ValueError, match="cannot span ranks"):
        CovarianceLayout.of(16, 3)
    with pytest.raises(ValueError, match="cov_groups must be >= 1"):
        LossWeights(cov_groups=0)


def test_per_gpu_covariance_of_16_ranks_on_one_process() -> None:
    """``cov_groups: 16`` on one process is the authors' 16 GPUs with ``reduce_cov=0``: each
    group of m rows its own ZᵀZ, N = 16 in both coefficients, DDP's mean over the groups."""
    groups, m, dim, eps = 16, 4, 6, 0.05
    student, teacher = (
        unit(randn(2, groups * m, dim, seed=50)),
        unit(randn(2, groups * m, dim, seed=51)),
    )
    expected = 0.0
    for g in range(2):
        for k in range(groups):
            rows = slice(k * m, (k + 1) * m)
            expected += float(
                rate_by_logdet((student[g, rows] + teacher[g, rows]) / 2, eps, groups)
            )
    expected /= 2 * groups
    one_process = expansion(student, teacher, eps, CovarianceLayout.of(groups, 1))
    close(one_process, expected)
    # what each of the 16 ranks computes on its own rows (reduce_cov=0), averaged as DDP does
    per_rank = [
        expansion(
            student[:, k * m : (k + 1) * m],
            teacher[:, k * m : (k + 1) * m],
            eps,
            CovarianceLayout.of(None, groups),
        )
        for k in range(groups)
    ]
    close(one_process, torch.stack(per_rank).mean())
    # and it is not the whole batch's coding rate
    assert not torch.isclose(one_process, expansion(student, teacher, eps))
    with pytest.raises(ValueError, match="do not split into 16"):
        expansion(student[:, :60], teacher[:, :60], eps, CovarianceLayout.of(groups, 1))


def test_loss_as_summed_by_the_authors() -> None:
    """Default weights (α = 1, 0.5, 0.5, normalised): main_dino.py's total
    ``−comp − expa − (cls + (p_F + p_mid)/2)/2``; and its ``−cls`` / ``−(p_F + p_mid)/2``
    when only one kind of optical target is on."""
    student, teacher = unit(randn(6, 8, 6, seed=52)), unit(randn(2, 8, 6, seed=53))
    optical = optical_inputs()
    optical["cls"] = (randn(6, 4, 12, seed=54), randn(2, 4, 12, seed=55))
    terms = dual_teacher_loss(student, teacher, optical, LossWeights())
    comp = compression_by_loops(student, teacher)
    expa = float(sum(rate_by_logdet((student[g] + teacher[g]) / 2, 0.05, 1) for g in range(2)) / 2)
    cls = cls_by_double_loop(*optical["cls"])[0]
    patch = {
        name: sum(
            cosine(s, t)
            for s, t in zip(
                optical[name][0].reshape(-1, 12), optical[name][1].reshape(-1, 12), strict=True
            )
        )
        / 36
        for name in ("patch_final", "patch_mid")
    }
    p_f, p_mid = patch["patch_final"], patch["patch_mid"]
    close(terms["loss"], -comp - expa - (cls + (p_f + p_mid) / 2) / 2)
    only_cls = dual_teacher_loss(student, teacher, optical, LossWeights(alpha_final=0, alpha_mid=0))
    close(only_cls["loss"], -comp - expa - cls)
    only_patches = dual_teacher_loss(student, teacher, optical, LossWeights(alpha_cls=0))
    close(only_patches["loss"], -comp - expa - (p_f + p_mid) / 2)
    summed = dual_teacher_loss(student, teacher, optical, LossWeights(optical_normalise=False))
    close(summed["loss"], -comp - expa - (cls + 0.5 * p_f + 0.5 * p_mid))


def _distributed_worker(
    rank: int, port: int, z: Tensor, student: Tensor, teacher: Tensor, out: Path
) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP threads do not survive the fork
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        half = z.shape[0] // 2
        local = z[rank * half : (rank + 1) * half].clone().requires_grad_()
        rate = coding_rate(local, 0.05, groups=2, all_reduce=True)
        rate.backward()
        local_student = student[:, rank * half : (rank + 1) * half]
        local_teacher = teacher[:, rank * half : (rank + 1) * half]
        expa = expansion(local_student, local_teacher, 0.05, CovarianceLayout.of(1, 2))
        try:
            coding_rate(local, 0.05, groups=3, all_reduce=True)
            mismatch = ""
        except ValueError as err:
            mismatch = str(err)
        torch.save(
            {"rate": rate.detach(), "grad": local.grad, "expansion": expa, "mismatch": mismatch},
            out / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(60)
def test_coding_rate_all_reduce_equals_whole_batch(tmp_path: Path) -> None:
    """Two ranks with B rows each and N = 2 give R of the 2B rows on one process with N = 1.

    The all-reduced ZᵀZ is the whole batch's, and both coefficients depend on B·N only:
    a = p/(B·N·eps) and (p + N·B)/(p·N·B). The backward of the all-reduce sums the gradient
    over ranks, so each rank holds N = 2 times the whole-batch gradient of its rows (DDP's
    mean over ranks restores the whole-batch gradient).
    """
    z, student, teacher = randn(16, 6, seed=34), randn(2, 16, 6, seed=35), randn(2, 16, 6, seed=36)
    # fork, not spawn: a spawned child imports torch again (seconds each on a busy machine)
    args = (free_port(), z, student, teacher, tmp_path)
    mp.start_processes(_distributed_worker, args=args, nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    whole = z.clone().requires_grad_()
    expected = coding_rate(whole, 0.05)
    expected.backward()
    for rank, result in enumerate(results):
        close(result["rate"], expected)
        close(result["grad"], 2 * whole.grad[rank * 8 : (rank + 1) * 8])
        close(result["expansion"], expansion(student, teacher, 0.05))
        assert "process group has 2 ranks" in result["mismatch"]
    # the local half alone would differ: the all-reduce did happen
    assert not torch.isclose(coding_rate(z[:8], 0.05, groups=2), expected)


def test_terms_stay_float32_under_autocast() -> None:
    """Autocast would run ZᵀZ and the cosines' matmuls in bf16; the loss turns it off."""
    student, teacher = (
        unit(randn(4, 16, 8, seed=60)).float(),
        unit(randn(2, 16, 8, seed=61)).float(),
    )
    optical = {name: (s.float(), t.float()) for name, (s, t) in optical_inputs().items()}
    plain = dual_teacher_loss(student, teacher, optical, LossWeights())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (student[0].T @ student[0]).dtype == torch.bfloat16  # autocast is on here
        mixed = dual_teacher_loss(student, teacher, optical, LossWeights())
    for name, value in plain.items():
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], value)
