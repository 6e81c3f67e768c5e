"""One real training step of the resolved paper run at the paper's shapes, then its export.

The only big test (peak 9.1 GB resident, 125 s of CPU time on 2 cores): everything model-related
comes from ``config/paper.yaml`` as ``deo config`` resolves it (Swin-B, 2 x 224 + 10 x 96
crops, the ViT-B/16 DINOv3 VFM); the overrides touch the data side only (batch 2 from a
6-sample store, so one covariance group; no workers, no compile) and give the VFM random
weights of its architecture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml
from fakes import write_store
from safetensors.torch import save_file
from torch import nn
from torchvision.models import swin_b
from torchvision.models.swin_transformer import ShiftedWindowAttention
from torchvision.ops.misc import Permute

from deo.config import to_dict
from deo.train.config import parse_train, run_config
from deo.workflow import resolve_config

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "config/paper.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def deo(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "deo.cli", *args], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, f"deo {args[0]} failed:\n{done.stderr[-4000:]}"
    return done.stdout


def random_vfm(arch: str, path: Path) -> Path:
    """Random weights of the paper's VFM architecture, as a timm .safetensors file."""
    model = timm.create_model(arch, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def swin_b_window12() -> nn.Module:
    """torchvision's swin_b with torchgeo 0.10.1's DEO window of 12 (its ``DEO.__init__``)."""
    model = swin_b()
    for module in model.modules():
        if isinstance(module, ShiftedWindowAttention):
            shifted = sum(module.shift_size) > 0
            module.window_size = [12, 12]
            module.shift_size = [6, 6] if shifted else [0, 0]
            module.define_relative_position_bias_table()
            module.define_relative_position_index()
    return model


def embedding(in_chans: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_chans, 128, 4, 4), Permute([0, 2, 3, 1]), nn.LayerNorm(128))


def torchgeo_deo() -> nn.Module:
    """torchgeo 0.10.1's ``DEO`` module, rebuilt from its source on torchvision alone (torchgeo
    needs Python >= 3.12): ``feat_extr`` = swin_b without its stem and head, window 12, and
    the two stems ``conv_ms`` (10 bands) and ``conv_rgb``."""
    feat_extr = swin_b_window12()
    del feat_extr.features[0]
    del feat_extr.head
    feat_extr.conv_ms, feat_extr.conv_rgb = embedding(10), embedding(3)
    deo = nn.Module()
    deo.feat_extr = feat_extr
    return deo


def torchvision_layout() -> nn.Module:
    """The same network in torchvision's own layout: a 10-band stem, no classifier."""
    model = swin_b_window12()
    model.features[0][0] = nn.Conv2d(10, 128, 4, 4)
    model.head = nn.Identity()
    return model


def load_export(path: Path) -> nn.Module:
    """Strictly load an exported file into torchgeo's DEO layout (``feat_extr.*``) or, for an
    export in torchvision's plain layout, into torchvision's swin_b with window 12."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    torchgeo = all(k.startswith("feat_extr.") for k in state)
    model = torchgeo_deo() if torchgeo else torchvision_layout()
    model.load_state_dict(state, strict=True)
    return model.feat_extr if torchgeo else model


def test_paper_run_trains_one_step_and_exports_to_torchgeo(tmp_path: Path) -> None:
    store, table = write_store(tmp_path, n=6, tile=224)  # 2 train samples: one batch of 2
    overrides = {
        # batch 2 on one rank cannot split into the paper's 16 covariance groups: one group
        "train": {
            "defaults": {
                "batch_size": 2,
                "workers": 0,
                "compile": False,
                "loss": {"cov_groups": None},
            }
        },
        "teacher": {"weights": "vfm.safetensors"},  # placeholder path, set below
    }
    paper = yaml.safe_load(PAPER.read_text())
    weights = random_vfm(paper["teacher"]["arch"], tmp_path / "vfm.safetensors")
    overrides["teacher"]["weights"] = str(weights)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(overrides))
    configfiles = ["--configfile", "config/paper.yaml", str(tmp_path / "data.yaml")]
    doc = json.loads(deo("config", *configfiles, "--run", "deo", "--json"))
    train, teacher = doc["runs"]["deo"]["train"], doc["config"]["teacher"]
    # the model is the paper's: only the data-side keys differ from the resolved paper run
    paper_run = to_dict(parse_train(run_config(resolve_config([PAPER], root=ROOT)["train"], "deo")))
    data_side = overrides["train"]["defaults"]
    expected = {**paper_run, **data_side, "loss": {**paper_run["loss"], **data_side["loss"]}}
    assert train == expected
    assert train["student"]["depths"] == [2, 2, 18, 2] and train["crops"]["n_local"] == 10
    assert 86e6 <= doc["runs"]["deo"]["parameters"]["student"] <= 88e6
    vfm = {k: v for k, v in teacher.items() if k not in ("mode", "views", "cache")}

    run, checkpoint, metrics = tmp_path / "run", tmp_path / "checkpoint.pt", tmp_path / "m.csv"
    deo(
        "train",
        *("--train", json.dumps(train), "--teacher", json.dumps(vfm)),
        *("--store", str(store), "--table", str(table), "--out", str(run)),
        *("--device", "cpu", "--max-steps", "1"),
        *("--final-checkpoint", str(checkpoint), "--final-metrics", str(metrics)),
    )
    rows = pd.read_csv(metrics)
    assert len(rows) == 1 and rows[["loss", "cls", "patch_final", "patch_mid"]].notna().all(
        axis=None
    )
    assert (rows[["cls", "patch_final", "patch_mid"]] != 0).all(axis=None)  # every VFM term ran

    export = tmp_path / "export"
    stats = (
        ["--stats", str(tmp_path / "stats.json")] if "--stats" in deo("export", "--help") else []
    )
    deo("export", "--checkpoint", str(checkpoint), "--out", str(export), *stats)
    summary = json.loads((export / "export.json").read_text())
    assert summary["torchgeo"], summary
    model = load_export(export / summary["torchgeo"])
    x = torch.randn(1, 10, 224, 224)
    assert model.features[-1][-1].attn.window_size == [12, 12]
    with torch.no_grad():
        out = model.eval().features(model.conv_ms(x) if hasattr(model, "conv_ms") else x)
    assert out.shape == (1, 7, 7, 1024) and torch.isfinite(out).all()
