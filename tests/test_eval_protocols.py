"""Protocols on a tiny random encoder and synthetic data with learnable structure.

A frozen random Swin keeps enough of its input for a trained head to beat chance clearly on
these tasks, so "above chance" checks the whole path (features, head, training, selection,
inference, metric) without a trained backbone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from fakes import TINY_STUDENT as TINY
from torch import Tensor, nn

from deo.errors import DataError
from deo.evaluation.encoders import FeatureEncoder, LoadedEncoder, load_encoder
from deo.evaluation.metrics import IGNORE_INDEX
from deo.evaluation.protocols import DenseConfig, LinearConfig, ProtocolConfig, run_protocol
from deo.evaluation.protocols.dense import DenseModel, TrainCrops, sliding_window, window_starts
from deo.evaluation.run import RESULT_COLUMNS, evaluate, read_results, run_job

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR = LinearConfig(epochs=30, batch_size=32, lrs=(1e-3, 1e-2), knn_k=5)
DENSE = DenseConfig(epochs=5, batch_size=4, lr=1e-3, crop_size=32, channels=32)
PROTOCOLS = ProtocolConfig(linear=LINEAR, segmentation=DENSE, change=DENSE)


@pytest.fixture(scope="module")
def encoder() -> LoadedEncoder:
    return load_encoder("random", name="floor", config=TINY, seed=0)


def classification(n: int, seed: int, classes: int = 4) -> list[dict[str, Tensor]]:
    """Class c raises channel c: linearly visible through any reasonable encoder."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    images = torch.randn(n, 10, 32, 32, generator=g)
    images[torch.arange(n), labels] += 1.5
    return [{"image": images[i], "label": labels[i]} for i in range(n)]


def multilabel(n: int, seed: int, labels: int = 3) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    hot = (torch.rand(n, labels, generator=g) < 0.4).float()
    images = torch.randn(n, 10, 32, 32, generator=g)
    images[:, :labels] += 2.0 * hot[:, :, None, None]
    return [{"image": images[i], "label": hot[i]} for i in range(n)]


