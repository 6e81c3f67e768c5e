"""What a finished run hands downstream: the final checkpoint, metrics as CSV, exports."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from deo.errors import ConfigError
from deo.models.export import export_backbone, export_torchgeo
from deo.models.student import DualEmbedSwin
from deo.train.checkpoint import load_checkpoint
from deo.train.config import parse_train

log = logging.getLogger(__name__)


def publish_run(work: Path, checkpoint: Path, metrics_csv: Path) -> None:
    """Copy the finished run's checkpoint and write its per-step metrics as CSV."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    shutil.copyfile(work / "checkpoint.pt", tmp)
    tmp.replace(checkpoint)
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    pd.DataFrame(rows).to_csv(metrics_csv, index=False)


def student_from_checkpoint(path: Path) -> tuple[DualEmbedSwin, object]:
    """The trained student backbone and its config, rebuilt from a checkpoint alone."""
    state = load_checkpoint(path)
    cfg = parse_train(json.loads(state["config"])["train"])
    backbone = DualEmbedSwin(cfg.student, with_rgb=cfg.ablation.optical_path)
    prefix = "backbone."
    backbone.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state["student"].items() if k.startswith(prefix)}
    )
    return backbone.eval(), cfg


def export_run(checkpoint: Path, out: Path) -> dict:
    """Write the student backbone, and torchgeo's Swin layout where the architecture allows it."""
    backbone, cfg = student_from_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    export_backbone(backbone, cfg.student, out / "backbone.safetensors")
    summary = {"backbone": "backbone.safetensors", "torchgeo": None, "torchgeo_refused": None}
    try:
        export_torchgeo(backbone, cfg.student, out / "torchgeo_swin.pth")
        summary["torchgeo"] = "torchgeo_swin.pth"
    except ConfigError as e:
        log.warning("no torchgeo export: %s", e)
        summary["torchgeo_refused"] = str(e)
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary
