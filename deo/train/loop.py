"""The training loop: resumable, DDP-aware, pre-emption safe.

A run directory holds ``checkpoint.pt`` (latest, written every epoch and on SIGTERM/SIGUSR1),
``metrics.jsonl`` (one line per step) and ``config.json`` (the resolved run config). Starting
a run whose directory has a checkpoint resumes it: same data order, same augmentations, same
schedules, so an interrupted run ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from deo.cache.reader import CachedTargets
from deo.cache.spec import GlobalViews
from deo.config import digest, to_dict
from deo.data.augment import MultiCrop
from deo.losses import CovarianceLayout
from deo.models.teacher import TeacherConfig, VFMTeacher
from deo.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from deo.train.config import TrainConfig
from deo.train.distributed import (
    DistContext,
    any_rank,
    gather_objects,
    init_distributed,
    shutdown,
)
from deo.train.inputs import render_views, training_data, view_generator
from deo.train.meta_arch import DualTeacherDistillation, StudentWithHeads
from deo.train.optim import clip_gradients, param_groups
from deo.train.schedules import Schedules, build_schedules

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/Inf: names the step, the loss parts and the batch's samples."""


class Preempted(RuntimeError):
    """A pre-emption signal arrived; the checkpoint is saved and the job should be requeued."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint saved")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.json"


def param_checksum(module: nn.Module) -> float:
    """A float64 fingerprint of the parameters, compared across ranks at every checkpoint."""
    with torch.no_grad():
        return float(sum(p.double().square().sum() + p.double().sum() for p in module.parameters()))


def last_layer_params(student: StudentWithHeads) -> list[nn.Parameter]:
    """The MS projection head's last linear layer, frozen during the first epoch(s) (DINO)."""
    linears = [m for m in student.head.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters())


