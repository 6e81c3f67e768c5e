"""benchmarks/gpu_check.py at tiny size on CPU: every check runs and lands in its table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from deo.cache.spec import split_teacher_section
from deo.models.teacher import VFMTeacher
from deo.train.config import parse_teacher, parse_train, run_config
from deo.workflow import resolve_config

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]


def test_tiny_run_on_cpu_fills_every_row(capsys: pytest.CaptureFixture) -> None:
    argv = ["--tiny", "--device", "cpu", "--compile", "off", "--batch", "4", "--steps", "2"]
    argv += ["--warmup", "1", "--workers", "0", "--check-batch", "8"]
    rows = gpu_check.main(argv)
    by_check = {(r.check, r.setting): r for r in rows}
    assert by_check[("loss fp32", "batch 8")].result == "reference"
    bf16 = by_check[("loss bf16", "vs fp32, worst term")]
    # CPU autocast to bf16 runs too; a tiny random model is noisy, so check the verdict's logic
    error = float(bf16.value.split()[0])
    assert 0 < error < 0.5, bf16
    assert bf16.result.startswith("ok") == (error <= gpu_check.TOLERANCE["bf16"]), bf16
    attention = [r for r in rows if r.check == "attention xformers"]
    assert attention and attention[0].result.startswith("skipped: ")  # no xformers on CPU
    steps = {r.setting: r for r in rows if r.check == "train step"}
    assert set(steps) == {"online, compile off", "cached, compile off"}
    for row in steps.values():
        assert "s/step" in row.value and "img/s" in row.value and "MFU n/a" in row.result
    out = capsys.readouterr().out
    assert out.startswith("gpu_check: deo on CPU") and "| train step" in out


def test_online_step_adds_exactly_the_vfms_forward_flops() -> None:
    """Online minus cached = the VFM on 2 global views of B samples, counted by hand: per
    image a patch-embedding conv and, per block, qkv, projection, MLP and two attention
    products (T tokens of width D): 2·N·(3·p²)·D + depth·(24·T·D² + 4·T²·D)."""
    config = resolve_config([], root=ROOT)
    cfg = parse_train(run_config(config["train"], "deo"))
    teacher = parse_teacher(split_teacher_section(config["teacher"])[0])
    batch = 2
    flops = gpu_check.step_flops(cfg, teacher, batch, torch.device("cpu"))
    vfm = VFMTeacher(teacher)
    patch = vfm.patch_size[0]
    n = (cfg.crops.global_size // patch) ** 2
    t, d = n + vfm.num_prefix_tokens, teacher.tiny_embed_dim
    per_image = 2 * n * 3 * patch * patch * d + teacher.tiny_depth * (
        24 * t * d * d + 4 * t * t * d
    )
    assert flops["cached"] > 0
    assert flops["online"] - flops["cached"] == 2 * batch * per_image
