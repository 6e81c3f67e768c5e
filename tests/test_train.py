"""Training: exact resume after SIGTERM, 2-process DDP, non-finite loss, EMA and ablations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fakes import TINY_TEACHER, TINY_TRAIN, write_store

from deo.train.checkpoint import load_checkpoint
from deo.train.config import parse_teacher, parse_train
from deo.train.loop import NonFiniteLoss, train
from deo.train.meta_arch import DualTeacherDistillation

LOSS_KEYS = ("loss", "compression", "expansion", "cls", "patch_final", "patch_mid", "lr", "wd")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_store(tmp_path_factory.mktemp("store"), n=20)


def cli(store: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deo.cli",
        "train",
        "--train",
        json.dumps(TINY_TRAIN),
        "--teacher",
        json.dumps(TINY_TEACHER),
        "--store",
        str(store[0]),
        "--table",
        str(store[1]),
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_sigterm_then_resume_equals_uninterrupted_run(store, tmp_path: Path) -> None:
    total = 8
    straight = tmp_path / "straight"
    train(
        parse_train(TINY_TRAIN),
        parse_teacher(TINY_TEACHER),
        *store,
        straight,
        device="cpu",
        max_steps=total,
        progress=False,
    )

    run = tmp_path / "interrupted"
    proc = subprocess.Popen(cli(store, run, "--max-steps", str(total)), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before SIGTERM"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    stopped_at = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 2 <= stopped_at < total, "the signal should land mid-run"

    resumed = subprocess.run(cli(store, run, "--max-steps", str(total)), capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert "resumed" in resumed.stderr.decode()

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    assert a["step"] == b["step"] == total
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    ma, mb = metrics(straight), metrics(run)
    assert [m["step"] for m in mb] == list(range(1, total + 1))
    for x, y in zip(ma, mb, strict=True):
        assert {k: x[k] for k in LOSS_KEYS} == {k: y[k] for k in LOSS_KEYS}, f"step {x['step']}"


@pytest.mark.timeout(600)
def test_two_process_ddp_keeps_ranks_identical_and_loss_falls(store, tmp_path: Path) -> None:
    cfg = dict(TINY_TRAIN, epochs=6, optim={"warmup_epochs": 1, "base_lr": 0.05})
    cmd = cli(store, tmp_path, "--nproc-per-node", "2", "--max-steps", "12")
    cmd[cmd.index("--train") + 1] = json.dumps(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert len(state["rank_checksums"]) == 2
    assert state["rank_checksums"][0] == state["rank_checksums"][1]
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_non_finite_loss_names_step_and_samples(store, tmp_path: Path, monkeypatch) -> None:
    import deo.train.meta_arch as meta_arch

    def nan_loss(*args, **kwargs):
        terms = original(*args, **kwargs)
        return {**terms, "loss": terms["loss"] * float("nan")}

    original = meta_arch.dual_teacher_loss
    monkeypatch.setattr(meta_arch, "dual_teacher_loss", nan_loss)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 0: .*samples \[\d+"):
        train(
            parse_train(TINY_TRAIN),
            parse_teacher(TINY_TEACHER),
            *store,
            tmp_path,
            device="cpu",
            max_steps=1,
            progress=False,
        )


def test_resume_refuses_another_config(store, tmp_path: Path) -> None:
    cfg, teacher = parse_train(TINY_TRAIN), parse_teacher(TINY_TEACHER)
    train(cfg, teacher, *store, tmp_path, device="cpu", max_steps=1, progress=False)
    other = parse_train(dict(TINY_TRAIN, seed=1))
    with pytest.raises(ValueError, match="written by another configuration"):
        train(other, teacher, *store, tmp_path, device="cpu", max_steps=2, progress=False)


def build(**ablation: bool) -> DualTeacherDistillation:
    from deo.models.teacher import VFMTeacher

    cfg = parse_train(dict(TINY_TRAIN, ablation=ablation))
    return DualTeacherDistillation(cfg, VFMTeacher(parse_teacher(TINY_TEACHER)))


def heads(model: DualTeacherDistillation) -> set[str]:
    return {n.split(".")[1] for n in model.student.distill.state_dict()}


def test_ablation_switches_build_only_what_they_use() -> None:
    full = build()
    names = set(full.student.state_dict())
    assert any(n.startswith("backbone.rgb_embed") for n in names)
    assert heads(full) == {"cls", "patch_final", "patch_mid"}
    base = build(vfm_cls=False, vfm_patches=False, optical_path=False)
    assert base.vfm is None and base.student.distill is None
    assert not any("rgb_embed" in n for n in base.student.state_dict())
    assert heads(build(vfm_patches=False)) == {"cls"}
    assert heads(build(vfm_cls=False)) == {"patch_final", "patch_mid"}
    assert not any("rgb_embed" in n for n in full.teacher.state_dict())
    assert not any("_vfm" in n or "vfm." in n for n in full.state_dict())


def test_ema_update_matches_formula() -> None:
    model = build()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.teacher.backbone.named_parameters()}
    student = dict(model.student.backbone.named_parameters())
    model.teacher.update(model.student, 0.9)
    for name, p in model.teacher.backbone.named_parameters():
        expected = 0.9 * before[name] + 0.1 * student[name]
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
