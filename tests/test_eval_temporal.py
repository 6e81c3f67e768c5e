"""PASTIS as a time series: the reader's date selection, the L-TAE and linear temporal merges
(checked against explicit loops), and the segmentation protocol on series."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import TINY_STUDENT as TINY

from deo.data.bands import MS_BANDS
from deo.errors import ConfigError
from deo.evaluation.datasets import PASTIS
from deo.evaluation.encoders import FeatureEncoder, load_encoder
from deo.evaluation.protocols import DenseConfig, TemporalConfig
from deo.evaluation.protocols.segmentation import run_segmentation
from deo.evaluation.protocols.temporal import LTAE, LinearOverTime
from deo.models.input_spec import MODEL_BANDS

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]


def write_pastis(root: Path, steps: int = 5, size: int = 32, patches: int = 10) -> None:
    """PASTIS-R as torchgeo reads it: metadata.geojson (ID_PATCH, Fold), DATA_S2/S2_<id>.npy
    (T × 10 × H × W int16), ANNOTATIONS/TARGET_<id>.npy (classes in channel 0, 19 = void)."""
    rng = np.random.default_rng(3)
    base = root / "PASTIS-R"
    for sub in ("DATA_S2", "ANNOTATIONS"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    features = []
    for patch in range(patches):
        pid = 20000 + patch
        box = [[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]
        features.append(
            {
                "type": "Feature",
                "properties": {"ID_PATCH": pid, "Fold": patch % 5 + 1},
                "geometry": {"type": "Polygon", "coordinates": [box]},
            }
        )
        target = rng.integers(0, 3, (3, size, size)).astype(np.uint8)
        # Class 1 is bright in B08 on the third date only: visible only across time.
        series = rng.integers(500, 1500, (steps, 10, size, size)).astype(np.int16)
        series[2, 6][target[0] == 1] += 2000
        np.save(base / "DATA_S2" / f"S2_{pid}.npy", series)
        np.save(base / "ANNOTATIONS" / f"TARGET_{pid}.npy", target)
    geojson = {"type": "FeatureCollection", "features": features}
    (base / "metadata.geojson").write_text(json.dumps(geojson))


def test_pastis_series_keeps_evenly_spaced_dates_normalised_per_band(tmp_path: Path) -> None:
    write_pastis(tmp_path, size=8)
    ds = PASTIS(tmp_path, "val", dates=4)
    image = ds[0]["image"]
    assert image.shape == (4, 10, 8, 8)
    pid = ds._source.idxs[ds._indices[0]]
    series = np.load(tmp_path / "PASTIS-R" / "DATA_S2" / f"S2_{pid}.npy").astype(np.float64)
    stats = json.loads((tmp_path / "deo_band_stats.json").read_text())["bands"]
    for k, date in enumerate([0, 1, 3, 4]):  # round(linspace(0, 4, 4)) = 0, 1.33, 2.67, 4
        for c, band in enumerate(MS_BANDS):  # PASTIS's order, B2 … B12
            expected = (series[date, c] - stats[band]["mean"]) / stats[band]["std"]
            actual = image[k, MODEL_BANDS.index(band)].numpy()
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert PASTIS(tmp_path, "val")[0]["image"].shape == (10, 8, 8)  # the median option


def _group_norm(x: np.ndarray, groups: int, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """GroupNorm of one sample ``x`` (C, ...) by hand."""
    out = np.empty_like(x)
    per = x.shape[0] // groups
    for g in range(groups):
        part = x[g * per : (g + 1) * per]
        out[g * per : (g + 1) * per] = (part - part.mean()) / math.sqrt(part.var() + 1e-5)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return out * weight.reshape(shape) + bias.reshape(shape)


def test_ltae_matches_an_explicit_per_pixel_computation() -> None:
    torch.manual_seed(0)
    ltae = LTAE(channels=4, n_head=2, d_k=3, dropout=0.0)
    with torch.no_grad():
        for p in ltae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        bn = ltae.mlp[1]
        bn.running_mean.copy_(torch.randn(4) * 0.1)
        bn.running_var.copy_(torch.rand(4) + 0.5)
    ltae.eval()
    x = torch.randn(1, 3, 4, 1, 2)
    out = ltae(x).detach().numpy()
    w = {k: v.detach().numpy().astype(np.float64) for k, v in ltae.state_dict().items()}
    for col in range(2):
        seq = x[0, :, :, 0, col].numpy().astype(np.float64)  # (T, C)
        normed = _group_norm(seq.T, 2, w["in_norm.weight"], w["in_norm.bias"]).T
        proj = np.array([w["inconv.weight"][:, :, 0] @ v + w["inconv.bias"] for v in normed])
        heads = []
        for h in range(2):
            scores = []
            for t in range(3):
                key = w["key.weight"] @ proj[t] + w["key.bias"]
                scores.append(
                    sum(key[h * 3 + d] * w["query"][h, d] for d in range(3)) / math.sqrt(3)
                )
            e = np.exp(np.array(scores) - max(scores))
            a = e / e.sum()
            heads.extend(sum(a[t] * proj[t, h * 2 : (h + 1) * 2] for t in range(3)))
        hidden = w["mlp.0.weight"] @ np.array(heads) + w["mlp.0.bias"]
        hidden = (hidden - w["mlp.1.running_mean"]) / np.sqrt(w["mlp.1.running_var"] + 1e-5)
        hidden = np.maximum(hidden * w["mlp.1.weight"] + w["mlp.1.bias"], 0.0)
        expected = _group_norm(hidden, 2, w["out_norm.weight"], w["out_norm.bias"])
        np.testing.assert_allclose(out[0, :, 0, col], expected, rtol=1e-4, atol=1e-5)


def test_linear_over_time_is_a_learned_weighted_sum_of_dates() -> None:
    merge = LinearOverTime(3)
    x = torch.randn(2, 3, 5, 2, 2)
    weights, bias = merge.map.weight[0].detach(), merge.map.bias.detach()
    expected = sum(weights[t] * x[:, t] for t in range(3)) + bias
    torch.testing.assert_close(merge(x), expected)


def test_segmentation_protocol_trains_ltae_and_linear_merges_on_series(tmp_path: Path) -> None:
    write_pastis(tmp_path)
    data = {s: PASTIS(tmp_path, s, dates=5) for s in ("train", "val", "test")}
    encoder = FeatureEncoder(load_encoder("random", name="floor", config=TINY, seed=0), "ms")
    cfg = DenseConfig(epochs=2, batch_size=2, lr=1e-3, crop_size=32, channels=16)
    for aggregation in ("ltae", "linear"):
        temporal = TemporalConfig(aggregation=aggregation, dates=5)  # type: ignore[arg-type]
        metrics = run_segmentation(encoder, data, 19, cfg, seed=0, temporal=temporal)
        assert 0.0 <= metrics["test"] <= 1.0 and metrics["epoch"] in (1.0, 2.0)
    with pytest.raises(ConfigError, match="temporal aggregation"):
        run_segmentation(encoder, data, 19, cfg, seed=0, temporal=TemporalConfig("median"))
