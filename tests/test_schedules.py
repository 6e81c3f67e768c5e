"""Schedules against hand-computed values of the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deo.train.schedules import build_schedules, cosine


def test_cosine_with_warmup_matches_the_authors_scheduler() -> None:
    # DINO's cosine_scheduler: np.linspace(0, base, warmup) reaches base on the last warm-up
    # step; the decay's i runs over 0..n-1 and divides by n, so the end value is never reached
    s = cosine(1.0, 0.1, total_steps=10, warmup_steps=4)
    assert len(s) == 10
    np.testing.assert_allclose(s[:4], [0.0, 1 / 3, 2 / 3, 1.0])
    for i in range(6):
        expected = 0.1 + 0.45 * (1 + math.cos(math.pi * i / 6))
        assert s[4 + i] == pytest.approx(expected)
    assert s[4] == pytest.approx(1.0) and s[-1] > 0.1
    np.testing.assert_allclose(cosine(0.996, 1.0, 3), [0.996, 0.997, 0.999])


def test_cosine_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine(1.0, 0.0, total_steps=3, warmup_steps=4)


def test_build_schedules_scaling_rule_and_freeze() -> None:
    s = build_schedules(
        epochs=4,
        steps_per_epoch=5,
        base_lr=5e-4,
        global_batch=512,
        min_lr=1e-6,
        warmup_epochs=1,
        weight_decay=(0.04, 0.4),
        momentum=(0.996, 1.0),
        freeze_last_layer_epochs=1,
    )
    assert len(s) == 20
    assert s.lr.max() == pytest.approx(5e-4 * 512 / 256)
    assert s.lr[4] == s.lr[5] == pytest.approx(1e-3)
    last = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 14 / 15))
    assert s.lr[-1] == pytest.approx(last)
    assert s.weight_decay[0] == pytest.approx(0.04)
    assert s.weight_decay[-1] == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi * 19 / 20)))
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] < 1.0
    assert s.last_layer_frozen.tolist() == [True] * 5 + [False] * 15
    assert s.at(7) == {"lr": s.lr[7], "wd": s.weight_decay[7], "momentum": s.momentum[7]}
