"""DEO's dual-teacher loss: SimDINO's MCR loss against the EMA teacher plus optical distillation.

Shapes: ``V`` student views (global views first, then local ones), ``G`` teacher global views
(2 in DEO), ``B`` samples per rank, ``p`` projection-head width, ``P`` patch tokens, ``D`` the
optical teacher's width after the student's projection heads.

1. Multispectral self-distillation (SimDINO, arXiv 2502.10385)::

       L_MS = -compression(S, T) - γ·expansion(S[:G], T)

2. Optical distillation from the frozen VFM: its [cls] of the two global views against the
   student's RGB-path [cls] of every view (cross-view, 2·V − 2 pairs), its patch tokens against
   the student's on the global views::

       L_O = -(α1·cls + α2·patch_final + α3·patch_mid) / (α1 + α2 + α3)

   The division by the α's of the terms computed is the authors' code
   (``main_dino.py``: ``-(cls + (p_F + p_mid)/2)/2`` with α = 1, 0.5, 0.5, and ``-cls`` or
   ``-(p_F + p_mid)/2`` when one kind is off); ``optical_normalise=False`` drops it.

The total is ``L_MS + L_O``. Every similarity is a cosine over the last axis; the coding rate
takes its input as given, so ``S`` and ``T`` are the heads' L2-normalised outputs. Teacher
inputs are targets: gradients are stopped on them. Terms are computed in float32 at least, so
bf16/fp16 inputs from autocast are upcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_views(name: str, x: Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must be (views, batch, dim), got shape {tuple(x.shape)}")


def _mean_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over all leading axes of ``cos(student[..., :], teacher[..., :])``; shapes equal."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    s, t = _at_least_float32(student), _at_least_float32(teacher.detach())
    return F.cosine_similarity(s, t, dim=-1).mean()


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over ranks; the backward sums the output gradients over ranks likewise.

    Every rank's output is the same sum of all inputs, so the gradient of a rank's input is the
    sum over ranks of their output gradients. (``torch.distributed.nn.functional.all_reduce``
    does the same but warns of its deprecation in torch 2.14; its successor in the private
    ``torch.distributed._functional_collectives`` has autograd only in recent releases.)
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


@dataclass(frozen=True)
class CovarianceLayout:
    """How the coding rate's covariance is pooled: ``groups`` groups of rows, each rank's share
    of the batch split into ``per_rank`` of them, and ``all_reduce`` summing ZᵀZ over ranks.

    ``groups`` is the ``N`` of the coding-rate formula. Build it with ``of``.
    """

    groups: int
    per_rank: int
    all_reduce: bool

    @classmethod
    def of(cls, cov_groups: int | None, world_size: int) -> CovarianceLayout:
        """The layout of ``loss.cov_groups`` on ``world_size`` ranks.

        - ``None``: one group per rank, its own rows only, ``N`` = world size: the authors'
          ``MCRLoss`` with ``reduce_cov=0`` on however many ranks run.
        - ``1``: one group of the whole global batch, ZᵀZ all-reduced (``reduce_cov=1``).
        - ``G`` (a multiple of the world size): the global batch as G equal groups of rows, each
          with its own covariance and ``N = G``, each rank holding ``G / world_size`` of them:
          the authors' run on G GPUs (16 in the paper), whatever number of ranks runs it.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if cov_groups is None:
            return cls(world_size, 1, False)
        if cov_groups == 1:
            return cls(world_size, 1, world_size > 1)
        if cov_groups < 1 or cov_groups % world_size:
            raise ValueError(
                f"loss.cov_groups={cov_groups} must be 1 or a multiple of the {world_size} "
                "rank(s): a group of rows cannot span ranks"
            )
        return cls(cov_groups, cov_groups // world_size, False)


ONE_GROUP = CovarianceLayout(groups=1, per_rank=1, all_reduce=False)  # one process, whole batch


def coding_rate(z: Tensor, eps: float, groups: int = 1, all_reduce: bool = False) -> Tensor:
    """Scaled coding rate of one group of embeddings, SimDINO's expansion measure.

    ``z`` (m, p) holds one group's rows, taken as given: DEO passes L2-normalised head outputs,
    or the mean of a student and a teacher embedding (see ``expansion``). With N = ``groups``
    (the authors' world size)::

        a = p / (m·N·eps)
        R(Z) = ½·logdet(I_p + a·ZᵀZ) · (p + N·m) / (p·N·m)

    The logdet is ``2·Σ log diag(L)`` with ``L`` the Cholesky factor of ``I_p + a·ZᵀZ``
    (positive definite: identity plus a Gram matrix), computed in float32 at least.

    ``all_reduce=True`` (needs an initialised process group of N ranks): the p×p matrix ZᵀZ is
    summed over ranks before the logdet (``_AllReduceSum``, which keeps the gradient of the
    local part), so every rank gets R of the global batch of N·m rows (the same as one process
    with the whole batch and N = 1). Its backward sums the gradient over ranks, so each rank's
    gradient on its own rows is N times that of the global R; DDP's mean over ranks then gives
    exactly the gradient of the global R. Otherwise ZᵀZ stays local and N only enters the two
    coefficients, as in the authors' ``MCRLoss`` with ``reduce_cov=0``.

    Returns a scalar tensor (float32, or float64 for float64 input).
    """
    if z.ndim != 2:
        raise ValueError(f"z must be (batch, dim), got shape {tuple(z.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    batch, dim = z.shape
    z = _at_least_float32(z)
    cov = z.T @ z
    if all_reduce:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("all_reduce=True needs an initialised torch.distributed group")
        if dist.get_world_size() != groups:
            raise ValueError(
                f"groups={groups} but the process group has {dist.get_world_size()} ranks"
            )
        cov = _AllReduceSum.apply(cov)
    alpha = dim / (batch * groups * eps)
    eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(eye + alpha * cov)
    if info.item() != 0:  # one host sync per view, for an error that says what went wrong
        raise torch.linalg.LinAlgError(
            f"coding rate: I + a·ZᵀZ is not positive definite (Cholesky failed at minor "
            f"{info.item()}); the embeddings probably hold NaN or Inf"
        )
    half_logdet = chol.diagonal().log().sum()
    return half_logdet * (dim + groups * batch) / (dim * groups * batch)


def compression(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean cosine between every teacher global view and every other student view.

    ``student`` (V, B, p), global views first; ``teacher`` (G, B, p) with G ≤ V::

        compression = Σ_{g<G, v<V, g≠v} mean_b cos(T_g[b], S_v[b]) / (G·V − G)

    The excluded "diagonal" pairs a teacher global view with the student's same view. For DEO
    G = 2, so the denominator is 2·V − 2. Gradients are stopped on ``teacher``.
    """
    _check_views("student", student)
    _check_views("teacher", teacher)
    n_global, n_views = teacher.shape[0], student.shape[0]
    if teacher.shape[1:] != student.shape[1:] or not 0 < n_global <= n_views or n_views < 2:
        raise ValueError(
            f"need teacher (G, B, p) and student (V, B, p) with 0 < G <= V and V >= 2, got "
            f"{tuple(teacher.shape)} and {tuple(student.shape)}"
        )
    s = F.normalize(_at_least_float32(student), dim=-1)
    t = F.normalize(_at_least_float32(teacher.detach()), dim=-1)
    sim = torch.einsum("gbp,vbp->gv", t, s) / student.shape[1]
    off_diagonal = ~torch.eye(n_global, n_views, dtype=torch.bool, device=sim.device)
    return sim[off_diagonal].sum() / (n_global * n_views - n_global)


def expansion(
    student_globals: Tensor,
    teacher_globals: Tensor,
    eps: float,
    layout: CovarianceLayout = ONE_GROUP,
) -> Tensor:
    """Coding rate of the mean of student and teacher embeddings, averaged over global views
    and over this rank's covariance groups.

    ``student_globals`` and ``teacher_globals`` (G, B, p), view for view; with the B rows split
    into ``layout.per_rank`` consecutive groups ``k``::

        expansion = mean_{g,k} R((S_g + T_g)[group k] / 2)        (R: ``coding_rate``)

    As DEO specifies (SimDINO's ``expa_type=1``): averaging with the EMA teacher's embedding
    smooths the term; gradients reach it through the student only.
    """
    _check_views("student_globals", student_globals)
    if student_globals.shape != teacher_globals.shape:
        raise ValueError(
            f"student and teacher global views differ: {tuple(student_globals.shape)} vs "
            f"{tuple(teacher_globals.shape)}"
        )
    batch = student_globals.shape[1]
    if batch % layout.per_rank:
        raise ValueError(
            f"{batch} samples per rank do not split into {layout.per_rank} covariance groups"
        )
    means = (student_globals + teacher_globals.detach()) / 2
    rates = [
        coding_rate(group, eps, layout.groups, layout.all_reduce)
        for view in means
        for group in view.chunk(layout.per_rank)
    ]
    return torch.stack(rates).mean()


def mcr_loss(
    student: Tensor,
    teacher: Tensor,
    eps: float,
    gamma: float = 1.0,
    layout: CovarianceLayout = ONE_GROUP,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimDINO's MCR loss of the multispectral student against its EMA teacher.

    ``student`` (V, B, p), global views first; ``teacher`` (G, B, p), its global views::

        L_MS = −compression(S, T) − γ·expansion(S[:G], T)

    Returns ``(L_MS, compression, expansion)``, all scalars; only ``L_MS`` is meant for
    ``backward``, the other two for logging.
    """
    comp = compression(student, teacher)
    expa = expansion(student[: teacher.shape[0]], teacher, eps, layout)
    return -comp - gamma * expa, comp, expa


def cls_distillation(student: Tensor, teacher: Tensor, cross_view: bool = True) -> Tensor:
    """Mean cosine between the student's projected [cls] and the optical teacher's [cls].

    ``student`` (V, B, D): the student's RGB path on the two global views and then (the
    authors' way) on the local views, after its cls projection head; ``teacher`` (2, B, D):
    the frozen VFM's final [cls] of the two global views.

    - ``cross_view=True`` (default): the authors' ``DistLoss``, which is ``compression``: each
      VFM view against every student view but its own, ``2·V − 2`` pairs (22 for 2 + 10 views).
    - ``cross_view=False``: same view only, ``mean_{g,b} cos(T_g[b], S_g[b])``.

    Higher means more similar; gradients are stopped on ``teacher``.
    """
    _check_views("student", student)
    if cross_view:
        return compression(student, teacher)
    return _mean_cosine(student[: teacher.shape[0]], teacher)


def patch_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean per-token cosine between the student's projected patch tokens and the teacher's.

    ``student`` and ``teacher`` (B, P, D) (or (G, B, P, D) for several views), token for token
    on the same grid::

        patch = mean_{b,t} cos(S[b, t], T[b, t])

    Higher means more similar; gradients are stopped on ``teacher``.
    """
    return _mean_cosine(student, teacher)


@dataclass(frozen=True)
class LossWeights:
    """Coefficients and switches of the dual-teacher loss (defaults: the authors' run).

    ``alpha_cls``, ``alpha_final``, ``alpha_mid``: α1, α2, α3 of the optical terms (a term with
    coefficient 0 is not computed); ``optical_normalise``: divide the optical sum by the α's of
    the terms computed (the authors' code); ``gamma``: γ of the expansion term; ``eps``: the
    coding rate's distortion; ``cls_cross_view``: the pairing of ``cls_distillation``;
    ``cls_views``: ``all`` matches the VFM [cls] against the student's [cls] of every view (the
    authors'), ``global`` of the two global views only; ``cov_groups``: see
    ``CovarianceLayout.of`` (None: per rank, the authors' ``reduce_cov=0``).
    """

    alpha_cls: float = 1.0
    alpha_final: float = 0.5
    alpha_mid: float = 0.5
    optical_normalise: bool = True
    gamma: float = 1.0
    eps: float = 0.05
    cls_cross_view: bool = True
    cls_views: Literal["all", "global"] = "all"
    cov_groups: int | None = None

    def __post_init__(self) -> None:
        for name in ("alpha_cls", "alpha_final", "alpha_mid", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossWeights.{name} must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"LossWeights.eps must be > 0, got {self.eps}")
        if self.cov_groups is not None and self.cov_groups < 1:
            raise ValueError(f"LossWeights.cov_groups must be >= 1 or None, got {self.cov_groups}")

    def optical(self) -> dict[str, float]:
        """The optical coefficient of each term name."""
        return {"cls": self.alpha_cls, "patch_final": self.alpha_final, "patch_mid": self.alpha_mid}


def dual_teacher_loss(
    ms_student: Tensor,
    ms_teacher: Tensor,
    optical: dict[str, tuple[Tensor, Tensor]] | None,
    weights: LossWeights,
    world_size: int = 1,
) -> dict[str, Tensor]:
    """The named terms of DEO's loss; ``"loss"`` is the one to backpropagate.

    ``ms_student`` (V, B, p) and ``ms_teacher`` (G, B, p) go to ``mcr_loss``, with the
    covariance layout of ``weights.cov_groups`` on ``world_size`` ranks. ``optical`` maps a term
    name to its (student, teacher) pair: ``"cls"`` (V or 2, B, D) and (2, B, D),
    ``"patch_final"`` and ``"patch_mid"`` (B, P, D) or (2, B, P, D) each; ``None`` switches
    optical distillation off. A term whose coefficient is 0 is skipped, and then its pair may be
    left out. Over the terms computed::

        L_O  = −(α1·cls + α2·patch_final + α3·patch_mid) / Σα    (/ Σα: optical_normalise)
        loss = L_MS + L_O

    Returns scalars under ``"loss"``, ``"ms_loss"``, ``"compression"``, ``"expansion"`` and,
    when any optical term is computed, ``"optical_loss"`` and each computed term's (unweighted)
    cosine under its own name.
    """
    # Autocast would run the matmuls (ZᵀZ, the cosines) in fp16/bf16 again: terms stay float32.
    with torch.autocast(ms_student.device.type, enabled=False):
        layout = CovarianceLayout.of(weights.cov_groups, world_size)
        ms_loss, comp, expa = mcr_loss(ms_student, ms_teacher, weights.eps, weights.gamma, layout)
        terms = {"ms_loss": ms_loss, "compression": comp, "expansion": expa}
        loss = ms_loss
        if optical is not None:
            coefficients = weights.optical()
            unknown = set(optical) - set(coefficients)
            if unknown:
                raise ValueError(
                    f"unknown optical terms {sorted(unknown)}; known: {list(coefficients)}"
                )
            weighted, total_alpha = [], 0.0
            for name, alpha in coefficients.items():
                if alpha == 0:
                    continue
                if name not in optical:
                    raise ValueError(f"optical term {name!r} has weight {alpha} but no inputs")
                student, teacher = optical[name]
                if name == "cls":
                    terms[name] = cls_distillation(student, teacher, weights.cls_cross_view)
                else:
                    terms[name] = patch_distillation(student, teacher)
                weighted.append(alpha * terms[name])
                total_alpha += alpha
            if weighted:
                norm = total_alpha if weights.optical_normalise else 1.0
                terms["optical_loss"] = -sum(weighted) / norm
                loss = loss + terms["optical_loss"]
        return {"loss": loss, **terms}
