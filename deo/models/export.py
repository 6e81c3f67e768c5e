"""Export the student backbone for downstream use, and the layouts other code loads.

- ``export_backbone`` / ``load_backbone``: deo's own file. A safetensors file (tensors and a
  JSON header, nothing executable) whose metadata describes the architecture, so
  ``load_backbone`` rebuilds the exact ``DualEmbedSwin`` with both patch embeddings.
- ``export_torchgeo``: torchgeo 0.10.1's ``DEO`` layout (``feat_extr.features.*``,
  ``feat_extr.conv_ms.*``, ``feat_extr.conv_rgb.*``, ``feat_extr.norm.*``; 355 tensors for
  swin_b, position-index buffers included), which ``torchgeo.models.DEO().load_state_dict(...,
  strict=True)`` accepts, and its input spec (band order, normalisation) as JSON beside it.
- ``to_torchgeo`` / ``from_torchgeo`` and ``from_torchvision``: the key renames. The student is
  built from torchvision's own modules in torchgeo's order, so every layout is the same tensors
  under other names: nothing is permuted, and the functions agree by construction.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from deo import __version__
from deo.errors import ConfigError
from deo.models.input_spec import MODEL_BANDS, InputSpec
from deo.models.student import DualEmbedSwin, Modality, StudentConfig

_MODALITIES: tuple[str, ...] = ("ms", "rgb")

BACKBONE_FORMAT = "deo-backbone"
# Bump when the meaning of the backbone metadata changes; load_backbone refuses unknown ones.
# 2: torchvision module names (features.*), torchvision's padded-window function.
BACKBONE_FORMAT_VERSION = "2"

TORCHGEO_WEIGHTS = "deo_torchgeo.pth"
TORCHGEO_SPEC = "input_spec.json"  # the run's input spec, beside every export
# torchgeo's DEO names (its ``feat_extr`` wraps torchvision's swin_b) for ours.
_TORCHGEO_PREFIX = "feat_extr."
_TORCHGEO_EMBED = {"ms": "conv_ms", "rgb": "conv_rgb"}
# torchvision numbers the stem's parts: (Conv2d, Permute, LayerNorm).
_EMBED_PARTS = {"proj": "0", "norm": "2"}
_OUR_EMBED = re.compile(r"(ms|rgb)_embed\.(proj|norm)\.(weight|bias)$")
_TG_EMBED = re.compile(r"feat_extr\.(conv_ms|conv_rgb)\.(0|2)\.(weight|bias)$")
_TV_EMBED = re.compile(r"features\.0\.(0|2)\.(weight|bias)$")
_TV_FEATURE = re.compile(r"features\.(\d+)\.(.+)$")

# The released model: torchgeo's ``DEO()`` is torchvision's swin_b with window 12.
RELEASED_CONFIG = StudentConfig(arch="swin_b", window_size=12, img_size=224, drop_path_rate=0.0)


# --------------------------------------------------------------------------- deo backbone file


def export_backbone(
    student: DualEmbedSwin,
    cfg: StudentConfig,
    path: Path,
    *,
    modality: Modality = "ms",
) -> None:
    """Write the backbone (both embeddings, shared stages, final norm) as a deo safetensors file.

    ``modality`` records which input the consumer is meant to feed (``pooled`` of that path is
    the image embedding); both embeddings are stored regardless, under their own names.
    """
    _check_same_config(student, cfg)
    _check_modality(student, modality)
    metadata = _backbone_metadata(student, cfg, modality)
    tensors = {name: t.contiguous() for name, t in student.backbone_state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_backbone(path: Path) -> tuple[DualEmbedSwin, StudentConfig]:
    """Rebuild the student a deo backbone file describes and load its weights strictly.

    The model comes back in eval mode: a loaded backbone is for feature extraction or
    fine-tuning, and the caller switches to train mode explicitly for the latter.
    """
    metadata, tensors = _read_safetensors(Path(path))
    cfg = _config_from_metadata(path, metadata)
    with_rgb = any(name.startswith("rgb_embed.") for name in tensors)
    try:
        model = DualEmbedSwin(cfg, with_rgb=with_rgb)
    except ValueError as err:
        raise ConfigError(f"{path}: cannot rebuild the student it describes: {err}") from err
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ConfigError(
            f"{path}: weights do not fit the architecture in its metadata: {err}"
        ) from err
    return model.eval(), cfg


def _backbone_metadata(
    student: DualEmbedSwin, cfg: StudentConfig, modality: Modality
) -> dict[str, str]:
    """Self-description of a backbone file: what a reader needs to rebuild and feed it."""
    resolved = dataclasses.replace(
        cfg, embed_dim=student.embed_dim, depths=student.depths, num_heads=student.num_heads
    )
    return {
        "format": BACKBONE_FORMAT,
        "format_version": BACKBONE_FORMAT_VERSION,
        "deo_version": __version__,
        "arch": cfg.arch,
        "window_size": str(cfg.window_size),
        "img_size": str(cfg.img_size),
        "patch_size": json.dumps(list(student.patch_size)),
        "embed_dim": str(student.embed_dim),
        "embed_dims": json.dumps(list(student.stage_dims)),
        "depths": json.dumps(list(student.depths)),
        "num_heads": json.dumps(list(student.num_heads)),
        "modality": modality,
        "in_chans": str(student.embedding(modality).proj.in_channels),
        "with_rgb": json.dumps(student.rgb_embed is not None),
        "bands": json.dumps(_ms_band_names(cfg)),
        # The config with the arch's widths made explicit: rebuilding from it does not depend
        # on the arch table staying the same.
        "student_config": json.dumps(dataclasses.asdict(resolved)),
    }


def _ms_band_names(cfg: StudentConfig) -> list[str]:
    """The MS channels' band names (model order), or an empty list for other channel counts."""
    return list(MODEL_BANDS) if cfg.ms_channels == len(MODEL_BANDS) else []


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and tensors of a deo backbone file, or a ConfigError naming the file.

    The metadata is checked before any tensor is read: a large foreign file is refused
    without loading it.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: no such backbone file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            _check_backbone_format(path, metadata)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a deo backbone (not a safetensors file: {err})") from err
    return metadata, tensors