class _StopFlag:
    """Remembers a pre-emption signal; the loop checks it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        log.warning("received signal %d: checkpointing after this step", signum)
        self.signum = signum


def train(
    cfg: TrainConfig,
    teacher_cfg: TeacherConfig,
    store: Path,
    table: Path,
    out_dir: Path,
    *,
    device: str = "auto",
    max_steps: int | None = None,
    progress: bool = True,
    teacher_cache: Path | None = None,
) -> Path:
    """Train (or resume) one run; returns the checkpoint path. ``max_steps`` ends early (tests).

    With ``teacher_cache`` (``teacher.mode: cached``) the VFM targets of the global views come
    from that cache, whose views are replayed; without it the VFM runs online (the paper's way).
    """
    ctx = init_distributed(device)
    try:
        return _train(
            cfg,
            teacher_cfg,
            store,
            table,
            RunPaths(out_dir),
            ctx,
            max_steps,
            progress,
            teacher_cache,
        )
    finally:
        shutdown()


def _train(
    cfg: TrainConfig,
    teacher_cfg: TeacherConfig,
    store: Path,
    table: Path,
    paths: RunPaths,
    ctx: DistContext,
    max_steps: int | None,
    progress: bool,
    teacher_cache: Path | None,
) -> Path:
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"train.batch_size {cfg.batch_size} must divide by {ctx.world_size} ranks")
    layout = CovarianceLayout.of(cfg.loss.cov_groups, ctx.world_size)
    if (cfg.batch_size // ctx.world_size) % layout.per_rank:
        raise ValueError(
            f"train.batch_size {cfg.batch_size} does not split into loss.cov_groups "
            f"{cfg.loss.cov_groups} equal groups"
        )
    resolved = {"train": to_dict(cfg), "teacher": to_dict(teacher_cfg)}
    cache = None
    if teacher_cache is not None:
        if not cfg.uses_vfm:
            raise ValueError("a teacher cache was given, but this run's losses use no VFM")
        cache = CachedTargets(teacher_cache)
        resolved["teacher_cache"] = cache.meta  # resuming with another cache is refused
    config_digest = digest(resolved)
    if ctx.is_main:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(json.dumps(resolved, indent=2, sort_keys=True))

    generator = view_generator(cfg, ctx.rank)
    data = training_data(cfg, store, table, rank=ctx.rank, world_size=ctx.world_size)
    loader, multicrop = data.loader, data.multicrop
    sampler = loader.batch_sampler
    steps_per_epoch = len(sampler)
    schedules = build_schedules(
        epochs=cfg.epochs,
        steps_per_epoch=steps_per_epoch,
        base_lr=cfg.optim.base_lr,
        global_batch=cfg.batch_size,
        min_lr=cfg.optim.min_lr,
        warmup_epochs=cfg.optim.warmup_epochs,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        freeze_last_layer_epochs=cfg.optim.freeze_last_layer_epochs,
    )

    if cache is None:
        vfm = VFMTeacher(teacher_cfg).to(ctx.device) if cfg.uses_vfm else None
        vfm_dim, vfm_digest = None, vfm.weights_digest() if vfm is not None else None
    else:
        views = GlobalViews.of(multicrop)
        vfm, vfm_dim = None, cache.verify_run(teacher_cfg, store, table, views)
        vfm_digest = cache.meta["teacher"]["weights_digest"]
    torch.manual_seed(cfg.seed)  # the same initial student (and so EMA teacher) on every rank
    model = DualTeacherDistillation(cfg, vfm, vfm_dim=vfm_dim).to(ctx.device)
    torch.manual_seed(cfg.seed + ctx.rank)  # then each rank its own stochastic depth
    random.seed(cfg.seed + ctx.rank)
    student: nn.Module = model.student
    if ctx.world_size > 1:
        student = DistributedDataParallel(
            model.student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if cfg.compile:
        student = torch.compile(student)
    cuda = ctx.device.type == "cuda"
    groups = param_groups(model.student, cfg.optim.wd_position_tables)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, fused=cuda)
    scaler, autocast = _precision(cfg.precision, ctx)

    step = 0
    if paths.checkpoint.exists():
        step = _resume(paths.checkpoint, model, optimizer, scaler, generator, config_digest, ctx)
        log.info("resumed %s at step %d", paths.checkpoint, step)
    total = schedules.lr.shape[0] if max_steps is None else min(max_steps, len(schedules))
    stop = _StopFlag()
    previous = {s: signal.signal(s, stop) for s in PREEMPT_SIGNALS}
    frozen = last_layer_params(model.student)
    bar = tqdm(total=total, initial=step, disable=not (progress and ctx.is_main), unit="step")

    def checkpoint() -> None:
        rngs = gather_objects(rng_state(generator), ctx)
        checksums = gather_objects(param_checksum(model.student), ctx)
        if len(set(checksums)) > 1:
            raise RuntimeError(
                f"ranks hold different student parameters at step {step}: {checksums}"
            )
        if ctx.is_main:
            save_checkpoint(
                paths.checkpoint,
                {
                    "step": step,
                    "student": model.student.state_dict(),
                    "teacher": model.teacher.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rngs,
                    "rank_checksums": checksums,
                    "config_digest": config_digest,
                    "config": json.dumps(resolved, sort_keys=True),
                    "vfm_digest": vfm_digest,
                },
            )

    if ctx.is_main:
        _trim_metrics(paths.metrics, step)
    try:
        with open(paths.metrics, "a") if ctx.is_main else nullcontext() as metrics_file:
            while step < total:
                epoch, position = divmod(step, steps_per_epoch)
                sampler.set_epoch(epoch)
                sampler.set_position(position)
                for batch in loader:
                    tick = time.perf_counter()
                    terms = _step(
                        model,
                        student,
                        batch,
                        multicrop,
                        generator,
                        optimizer,
                        scaler,
                        autocast,
                        schedules,
                        step,
                        frozen,
                        cfg,
                        ctx,
                        cache,
                    )
                    step += 1
                    if ctx.is_main:
                        record = _metrics(terms, schedules, step, epoch, batch, tick, cfg, ctx)
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    bar.update(1)
                    if any_rank(stop.signum is not None, ctx):
                        checkpoint()
                        raise Preempted(stop.signum or signal.SIGTERM, step)
                    if step >= total:
                        break
                checkpoint()
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return paths.checkpoint


def _step(
    model: DualTeacherDistillation,
    student: nn.Module,
    batch: dict[str, torch.Tensor],
    multicrop: MultiCrop,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Any,
    schedules: Schedules,
    step: int,
    frozen: list[nn.Parameter],
    cfg: TrainConfig,
    ctx: DistContext,
    cache: CachedTargets | None = None,
) -> dict[str, torch.Tensor]:
    values = schedules.at(step)
    for group in optimizer.param_groups:
        group["lr"] = values["lr"]
        group["weight_decay"] = values["wd"] if group["apply_wd"] else 0.0
    views, targets = render_views(multicrop, batch, generator, ctx.device, cache)
    with autocast:
        terms = model(views, student, targets=targets, world_size=ctx.world_size)
    loss = terms["loss"]
    if not torch.isfinite(loss):
        parts = {k: float(v.detach()) for k, v in terms.items()}
        raise NonFiniteLoss(
            f"non-finite loss at step {step}: {parts}; samples {batch['index'].tolist()}"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    terms["grad_norm"] = clip_gradients(
        model.student.parameters(), cfg.optim.clip_grad, cfg.optim.clip_mode
    )
    if schedules.last_layer_frozen[step]:
        for p in frozen:
            p.grad = None
    scaler.step(optimizer)
    scaler.update()
    model.teacher.update(model.student, values["momentum"])
    return terms


def _precision(precision: str, ctx: DistContext) -> tuple[torch.amp.GradScaler, Any]:
    """The GradScaler and autocast context of ``train.precision`` on this device.

    fp16 (the authors') autocasts to float16 with a dynamic loss scale; bf16 autocasts without
    one (its exponent range is float32's). Autocast and the scaler are CUDA-only here: a CPU run
    trains in float32 and logs that it does.
    """
    cuda = ctx.device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if amp_dtype is not None and not cuda and ctx.is_main:
        log.warning(
            "train.precision %s applies on CUDA only: this %s run trains in float32",
            precision,
            ctx.device.type,
        )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cuda and amp_dtype is torch.float16)
    if cuda and amp_dtype is not None:
        return scaler, torch.autocast("cuda", dtype=amp_dtype)
    return scaler, nullcontext()


def _metrics(
    terms: dict[str, torch.Tensor],
    schedules: Schedules,
    step: int,
    epoch: int,
    batch: dict[str, torch.Tensor],
    tick: float,
    cfg: TrainConfig,
    ctx: DistContext,
) -> dict[str, Any]:
    seconds = time.perf_counter() - tick
    record: dict[str, Any] = {"step": step, "epoch": epoch}
    record |= {k: float(v.detach()) for k, v in terms.items()}
    record |= schedules.at(step - 1)
    record["images_per_s"] = len(batch["index"]) * ctx.world_size / seconds
    record["step_s"] = seconds
    if ctx.device.type == "cuda":
        record["max_memory_mb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    else:
        record["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint's step (written after it, before an interrupt)."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def _resume(
    path: Path,
    model: DualTeacherDistillation,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    config_digest: str,
    ctx: DistContext,
) -> int:
    state = load_checkpoint(path)
    if state["config_digest"] != config_digest:
        raise ValueError(
            f"{path}: the checkpoint was written by another configuration "
            f"(digest {state['config_digest']} vs {config_digest}); move it away to start afresh"
        )
    model.student.load_state_dict(state["student"])
    model.teacher.load_state_dict(state["teacher"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) != ctx.world_size:
        raise ValueError(
            f"{path}: saved by {len(state['rng'])} rank(s), resumed on {ctx.world_size}; the "
            "data order and augmentations could not continue exactly"
        )
    set_rng_state(state["rng"][ctx.rank], generator)
    return int(state["step"])
