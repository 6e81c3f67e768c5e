"""What a finished run hands downstream: the final checkpoint, metrics as CSV, exports."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from deo.errors import ConfigError
from deo.models.export import (
    TORCHGEO_SPEC,
    export_backbone,
    export_torchgeo,
    to_torchgeo,
    torchgeo_mismatches,
)
from deo.models.input_spec import training_input_spec
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


def export_run(checkpoint: Path, out: Path, stats: Path) -> dict:
    """Write the student backbone, and torchgeo's DEO layout with its input spec.

    ``stats`` is the store's per-band statistics (``stats.json``), the normalisation the run
    was trained with, so the spec describes this run's input. A student without an RGB
    embedding (an ablation without the optical path) has no torchgeo layout: that is recorded,
    not an error.
    """
    backbone, cfg = student_from_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    export_backbone(backbone, cfg.student, out / "backbone.safetensors")
    summary: dict = {"backbone": "backbone.safetensors", "torchgeo": None, "torchgeo_refused": None}
    try:
        band_stats = json.loads(Path(stats).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{stats}: cannot read the store's band statistics: {err}") from err
    spec = training_input_spec(
        band_stats,
        cfg.student.img_size,
        cfg.student.window_size,
        cfg.ablation.hr_optical,
        cfg.crops.normalisation,
    )
    # The run's input, whatever the layout: the evaluation reads it beside the backbone.
    spec.write(out / TORCHGEO_SPEC)
    summary["input_spec"] = TORCHGEO_SPEC
    try:
        weights, _ = export_torchgeo(backbone, cfg.student, out, spec)
    except ConfigError as e:
        log.warning("no torchgeo export: %s", e)
        summary["torchgeo_refused"] = str(e)
    else:
        summary["torchgeo"] = weights.name
        # Whether torchgeo.models.DEO() (swin_b, window 12) takes it strictly as it stands.
        summary["torchgeo_deo_strict"] = not torchgeo_mismatches(to_torchgeo(backbone))
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary
