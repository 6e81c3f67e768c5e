"""The teacher cache: equal to online targets, independent of its job split, resumable, refused
when stale, and replayed by training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from fakes import TINY_TEACHER, TINY_TRAIN, write_store
from torch.utils.data import default_collate

import deo.cache.build as build
from deo.cache.build import build_part, finalise
from deo.cache.codec import decode, encode
from deo.cache.reader import CachedTargets
from deo.cache.spec import CacheConfig, GlobalViews, split_teacher_section
from deo.data.augment import MultiCrop
from deo.data.loader import PretrainDataset
from deo.data.stats import read_stats
from deo.errors import ConfigError, DataError
from deo.models.teacher import VFMTeacher
from deo.train.checkpoint import load_checkpoint
from deo.train.config import parse_teacher, parse_train
from deo.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

N = 20  # store rows, in 3 blocks of 8 (the fake store's samples_per_shard)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_store(tmp_path_factory.mktemp("store"), n=N)


def make_cache(
    store: tuple[Path, Path],
    root: Path,
    *,
    train: dict | None = None,
    teacher: dict | None = None,
    **cache: object,
) -> Path:
    """Build and assemble a cache in ``root`` for a run's settings, all parts in this process."""
    views = GlobalViews.from_train(parse_train(train or TINY_TRAIN))
    cfg = CacheConfig(**{"batch_size": 3, **cache})
    records = [root / f"part{j}.json" for j in range(cfg.shards)]
    for j, record in enumerate(records):
        build_part(
            *store, parse_teacher(teacher or TINY_TEACHER), views, cfg, j, root / "work", record
        )
    finalise(records, root / "cache.zarr")
    return root / "cache.zarr"


def training_multicrop(cfg: dict, store: Path) -> MultiCrop:
    """The MultiCrop the training loop builds for ``cfg``."""
    return MultiCrop.for_training(parse_train(cfg), read_stats(store))


def relative_error(cached: torch.Tensor, online: torch.Tensor) -> float:
    return float((cached - online).norm() / online.norm())


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("hr_optical", [True, False], ids=["partner_rgb", "derived_rgb"])
def test_cached_targets_equal_online_targets(store, tmp_path, precision, hr_optical) -> None:
    """Training's replay of two drawn views renders the cached views bit for bit, and the
    teacher's online outputs for them equal the cached ones to the precision's error."""
    cfg = dict(TINY_TRAIN, ablation={"hr_optical": hr_optical})
    cache = CachedTargets(make_cache(store, tmp_path, train=cfg, precision=precision))
    rows = torch.tensor([13, 2, 7, 19, 8, 0])
    params, cached = cache.draw(rows, torch.Generator().manual_seed(1))

    data = PretrainDataset(*store, with_rgb=hr_optical).__getitems__(rows.tolist())
    batch = default_collate(data)
    views = training_multicrop(cfg, store[0])(
        batch["s2"],
        batch.get("rgb"),
        batch.get("has_rgb"),
        torch.Generator().manual_seed(2),
        global_params=params,
    )
    vfm = VFMTeacher(parse_teacher(TINY_TEACHER))
    bound = {"fp16": 1e-3, "int8": 1.5e-2}[precision]
    for slot, view in enumerate(views.global_rgb):
        online = vfm(view, normalised=True)
        assert cached[slot].grid == online.grid
        for name in ("cls", "patch_final", "patch_mid"):
            error = relative_error(getattr(cached[slot], name), getattr(online, name))
            assert error <= bound, f"{precision} {name} slot {slot}: relative error {error:.2e}"


def test_draw_fills_each_slot_with_a_view_of_its_kind(store, tmp_path) -> None:
    """K = 6: slot 0 gets views 0, 2, 4 (DINO's global view 1, always blurred), slot 1 views
    1, 3, 5; every one of them is drawn, and the two slots never get the same view."""
    cache = CachedTargets(make_cache(store, tmp_path, views=6))
    rows = torch.arange(N).repeat(20)
    params, _ = cache.draw(rows, torch.Generator().manual_seed(0))
    every = [cache.read(rows.numpy(), np.full(len(rows), k))[0] for k in range(6)]
    for slot in (0, 1):
        which = torch.stack([(params[slot].box == view.box).all(dim=1) for view in every], dim=1)
        assert (which.sum(dim=1) == 1).all()
        kinds = which.float().argmax(dim=1)
        assert set(kinds.tolist()) == {slot, slot + 2, slot + 4}
    assert (params[0].blur_sigma > 0).all()


def test_two_jobs_build_the_cache_one_job_builds(store, tmp_path) -> None:
    one = zarr.open_group(make_cache(store, tmp_path / "one", shards=1), mode="r")
    two = zarr.open_group(make_cache(store, tmp_path / "two", shards=2), mode="r")
    assert dict(one.attrs) == dict(two.attrs)
    arrays = dict(one.members(max_depth=None))
    assert {"cls", "patch_final", "patch_mid", "params/box"} <= set(arrays)
    for name, array in arrays.items():
        if isinstance(array, zarr.Array):
            assert np.array_equal(array[:], two[name][:]), name
    assert not (tmp_path / "two" / "work").exists(), "finalise removes the parts"


def test_an_interrupted_job_resumes_where_it_stopped(store, tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    interrupt = True
    original = build.compute_block

    def counted(dataset, rows, *args):
        if interrupt and calls:
            raise KeyboardInterrupt  # the job is killed while computing its second block
        calls.append(int(rows[0]))
        return original(dataset, rows, *args)

    monkeypatch.setattr(build, "compute_block", counted)
    with pytest.raises(KeyboardInterrupt):
        make_cache(store, tmp_path / "resumed")
    interrupt = False
    resumed = zarr.open_group(make_cache(store, tmp_path / "resumed"), mode="r")
    assert calls == [0, 8, 16], "the block written before the interrupt is not recomputed"
    straight = zarr.open_group(make_cache(store, tmp_path / "straight"), mode="r")
    for name in ("cls", "patch_mid", "params/box"):
        assert np.array_equal(resumed[name][:], straight[name][:])


@pytest.mark.parametrize(
    ("what", "train", "teacher", "message"),
    [
        ("weights", None, dict(TINY_TEACHER, seed=1), "teacher.weights_digest"),
        ("layers", None, dict(TINY_TEACHER, mid_layer=1), "teacher.mid_layer: cache 2, this run 1"),
        ("crops", dict(TINY_TRAIN, crops={"global_size": 32, "global_scale": [0.5, 1.0]}), None,
         "global views.global_scale"),
        ("rgb source", dict(TINY_TRAIN, ablation={"hr_optical": False}), None, "global views.rgb"),
        ("optical aug", dict(TINY_TRAIN, ablation={"optical_aug": False}), None,
         "global views.optical_aug"),
        ("interpolation", dict(TINY_TRAIN, crops={"global_size": 32, "interpolation": "bilinear"}),
         None, "global views.interpolation"),
    ],
)  # fmt: skip
def test_a_cache_of_other_settings_is_refused(store, tmp_path, what, train, teacher, message):
    path = make_cache(store, tmp_path)
    views = GlobalViews.of(training_multicrop(train or TINY_TRAIN, store[0]))
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        CachedTargets(path).verify_run(parse_teacher(teacher or TINY_TEACHER), *store, views)


def test_a_cache_of_another_store_is_refused(store, tmp_path) -> None:
    path = make_cache(store, tmp_path)
    other = write_store(tmp_path / "other", n=N, seed=1)
    views = GlobalViews.from_train(parse_train(TINY_TRAIN))
    with pytest.raises(DataError, match="store digest"):
        CachedTargets(path).verify_run(parse_teacher(TINY_TEACHER), *other, views)
    CachedTargets(path).verify_run(parse_teacher(TINY_TEACHER), *store, views)  # its own: fine


def test_training_only_keys_leave_the_cache_valid(store, tmp_path) -> None:
    path = make_cache(store, tmp_path)
    cfg = dict(TINY_TRAIN, epochs=7, seed=3, crops={"global_size": 32, "n_local": 5})
    views = GlobalViews.of(training_multicrop(cfg, store[0]))
    assert views == GlobalViews.from_train(parse_train(cfg))
    CachedTargets(path).verify_run(parse_teacher(TINY_TEACHER), *store, views)


def test_cached_training_never_runs_the_vfm_and_resumes_exactly(store, tmp_path, monkeypatch):
    cache = make_cache(store, tmp_path)

    def no_forward(self, rgb, normalised=False):
        raise AssertionError("the VFM ran in cached mode")

    monkeypatch.setattr(VFMTeacher, "forward", no_forward)
    cfg, teacher = parse_train(TINY_TRAIN), parse_teacher(TINY_TEACHER)
    run = dict(device="cpu", progress=False, teacher_cache=cache)
    straight = train(cfg, teacher, *store, tmp_path / "straight", max_steps=6, **run)
    train(cfg, teacher, *store, tmp_path / "halves", max_steps=3, **run)
    halves = train(cfg, teacher, *store, tmp_path / "halves", max_steps=6, **run)
    a, b = load_checkpoint(straight), load_checkpoint(halves)
    for name, tensor in a["student"].items():
        assert torch.equal(tensor, b["student"][name]), name
    assert a["vfm_digest"] == VFMTeacher(teacher).weights_digest()
    metrics = [json.loads(line) for line in (tmp_path / "straight/metrics.jsonl").open()]
    assert all(np.isfinite(m["patch_mid"]) and m["patch_mid"] != 0 for m in metrics)
    resolved = json.loads((tmp_path / "straight/config.json").read_text())
    assert resolved["teacher_cache"]["k"] == 4


def test_resuming_with_another_cache_is_refused(store, tmp_path) -> None:
    cfg, teacher = parse_train(TINY_TRAIN), parse_teacher(TINY_TEACHER)
    run = dict(device="cpu", progress=False)
    train(cfg, teacher, *store, tmp_path / "run", max_steps=1, **run)
    cache = make_cache(store, tmp_path / "cache")
    with pytest.raises(ValueError, match="written by another configuration"):
        train(cfg, teacher, *store, tmp_path / "run", max_steps=2, teacher_cache=cache, **run)


def test_int8_error_is_half_a_step_of_each_tokens_scale() -> None:
    x = torch.randn(5, 7, 48) * torch.logspace(-3, 2, 7)[:, None]
    x[0, 0] = 0.0
    stored = encode(x, "int8")
    assert stored[""].dtype == np.int8 and stored["_scale"].shape == (5, 7)
    error = (decode(stored) - x).abs()
    assert (error <= torch.from_numpy(stored["_scale"])[..., None] / 2 + 1e-7).all()
    assert decode(stored)[0, 0].eq(0).all()
    assert relative_error(decode(encode(x, "fp16")), x) < 2**-11


def test_config_keys() -> None:
    with pytest.raises(ConfigError, match="multiple of 2"):
        CacheConfig(views=3)
    model, caching = split_teacher_section(dict(TINY_TEACHER, mode="cached", views=4, cache={}))
    assert model == TINY_TEACHER and caching == {"mode": "cached", "views": 4, "cache": {}}
