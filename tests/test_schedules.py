"""Schedules against hand-computed values of the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deo.train.schedules import build_schedules, cosine


def test_cosine_with_warmup_matches_formula() -> None:
    s = cosine(1.0, 0.1, total_steps=10, warmup_steps=4)
    assert len(s) == 10
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])
    for i in range(6):  # decay over the 6 remaining steps, from 1.0 at i=0 to 0.1 at i=5
        expected = 0.1 + 0.45 * (1 + math.cos(math.pi * i / 5))
        assert s[4 + i] == pytest.approx(expected)
    assert s[4] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)


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
    assert s.lr[5] == pytest.approx(1e-3) and s.lr[-1] == pytest.approx(1e-6)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0)
    assert s.last_layer_frozen.tolist() == [True] * 5 + [False] * 15
    assert s.at(7) == {"lr": s.lr[7], "wd": s.weight_decay[7], "momentum": s.momentum[7]}
