"""The config the jobs see: --configfile replaces the demo, no demo value reaches the paper."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from snakemake.utils import update_config
from torchvision.models.swin_transformer import SwinTransformer

from deo.cli import main
from deo.config import to_dict
from deo.describe import describe
from deo.errors import ConfigError
from deo.train.config import parse_train, run_config
from deo.train.meta_arch import DualTeacherDistillation
from deo.workflow import EMBEDDED_DEFAULT, resolve_config

ROOT = Path(__file__).parents[1]
PAPER, DEMO = ROOT / "config/paper.yaml", ROOT / "config/config.yaml"
# Keys the demo states that only the tiny random teacher reads; the paper's teacher is real.
INERT_IN_PAPER = {("teacher", k) for k in ("tiny_embed_dim", "tiny_depth", "tiny_heads", "seed")}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def leaves(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Every leaf by its key path; lists and empty mappings are leaves."""
    if isinstance(tree, dict) and tree:
        out: dict[tuple, Any] = {}
        for key, value in tree.items():
            out.update(leaves(value, (*prefix, key)))
        return out
    return {prefix: tree}


def demo_leaks(resolved: dict, paper_file: dict, demo_file: dict) -> list[str]:
    """Values the demo file states that a resolved paper config holds though its file does not.

    Per run for ``train`` (defaults + the run's overrides, typed, as the job parses them); a
    value equal to the demo's at a path the demo states but the paper's file never does can
    only have come from the demo (or from a default that happens to equal it: state it).
    """
    demo = resolve_config([DEMO], root=ROOT)
    leaks = []
    for section in ("data", "teacher", "evaluate"):
        stated_demo = leaves(demo_file[section], (section,))
        stated_paper = leaves(paper_file.get(section, {}), (section,))
        demo_values = leaves(demo[section], (section,))
        for path, value in leaves(resolved[section], (section,)).items():
            if path in INERT_IN_PAPER:
                continue
            if path in stated_demo and path not in stated_paper and value == demo_values[path]:
                leaks.append(".".join(path))
    demo_train = leaves(_typed_run(demo["train"], next(iter(demo["train"]["runs"]))))
    stated_demo = _stated(demo_file["train"], list(demo_file["train"]["runs"]))
    for run in resolved["train"]["runs"]:
        stated_paper = _stated(paper_file["train"], [run])
        for path, value in leaves(_typed_run(resolved["train"], run)).items():
            if path in stated_demo and path not in stated_paper and value == demo_train[path]:
                leaks.append(f"train.runs.{run}: " + ".".join(path))
    return leaks


def _typed_run(train: dict, run: str) -> dict:
    """A run's train section as the job parses it, defaults of the typed config included."""
    return to_dict(parse_train(run_config(train, run)))


def _stated(train_file: dict, runs: list[str]) -> set[tuple]:
    stated = set(leaves(train_file.get("defaults", {})))
    for run in runs:
        stated |= set(leaves((train_file.get("runs") or {}).get(run) or {}))
    return stated


def test_paper_resolves_without_any_demo_value() -> None:
    paper_file = load(PAPER)
    assert paper_file["teacher"]["tiny"] is False  # INERT_IN_PAPER's premise
    assert demo_leaks(resolve_config([PAPER], root=ROOT), paper_file, load(DEMO)) == []


def test_leak_check_catches_snakemakes_stock_merge(tmp_path: Path) -> None:
    """Deep-merging the paper over the demo (Snakemake's own order) leaks the linear probe's
    lrs and knn_k; with the old paper file (no widths) also the demo's student."""
    old_paper = load(PAPER)
    for key in ("embed_dim", "depths", "num_heads"):
        del old_paper["train"]["defaults"]["student"][key]
    stock = load(DEMO)
    update_config(stock, old_paper)
    leaks = demo_leaks(stock, old_paper, load(DEMO))
    assert "evaluate.protocol.linear.lrs" in leaks and "evaluate.protocol.linear.knn_k" in leaks
    for run in old_paper["train"]["runs"]:
        assert f"train.runs.{run}: student.embed_dim" in leaks
        assert f"train.runs.{run}: student.depths" in leaks
    with pytest.raises(ConfigError, match="'embed_dim' is a required property"):
        resolve_config([_write(old_paper, tmp_path / "old-paper.yaml")], root=ROOT)


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_configfiles_merge_in_order_then_overrides(tmp_path: Path) -> None:
    patch = _write({"train": {"defaults": {"epochs": 7, "batch_size": 6}}}, tmp_path / "p.yaml")
    cfg = resolve_config([DEMO, patch], {"train": {"defaults": {"epochs": 9}}}, root=ROOT)
    assert cfg["train"]["defaults"]["epochs"] == 9 and cfg["train"]["defaults"]["batch_size"] == 6
    assert cfg["train"]["defaults"]["student"]["embed_dim"] == 16  # the demo, patched
    assert cfg["data"]["harmonise"]["gsd_m"] == 10.0  # schema defaults filled in
    with pytest.raises(ConfigError, match=r"replace config/config\.yaml rather than patch it"):
        resolve_config([patch], root=ROOT)