def _check_backbone_format(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != BACKBONE_FORMAT:
        raise ConfigError(
            f"{path}: not a deo backbone (metadata 'format' is {metadata.get('format')!r}, "
            f"expected {BACKBONE_FORMAT!r})"
        )


def _config_from_metadata(path: Path, metadata: dict[str, str]) -> StudentConfig:
    """The StudentConfig a backbone file was written from; ConfigError if it cannot be read."""
    version = metadata.get("format_version")
    if version != BACKBONE_FORMAT_VERSION:
        raise ConfigError(
            f"{path}: deo backbone format version {version!r} is not supported "
            f"(this deo {__version__} reads version {BACKBONE_FORMAT_VERSION}; re-run deo export)"
        )
    try:
        fields: dict[str, Any] = json.loads(metadata["student_config"])
        for key in ("depths", "num_heads"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return StudentConfig(**fields)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable 'student_config' metadata: {err}") from err


# --------------------------------------------------------------------------- torchgeo's DEO


def to_torchgeo(student: DualEmbedSwin) -> dict[str, Tensor]:
    """The student as a ``torchgeo.models.DEO`` state dict (both embeddings, no head)."""
    if student.rgb_embed is None:
        raise ConfigError(
            "torchgeo's DEO holds an MS and an RGB patch embedding; this student was built "
            "without an optical path (no RGB embedding)"
        )
    out: dict[str, Tensor] = {}
    for name, tensor in student.state_dict().items():
        if match := _OUR_EMBED.fullmatch(name):
            modality, part, leaf = match.groups()
            name = f"{_TORCHGEO_EMBED[modality]}.{_EMBED_PARTS[part]}.{leaf}"
        out[_TORCHGEO_PREFIX + name] = tensor.detach().clone().contiguous()
    return out


def from_torchgeo(state: dict[str, Tensor], source: Path | str = "state dict") -> dict[str, Tensor]:
    """A ``torchgeo.models.DEO`` state dict under ``DualEmbedSwin`` names (the inverse rename).

    A key outside torchgeo's ``feat_extr`` layout fails loudly instead of being dropped.
    """
    modality_of = {tg: ours for ours, tg in _TORCHGEO_EMBED.items()}
    part_of = {tv: ours for ours, tv in _EMBED_PARTS.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if not name.startswith(_TORCHGEO_PREFIX):
            raise ConfigError(f"{source}: {name!r} is not a torchgeo DEO key (feat_extr.*)")
        if match := _TG_EMBED.fullmatch(name):
            embed, part, leaf = match.groups()
            out[f"{modality_of[embed]}_embed.{part_of[part]}.{leaf}"] = tensor
        elif name.startswith(("feat_extr.features.", "feat_extr.norm.")):
            out[name.removeprefix(_TORCHGEO_PREFIX)] = tensor
        else:
            raise ConfigError(f"{source}: no DualEmbedSwin name for torchgeo DEO key {name!r}")
    return out


def from_torchvision(
    state: dict[str, Tensor], modality: Modality, source: Path | str = "state dict"
) -> dict[str, Tensor]:
    """A ``torchvision.models.SwinTransformer`` state dict (one stem) under our names.

    The stem ``features.0`` becomes ``{modality}_embed``; ``features.i`` becomes ``features.
    i-1``; the classifier head must already be gone. An unknown key fails loudly.
    """
    part_of = {tv: ours for ours, tv in _EMBED_PARTS.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if match := _TV_EMBED.fullmatch(name):
            part, leaf = match.groups()
            out[f"{modality}_embed.{part_of[part]}.{leaf}"] = tensor
        elif (match := _TV_FEATURE.fullmatch(name)) and int(match.group(1)) > 0:
            out[f"features.{int(match.group(1)) - 1}.{match.group(2)}"] = tensor
        elif name.startswith("norm."):
            out[name] = tensor
        else:
            raise ConfigError(f"{source}: no DualEmbedSwin name for torchvision key {name!r}")
    return out


def released_deo_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``torchgeo.models.DEO()``'s state dict, from the same construction."""
    with torch.device("meta"):
        model = DualEmbedSwin(RELEASED_CONFIG, with_rgb=True)
    return {name: tuple(t.shape) for name, t in to_torchgeo(model).items()}


def export_torchgeo(
    student: DualEmbedSwin, cfg: StudentConfig, out_dir: Path, spec: InputSpec
) -> tuple[Path, Path]:
    """Write ``deo_torchgeo.pth`` (torchgeo's DEO state dict, ``torch.save``) and its spec.

    The state dict holds tensors only, so ``torch.load(weights_only=True)`` reads it;
    ``input_spec.json`` beside it is the input spec (band order, normalisation), the file
    the evaluation looks for beside any weights. Returns both paths.
    """
    _check_same_config(student, cfg)
    if spec.window_size != cfg.window_size or len(spec.bands) != cfg.ms_channels:
        raise ConfigError(
            f"input spec (window {spec.window_size}, {len(spec.bands)} bands) does not describe "
            f"this student (window {cfg.window_size}, {cfg.ms_channels} MS channels)"
        )
    state = to_torchgeo(student)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, spec_path = out_dir / TORCHGEO_WEIGHTS, out_dir / TORCHGEO_SPEC
    torch.save(state, weights)
    spec.write(spec_path)
    return weights, spec_path


def torchgeo_mismatches(state: dict[str, Tensor]) -> list[str]:
    """How a torchgeo-layout state dict differs from what ``DEO()`` loads strictly (empty: fits)."""
    want = released_deo_shapes()
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"{k}: {have[k]} vs {want[k]}"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    return problems


# --------------------------------------------------------------------------- shared checks


def _check_same_config(student: DualEmbedSwin, cfg: StudentConfig) -> None:
    """The metadata is written from ``cfg``: it must be the config the student was built from."""
    if student.cfg != cfg:
        raise ConfigError(
            f"the student was built from {student.cfg}, not from the config given ({cfg})"
        )


def _check_modality(student: DualEmbedSwin, modality: str) -> None:
    if modality not in _MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; expected one of {_MODALITIES}")
    if modality == "rgb" and student.rgb_embed is None:
        raise ConfigError("modality 'rgb' asked for, but the student has no RGB embedding")
