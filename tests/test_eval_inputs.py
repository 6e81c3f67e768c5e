"""Model inputs of the evaluation: value scales read from the product, the model's input spec,
optical benchmarks through the MS embedding, and the degenerate-input warnings."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from deo.data.bands import MS_BANDS
from deo.errors import ConfigError
from deo.evaluation.datasets import GeoBenchClassification, GeoBenchSegmentation
from deo.evaluation.inputs import (
    BandStats,
    InputMapping,
    ModelInput,
    canonical_s2,
    input_warnings,
    value_scale,
)
from deo.evaluation.run import check_inputs
from deo.models.input_spec import MODEL_BANDS, RELEASED_DEO, InputSpec

pytestmark = pytest.mark.timeout(60)

RGB_KEYS = ("Red", "Green", "Blue")


def _percentiles(values: np.ndarray) -> dict[str, float]:
    q = {"0_1": 0.1, "1": 1, "5": 5, "95": 95, "99": 99, "99_9": 99.9}
    return {f"percentile_{k}": float(np.percentile(values, p)) for k, p in q.items()}


def write_geobench_rgb(root: Path, dtype: str, task: str, n: int = 3, size: int = 8) -> Path:
    """A GEO-Bench optical task as GEO-Bench writes it: one HDF5 per sample (a 2-D dataset per
    band, ``label`` for segmentation, the pickled attribute dict), ``band_stats.json`` with
    each band's moments, range and percentiles over the task, and the partition file.

    ``dtype`` float32 gives values in [0, 1] (as m-chesapeake-landcover), uint8 up to 255.
    """
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"sample_{i}" for i in range(n)]
    seen: dict[str, list[np.ndarray]] = {b: [] for b in RGB_KEYS}
    for i, name in enumerate(names):
        with h5py.File(root / f"{name}.hdf5", "w") as f:
            for band in RGB_KEYS:
                if dtype == "float32":
                    data = rng.uniform(0.02, 0.97, (size, size)).astype(np.float32)
                else:
                    data = rng.integers(3, 251, (size, size)).astype(np.uint8)
                f.create_dataset(band, data=data)
                seen[band].append(data)
            label: object = i % 2
            if task == "segmentation":
                f.create_dataset("label", data=rng.integers(0, 3, (size, size)).astype(np.uint8))
                label = None
            attrs: dict[str, object] = {
                b: {"date": None, "spatial_resolution": 1} for b in RGB_KEYS
            }
            attrs["label"] = label
            f.attrs["pickle"] = str(pickle.dumps(attrs, protocol=4))
    stats = {}
    for band, arrays in seen.items():
        values = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
        stats[band] = {
            "max": float(values.max()),
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "min": float(values.min()),
            "std": float(values.std()),
            **_percentiles(values),
        }
    (root / "band_stats.json").write_text(json.dumps(stats, indent=4))
    partition = {"train": names, "valid": names[:1], "test": names[1:]}
    (root / "default_partition.json").write_text(json.dumps(partition))
    return root


def _raw(root: Path, name: str) -> np.ndarray:
    with h5py.File(root / f"{name}.hdf5", "r") as f:
        return np.stack([np.asarray(f[b]) for b in RGB_KEYS])


def test_value_scale_is_read_from_dtype_and_declared_range() -> None:
    assert value_scale("float32", 0.97) == 1.0
    assert value_scale("float64", 1.0) == 1.0
    assert value_scale("float32", 254.0) == 255.0
    assert value_scale("uint8") == 255.0
    assert value_scale("int16", 250.0) == 255.0
    assert value_scale("uint16", 3000.0) == 4095.0
    assert value_scale("uint16", 30000.0) == 65535.0
    with pytest.raises(ValueError, match="declared maximum"):
        value_scale("float32")


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_geobench_float_and_integer_rgb_reach_the_model_in_unit_range(
    tmp_path: Path, dtype: str, task: str
) -> None:
    root = write_geobench_rgb(tmp_path / f"{dtype}-{task}", dtype, task)
    reader = GeoBenchSegmentation if task == "segmentation" else GeoBenchClassification
    ds = reader(root, "test", task_name="fake", modality="rgb")
    divisor = 1.0 if dtype == "float32" else 255.0
    assert ds.mapping.rgb_scale == divisor
    for i, name in enumerate(ds.sample_names):
        image = ds[i]["image"].numpy()
        assert image.shape == (3, 8, 8) and image.min() >= 0.0 and image.max() <= 1.0
        np.testing.assert_allclose(image, _raw(root, name).astype(np.float64) / divisor, rtol=1e-6)
    # A float task read as if 8-bit would be nearly black: the check names benchmark and scale.
    wrong = InputMapping("rgb", ("red", "green", "blue"), rgb_scale=255.0, source="x")
    images = [wrong(_raw(root, n).astype(np.float32)) for n in ds.sample_names]
    if dtype == "float32":
        assert any(
            "nearly black" in w and "chesa" in w for w in input_warnings("chesa", wrong, images)
        )


def test_released_spec_normalises_optical_and_ms_channels_as_torchgeo() -> None:
    spec = RELEASED_DEO
    model = ModelInput(spec, "model", optical_path=True)
    assert model.channels[:3] == ("B04", "B03", "B02")
    rng = np.random.default_rng(0)
    bands = list(MS_BANDS)  # benchmark order B02 … B12, as GEO-Bench and PASTIS give them
    raw = rng.uniform(100, 4000, (len(bands), 4, 4)).astype(np.float32)
    stats = BandStats({b: 1.0 for b in bands}, {b: 1.0 for b in bands})
    out = InputMapping("ms", bands, stats=stats, model=model)(raw).numpy()
    top = max(raw[bands.index(b)].max() for b in ("B04", "B03", "B02"))
    for c, name in enumerate(spec.bands):
        x = raw[bands.index(name)].astype(np.float64)
        if c in spec.optical_channels:
            x = x / top
        np.testing.assert_allclose(out[c], (x - spec.mean[c]) / spec.std[c], rtol=1e-5, atol=1e-5)
    # The benchmark switch keeps the benchmark's statistics, in the model's channel order.
    own = ModelInput(spec, "benchmark")
    stats = BandStats({b: 10.0 * i for i, b in enumerate(bands)}, {b: 2.0 for b in bands})
    kept = InputMapping("ms", bands, stats=stats, model=own)(raw).numpy()
    j = bands.index("B04")
    np.testing.assert_allclose(kept[0], (raw[j] - 10.0 * j) / 2.0, rtol=1e-5)


def test_optical_benchmark_through_the_ms_embedding_of_a_model_without_optical_path() -> None:
    raw = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2) * 20
    no_spec = InputMapping("rgb", ("blue", "green", "red"), rgb_scale=255.0)
    assert no_spec.embedding == "rgb"
    floor = no_spec.for_model(ModelInput(None, "model", optical_path=False))
    out = floor(raw).numpy()
    assert floor.embedding == "ms" and out.shape == (10, 2, 2)
    for name, src in (("B04", 2), ("B03", 1), ("B02", 0)):  # channels given blue, green, red
        np.testing.assert_allclose(out[MODEL_BANDS.index(name)], raw[src] / 255.0, rtol=1e-6)
    others = [i for i, b in enumerate(MODEL_BANDS) if b not in ("B04", "B03", "B02")]
    assert np.all(out[others] == 0.0)

    text = json.dumps(
        {
            "bands": ["B4", "B3", "B2", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"],
            "optical_channels": [0, 1, 2],
            "optical_scale": 255,
            "mean": [0.5, 0.4, 0.3, 1, 1, 1, 1, 1, 1, 1],
            "std": [0.2, 0.25, 0.5, 1, 1, 1, 1, 1, 1, 1],
            "img_size": 224,
            "window_size": 12,
        }
    )
    spec = InputSpec.from_json(text)  # torchgeo's spelling, as a checkpoint's metadata has it
    assert [canonical_s2(b) for b in spec.bands[:3]] == ["B04", "B03", "B02"]
    ms = no_spec.for_model(ModelInput(spec, "model", optical_path=False))(raw).numpy()
    for c, src in enumerate((2, 1, 0)):
        expected = (raw[src] / 255.0 - spec.mean[c]) / spec.std[c]
        np.testing.assert_allclose(ms[c], expected, rtol=1e-5)
    assert np.all(ms[3:] == 0.0)


def test_spec_json_round_trip_and_bad_normalisation_switch() -> None:
    assert InputSpec.from_json(RELEASED_DEO.to_json()) == RELEASED_DEO
    with pytest.raises(ConfigError, match="normalisation"):
        ModelInput(None, "per-band")  # type: ignore[arg-type]


def test_nearly_constant_channel_is_warned_with_benchmark_and_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_geobench_rgb(tmp_path / "flat", "uint8", "classification")
    for name in ("sample_1", "sample_2"):
        with h5py.File(root / f"{name}.hdf5", "a") as f:
            f["Green"][...] = 7
    ds = GeoBenchClassification(root, "test", task_name="m-flat", modality="rgb")
    with caplog.at_level(logging.WARNING):
        problems = check_inputs("m-flat", ds)
    assert len(problems) == 1 and "channel 1 (green)" in problems[0]
    assert "m-flat" in caplog.text and "nearly constant" in caplog.text
    assert torch.all(ds[0]["image"][1] == 7 / 255.0)


def test_ms_values_far_from_the_declared_statistics_are_warned() -> None:
    bands = ("B02", "B03", "B04")
    stats = BandStats(dict.fromkeys(bands, 1500.0), dict.fromkeys(bands, 900.0))
    mapping = InputMapping("ms", bands, stats=stats, source="m-x")
    rng = np.random.default_rng(0)
    dn = [mapping(rng.uniform(500, 3000, (3, 4, 4)).astype(np.float32)) for _ in range(2)]
    assert input_warnings("m-x", mapping, dn) == []
    reflectance = [mapping(rng.uniform(0, 0.1, (3, 4, 4)).astype(np.float32)) for _ in range(2)]
    # Reflectance normalised with DN statistics: every channel collapses to a constant.
    flat = input_warnings("m-x", mapping, reflectance)
    assert [w.split(" is ")[0] for w in flat] == [
        "m-x: channel 0 (B04)",
        "m-x: channel 1 (B03)",
        "m-x: channel 2 (B02)",
    ]
    tenfold = BandStats(dict.fromkeys(bands, 15.0), dict.fromkeys(bands, 9.0))
    scaled = InputMapping("ms", bands, stats=tenfold, source="m-x")
    far = input_warnings("m-x", scaled, [scaled(rng.uniform(500, 3000, (3, 4, 4)))])
    assert len(far) == 3 and all("far from the range" in w for w in far)
    assert far[2].startswith("m-x: channel 2 (B02) averages")