def swin_b_parameters(in_chans: int, window: int) -> int:
    """torchvision's swin_b (no classifier) with ``in_chans`` inputs: an independent count."""
    with torch.device("meta"):
        model = SwinTransformer([4, 4], 128, [2, 2, 18, 2], [4, 8, 16, 32], [window, window])
    conv = model.features[0][0]
    head = sum(p.numel() for p in model.head.parameters())
    total = sum(p.numel() for p in model.parameters()) - head
    return total - conv.weight.numel() + in_chans * 128 * 16


def test_deo_config_reports_the_authors_model(capsys: pytest.CaptureFixture) -> None:
    argv = [
        "config",
        "--configfile",
        str(PAPER),
        "--run",
        "deo",
        "--json",
        "--directory",
        str(ROOT),
    ]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["runs"]) == ["deo"]
    deo = doc["runs"]["deo"]
    student = deo["parameters"]["student"]
    assert 86e6 <= student <= 88e6
    # one MS (10-band) and one RGB patch embedding (conv + LayerNorm each) before shared stages
    rgb_embed = 3 * 128 * 16 + 128 + 2 * 128
    assert student == swin_b_parameters(10, 12) + rgb_embed
    train = deo["train"]
    assert train["batch_size"] == 1024 and train["optim"]["base_lr"] == 5e-4
    assert train["crops"] == {**train["crops"], "global_size": 224, "local_size": 96, "n_local": 10}
    assert set(deo["parameters"]["heads"]) == {"head", "cls", "patch_final", "patch_mid"}
    assert doc["vfm"] == {
        **doc["vfm"],
        "arch": "vit_base_patch16_dinov3",
        "embed_dim": 768,
        "depth": 12,
        "mid_layer": 8,
        "final_layer": 11,
    }
    assert doc["config"]["teacher"]["tiny"] is False


def test_counts_equal_the_model_training_builds() -> None:
    """The demo's counts (meta device) against the module training builds on CPU."""
    cfg = resolve_config([DEMO], root=ROOT)
    doc = describe(cfg)
    for run in ("deo",):
        model = DualTeacherDistillation(
            parse_train(run_config(cfg["train"], run)), None, vfm_dim=doc["vfm"]["embed_dim"]
        )
        student = model.student
        counts = doc["runs"][run]["parameters"]
        assert counts["student"] == sum(p.numel() for p in student.backbone.parameters())
        trainable = sum(p.numel() for p in student.parameters())
        assert counts["student"] + sum(counts["heads"].values()) == trainable


def test_ablation_run_reports_no_vfm_heads() -> None:
    paper = resolve_config([PAPER], root=ROOT)
    doc = describe(paper, "base")
    assert set(doc["runs"]["base"]["parameters"]["heads"]) == {"head"}
    with pytest.raises(ConfigError, match="no run 'nope'"):
        describe(paper, "nope")


def _shell_args(command: str, flag: str) -> str:
    words = shlex.split(command)
    return words[words.index(flag) + 1]


@pytest.mark.timeout(120)
def test_snakemake_jobs_see_the_resolved_paper_config(tmp_path: Path) -> None:
    """A dry run of the real Snakefile with a demo that gained a key next year: the paper's
    training jobs get exactly ``deo config``'s runs, and not the new demo value."""
    for item in ("Snakefile", "workflow", "config", "envs"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, tmp_path / item)
    demo = load(DEMO)
    demo["train"]["defaults"]["optim"]["betas"] = [0.5, 0.6]  # a key paper.yaml does not state
    _write(demo, tmp_path / "config/config.yaml")
    paper = load(PAPER)
    weights = tmp_path / paper["teacher"]["weights"]
    weights.parent.mkdir(parents=True)
    weights.touch()  # the DAG only checks the file exists
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = ["-n", "-p", "--cores", "1", "--configfile", "config/paper.yaml", "--until", "distill"]
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    commands = [line for line in done.stdout.splitlines() if "deo train " in line]
    resolved = resolve_config([tmp_path / "config/paper.yaml"], root=tmp_path)
    doc = describe(resolved)
    assert len(commands) == len(doc["runs"]) == 6
    for command in commands:
        out = _shell_args(command, "--out")
        run = Path(out).parent.name
        job_train = json.loads(_shell_args(command, "--train"))
        assert job_train == run_config(resolved["train"], run)
        assert to_dict(parse_train(job_train)) == doc["runs"][run]["train"]
        assert doc["runs"][run]["train"]["optim"]["betas"] == [0.9, 0.999]
        job_teacher = json.loads(_shell_args(command, "--teacher"))
        assert job_teacher == {
            k: v for k, v in resolved["teacher"].items() if k not in ("mode", "views", "cache")
        }


def test_snakefile_embeds_the_default_that_deo_config_reads() -> None:
    assert f'configfile: "{EMBEDDED_DEFAULT}"' in (ROOT / "Snakefile").read_text()
