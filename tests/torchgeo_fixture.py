"""The torchgeo 0.10.1 DEO reference fixture: its seeded weights, inputs and stored outputs.

``tests/data/torchgeo_deo/make_fixture.py`` runs torchgeo's own ``DEO`` (from its source) on
the weights and inputs defined here and stores the key names and shapes of its state dict and
a fixed sample of its four stage outputs. The tests rebuild the same weights and inputs from
this module alone (numpy generators seeded by name), so they never import torchgeo.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

FIXTURE_DIR = Path(__file__).parent / "data" / "torchgeo_deo"
KEYS_FILE = FIXTURE_DIR / "keys.json"
OUTPUTS_FILE = FIXTURE_DIR / "outputs.npz"
SEED = 2026
# case -> (input channels, image size): the MS path at the paper's crop (224, every stage
# padded for window 12) and at 384 (no padding), and the optical path at 224.
CASES: dict[str, tuple[int, int]] = {"ms224": (10, 224), "ms384": (10, 384), "rgb224": (3, 224)}
N_STAGES = 4
SAMPLES = 512  # values kept per stage output


def _rng(*words: str) -> np.random.Generator:
    return np.random.default_rng([SEED, *(zlib.crc32(w.encode()) for w in words)])


def fixture_weights(shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """float32 weights per torchgeo key (position-index buffers excluded: they are computed).

    Scales keep every block doing real work: unit-gain linear maps, norms near 1, biases and
    position tables large enough that attention is far from uniform and attends to padding.
    """
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name.endswith("relative_position_index"):
            continue
        noise = _rng("weight", name).standard_normal(shape)
        if name.endswith("relative_position_bias_table"):
            value = noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif len(shape) == 1:  # LayerNorm weight
            value = 1.0 + 0.1 * noise
        else:  # Linear (out, in) or Conv2d (out, in, k, k): unit gain over the fan-in
            value = noise / np.sqrt(np.prod(shape[1:]))
        out[name] = value.astype(np.float32)
    return out


def fixture_input(case: str) -> np.ndarray:
    """(1, C, S, S) float32 input of ``case``."""
    channels, size = CASES[case]
    return _rng("input", case).standard_normal((1, channels, size, size)).astype(np.float32)


def sample_index(case: str, stage: int, numel: int) -> np.ndarray:
    """Fixed flat indices into a stage output (channels-last, as torchgeo returns it)."""
    return np.sort(_rng("sample", case, str(stage)).choice(numel, SAMPLES, replace=False))


def summarise(case: str, stages: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What the fixture keeps of ``case``'s channels-last stage outputs."""
    out: dict[str, np.ndarray] = {}
    for stage, value in enumerate(stages):
        flat = value.astype(np.float64).ravel()
        key = f"{case}/{stage}"
        out[f"{key}/shape"] = np.array(value.shape)
        out[f"{key}/values"] = flat[sample_index(case, stage, flat.size)].astype(np.float32)
        out[f"{key}/sum"] = np.array(flat.sum())
        out[f"{key}/norm"] = np.array(np.linalg.norm(flat))
    return out


def read_keys() -> dict[str, list[int]]:
    return json.loads(KEYS_FILE.read_text())


def relative_errors(case: str, stages: list[np.ndarray], stored: dict) -> dict[str, float]:
    """Largest relative error of ``stages`` (channels-last) against the stored reference."""
    worst = {"values": 0.0, "sum": 0.0, "norm": 0.0}
    for stage, value in enumerate(stages):
        key = f"{case}/{stage}"
        assert tuple(value.shape) == tuple(stored[f"{key}/shape"]), (key, value.shape)
        flat = value.astype(np.float64).ravel()
        ref = stored[f"{key}/values"].astype(np.float64)
        got = flat[sample_index(case, stage, flat.size)]
        norm = float(stored[f"{key}/norm"])
        worst["values"] = max(
            worst["values"], float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        )
        # The sum is compared on the scale of the whole output (it may be near zero itself).
        worst["sum"] = max(worst["sum"], abs(flat.sum() - float(stored[f"{key}/sum"])) / norm)
        worst["norm"] = max(worst["norm"], abs(np.linalg.norm(flat) - norm) / norm)
    return worst