def blocks(g: torch.Generator, size: int, draw: callable) -> Tensor:
    """A (size, size) map constant on 8x8 blocks, values from ``draw(shape)``."""
    cells = draw((size // 8, size // 8))
    return cells.repeat_interleave(8, 0).repeat_interleave(8, 1)


def segmentation(n: int, seed: int, size: int = 32) -> list[dict[str, Tensor]]:
    """Three classes in 8x8 blocks; class c raises channel c."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = blocks(g, size, lambda s: torch.randint(3, s, generator=g))
        image = 0.5 * torch.randn(10, size, size, generator=g)
        image[:3] += 2.0 * (mask[None] == torch.arange(3)[:, None, None])
        out.append({"image": image, "mask": mask})
    return out


def change(n: int, seed: int, size: int = 32) -> list[dict[str, Tensor]]:
    """Changed 8x8 blocks are brighter on the second date."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = blocks(g, size, lambda s: (torch.rand(s, generator=g) < 0.3).long())
        before = torch.randn(10, size, size, generator=g)
        after = before + 0.1 * torch.randn(10, size, size, generator=g) + 3.0 * mask
        out.append({"image1": before, "image2": after, "mask": mask})
    return out


def splits(make: callable, n_train: int = 64, n_eval: int = 32) -> dict[str, list]:
    return {"train": make(n_train, 0), "val": make(n_eval, 1), "test": make(n_eval, 2)}


def test_linear_probe_beats_chance_and_is_deterministic(encoder: LoadedEncoder) -> None:
    data = splits(classification)
    first = run_protocol("classification", encoder, "ms", data, 4, PROTOCOLS, seed=0)
    assert first["val"] > 0.6 and first["test"] > 0.6  # chance: 0.25
    assert first["knn_test"] > 0.5
    assert first["lr"] in LINEAR.lrs
    again = run_protocol("classification", encoder, "ms", data, 4, PROTOCOLS, seed=0)
    assert again == first


def test_multilabel_probe_reports_micro_and_macro(encoder: LoadedEncoder) -> None:
    metrics = run_protocol("multilabel", encoder, "ms", splits(multilabel), 3, PROTOCOLS, seed=0)
    assert metrics["test"] > 0.7  # all-positive guessing gives ~0.57
    assert 0 < metrics["test_macro"] <= 1 and 0 < metrics["knn_test"] <= 1


def test_segmentation_beats_chance_and_is_deterministic(encoder: LoadedEncoder) -> None:
    data = splits(segmentation, n_train=32, n_eval=4)
    data["test"] = segmentation(2, 2, size=48)  # larger than the crop: sliding windows
    first = run_protocol("segmentation", encoder, "ms", data, 3, PROTOCOLS, seed=1)
    assert first["val"] > 0.45 and first["test"] > 0.45  # chance mIoU ~0.2
    assert 1 <= first["epoch"] <= DENSE.epochs
    again = run_protocol("segmentation", encoder, "ms", data, 3, PROTOCOLS, seed=1)
    assert again == first


def test_change_detection_on_a_synthetic_pair(encoder: LoadedEncoder) -> None:
    data = splits(change, n_train=32, n_eval=4)
    # A few more steps than segmentation: the decoder's BatchNorm statistics lag behind early.
    cfg = dataclasses.replace(PROTOCOLS, change=dataclasses.replace(DENSE, epochs=8))
    metrics = run_protocol("change", encoder, "ms", data, 2, cfg, seed=0)
    # Predicting "changed" everywhere scores ~0.46 on 30 % change.
    assert metrics["val"] > 0.7 and metrics["test"] > 0.7


def test_finetune_trains_a_private_copy(encoder: LoadedEncoder) -> None:
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    tuned = dataclasses.replace(DENSE, epochs=1, finetune=True)
    cfg = dataclasses.replace(PROTOCOLS, segmentation=tuned)
    data = splits(segmentation, n_train=8, n_eval=2)
    metrics = run_protocol("segmentation", encoder, "ms", data, 3, cfg, seed=0)
    assert not math.isnan(metrics["test"])
    after = encoder.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sliding_window_covering_the_tile_is_whole_image_inference(
    encoder: LoadedEncoder,
) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DenseModel(FeatureEncoder(encoder, "ms"), 3, DENSE).eval()
    x = torch.randn(2, 10, 40, 56)
    with torch.inference_mode():
        whole = model(x)
    assert whole.shape == (2, 3, 40, 56)
    windowed = sliding_window(model, [x], window=64, stride=32, batch_size=4)
    torch.testing.assert_close(windowed, whole)


def test_sliding_window_stitches_overlaps_exactly() -> None:
    """A per-pixel model gives the same logits however the tile is cut into windows."""
    model = nn.Conv2d(10, 3, 1)
    x = torch.randn(1, 10, 40, 56)
    windowed = sliding_window(model, [x], window=16, stride=12, batch_size=3)
    with torch.inference_mode():
        torch.testing.assert_close(windowed, model(x))
    assert window_starts(40, 16, 12) == [0, 12, 24]
    assert window_starts(41, 16, 12) == [0, 12, 24, 25]
    assert window_starts(10, 16, 12) == [0]


def test_train_crops_pad_small_tiles_with_ignore() -> None:
    sample = {"image": torch.ones(10, 20, 24), "mask": torch.zeros(20, 24, dtype=torch.long)}
    crops = TrainCrops([sample], ("image",), crop=32, flip=True, seed=0)
    image, mask = crops[0]
    assert image.shape == (10, 32, 32) and mask.shape == (32, 32)
    assert int((mask == IGNORE_INDEX).sum()) == 32 * 32 - 20 * 24
    assert float(image.sum()) == 10 * 20 * 24
    again = crops[0]
    assert torch.equal(again[0], image) and torch.equal(again[1], mask)


@dataclasses.dataclass(frozen=True)
class FakeSpec:
    """The fields a job reads from a benchmark spec; ``make`` serves in-memory splits."""

    name: str = "fake-eurosat"
    group: str = "classification"
    task: str = "classification"
    metric: str = "top1"
    modality: str = "ms"
    num_classes: int = 4
    root_exists: bool = True

    def make(self, root: Path, split: str, **kwargs: object) -> list[dict[str, Tensor]]:
        if not self.root_exists:
            raise DataError(root, "FakeSpec data not found")
        return splits(classification, n_train=32, n_eval=16)[split]


def test_evaluate_rows_and_job_files(encoder: LoadedEncoder, tmp_path: Path) -> None:
    spec = FakeSpec()
    data = {s: spec.make(tmp_path, s) for s in ("train", "val", "test")}
    rows = evaluate(spec, data, encoder, PROTOCOLS, seed=0)
    assert [(r.split, r.metric) for r in rows] == [("val", "top1"), ("test", "top1")]
    assert all(0 <= r.value <= 100 and r.model == "floor" for r in rows)
    assert rows[1].selected.startswith("lr=") and not math.isnan(rows[1].knn_value)

    out = tmp_path / "fake-eurosat" / "floor" / "seed0.csv"
    run_job(spec, tmp_path, encoder, PROTOCOLS, seed=0, out=out)
    frame = read_results(out)
    assert tuple(frame.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert list(frame["status"]) == ["ok", "ok"]
    assert frame["value"].tolist() == pytest.approx([r.value for r in rows])
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["protocol"]["linear"]["epochs"] == LINEAR.epochs

    missing = tmp_path / "missing.csv"
    run_job(FakeSpec(root_exists=False), tmp_path, encoder, PROTOCOLS, seed=0, out=missing)
    frame = pd.read_csv(missing)
    assert list(frame["status"]) == ["missing", "missing"]
    assert frame["value"].isna().all() and "not found" in frame["reason"][0]
