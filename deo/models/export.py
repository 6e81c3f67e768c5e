"""Export the student backbone for downstream use.

Two formats, for two kinds of consumer:

- ``export_backbone`` / ``load_backbone``: deo's own file. A safetensors file (tensors and a
  JSON header, nothing executable, unlike a pickled checkpoint) whose metadata describes the
  architecture, so ``load_backbone`` can rebuild the exact ``DualEmbedSwin`` with both patch
  embeddings and run it at any input size.
- ``export_torchgeo``: the backbone under ``torchvision.models.SwinTransformer`` (v1) names, the
  layout torchgeo's Swin-B loads, for one modality. torchvision's Swin is a narrower family than
  timm's, so the export refuses, naming the difference, whatever it cannot express exactly.

Where the torchvision copy computes the same function as the student: torchvision pads a map
that the window does not divide and lets attention see the padding, while the student masks it
(see ``deo.models.student._window_attention``). The two agree on inputs whose stage grids
(input / 4, 8, 16, 32) are all multiples of the window, e.g. 224 px for window 7 and 384 px
for window 12; elsewhere they differ by design.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.models.swin_transformer import PatchMerging as TimmPatchMerging
from torch import Tensor, nn
from torchvision.models import SwinTransformer

from deo import __version__
from deo.data.bands import MS_BANDS, RGB_BANDS
from deo.errors import ConfigError
from deo.models.student import DualEmbedSwin, Modality, StudentConfig

_MODALITIES: tuple[str, ...] = ("ms", "rgb")

BACKBONE_FORMAT = "deo-backbone"
TORCHVISION_FORMAT = "deo-torchvision-swin"
# Bump when the meaning of the backbone metadata changes; load_backbone refuses unknown ones.
BACKBONE_FORMAT_VERSION = "1"

# torchvision's swin_t/s/b (and torchgeo's Swin-B built on them) patchify 4x4, widen the
# features 2x per stage and use an MLP 4x as wide as the block.
_TV_PATCH = 4
_TV_MLP_RATIO = 4
_TV_LAYER_NORM_EPS = 1e-5

# How each implementation orders the 2x2 neighbours it concatenates in PatchMerging, as
# (row, column) offsets. timm: reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5), i.e.
# column-major within the 2x2 cell; torchvision: x0=[0::2, 0::2], x1=[1::2, 0::2],
# x2=[0::2, 1::2], x3=[1::2, 1::2]. They happen to coincide (timm kept the original Swin
# order), but the mapping is written for the general case and the tests check both orders
# against the libraries themselves.
TIMM_MERGE_ORDER: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (1, 1))
TORCHVISION_MERGE_ORDER: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (1, 1))

# timm block sub-module -> torchvision block sub-module. torchvision's MLP is a Sequential of
# (Linear, GELU, Dropout, Linear, Dropout), hence 0 and 3.
TIMM_TO_TORCHVISION_BLOCK: dict[str, str] = {
    "norm1": "norm1",
    "attn": "attn",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.3",
}
# timm PatchEmbed sub-module -> index in torchvision's features[0] = (Conv2d, Permute, norm).
TIMM_TO_TORCHVISION_EMBED: dict[str, str] = {"proj": "0", "norm": "2"}

_BLOCK_KEY = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)\.([^.]+)$")
_DOWNSAMPLE_KEY = re.compile(r"layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)$")
_EMBED_KEY = re.compile(r"(ms|rgb)_embed\.(proj|norm)\.(weight|bias)$")
_NORM_KEY = re.compile(r"norm\.(weight|bias)$")


@dataclass(frozen=True)
class SwinLayout:
    """What torchvision's ``SwinTransformer`` needs to rebuild a (checked) student's stages."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int


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
    the image embedding); both embeddings are stored regardless, under their own names, so the
    file is also a complete restart point for the shared stages.
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
    embedding = student.embedding(modality)
    depths = [len(stage.blocks) for stage in student.layers]
    heads = [stage.blocks[0].attn.num_heads for stage in student.layers]
    resolved = dataclasses.replace(
        cfg, embed_dim=student.embed_dim, depths=tuple(depths), num_heads=tuple(heads)
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
        "depths": json.dumps(depths),
        "num_heads": json.dumps(heads),
        "modality": modality,
        "in_chans": str(embedding.proj.in_channels),
        "with_rgb": json.dumps(student.rgb_embed is not None),
        "bands": json.dumps(_ms_band_names(cfg)),
        "rgb_bands": json.dumps(list(RGB_BANDS)),
        # The config with the arch's widths made explicit: rebuilding from it does not depend
        # on timm's defaults for ``arch`` staying the same.
        "student_config": json.dumps(dataclasses.asdict(resolved)),
    }


def _ms_band_names(cfg: StudentConfig) -> list[str]:
    """The MS channels' band names, or an empty list for a config with other channels."""
    return list(MS_BANDS) if cfg.ms_channels == len(MS_BANDS) else []


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
            f"(this deo {__version__} reads version {BACKBONE_FORMAT_VERSION})"
        )
    try:
        fields: dict[str, Any] = json.loads(metadata["student_config"])
        for key in ("depths", "num_heads"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return StudentConfig(**fields)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable 'student_config' metadata: {err}") from err


# --------------------------------------------------------------------------- torchvision layout


def torchvision_swin(cfg: StudentConfig, in_chans: int) -> SwinTransformer:
    """An untrained torchvision Swin with the student's architecture and ``in_chans`` inputs.

    The head is ``nn.Identity``, so ``model(x)`` returns the pooled image embedding (final norm,
    then the token mean), the same quantity as the student's ``pooled``, and the state dict
    holds backbone keys only. Raises ConfigError where torchvision cannot express ``cfg``.
    """
    try:
        with torch.device("meta"):  # structure only: no memory, no init cost for Swin-B
            probe = DualEmbedSwin(cfg, with_rgb=False)
    except ValueError as err:
        raise ConfigError(f"cannot build the student {cfg}: {err}") from err
    layout = swin_layout(probe)
    model = SwinTransformer(
        patch_size=[_TV_PATCH, _TV_PATCH],
        embed_dim=layout.embed_dim,
        depths=list(layout.depths),
        num_heads=list(layout.num_heads),
        window_size=[layout.window_size, layout.window_size],
        mlp_ratio=float(_TV_MLP_RATIO),
        stochastic_depth_prob=0.0,
        num_classes=1,
    )
    model.head = nn.Identity()
    model.features[0][0] = nn.Conv2d(
        in_chans, layout.embed_dim, kernel_size=_TV_PATCH, stride=_TV_PATCH
    )
    return model


def to_torchvision_swin(student: DualEmbedSwin, modality: Modality = "ms") -> dict[str, Tensor]:
    """The student's ``modality`` path as a ``torchvision.models.SwinTransformer`` state dict.

    Loads with ``strict=True`` into ``torchvision_swin(cfg, in_chans)``. Every student tensor
    is either mapped or, for the other modality's embedding, deliberately left out; a key the
    rules do not know (a timm change) fails loudly instead of being dropped.
    """
    _check_modality(student, modality)
    layout = swin_layout(student)
    out: dict[str, Tensor] = {}
    for name, tensor in student.state_dict().items():
        mapped = _map_key(name, tensor, modality)
        if mapped is not None:
            out[mapped[0]] = mapped[1].detach().clone().contiguous()
    # torchvision keeps the relative-position index as a persistent buffer (timm's is not
    # persistent), so strict loading needs it in the file.
    index = relative_position_index(layout.window_size)
    for stage, depth in enumerate(layout.depths):
        for block in range(depth):
            out[f"features.{2 * stage + 1}.{block}.attn.relative_position_index"] = index.clone()
    return out


def export_torchgeo(
    student: DualEmbedSwin,
    cfg: StudentConfig,
    path: Path,
    modality: Modality = "ms",
) -> None:
    """Write the torchvision-layout weights as ``path`` (a plain state dict) and .safetensors.

    The plain file is what torchgeo's weight loaders read (``torch.load(weights_only=True)``
    works: tensors only); the safetensors twin carries the metadata. Before writing, the
    weights are loaded strictly into ``torchvision_swin(cfg, ...)``, so a file is only ever
    written if torchvision can take it.
    """
    path = Path(path)
    twin = path.with_suffix(".safetensors")
    if twin == path:
        raise ConfigError(
            f"{path}: give the plain state-dict file's name (e.g. .pth), not .safetensors"
        )
    _check_same_config(student, cfg)
    state = to_torchvision_swin(student, modality)
    in_chans = student.embedding(modality).proj.in_channels
    torchvision_swin(cfg, in_chans).load_state_dict(state, strict=True)
    metadata = _torchvision_metadata(student, cfg, modality)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    save_file(state, str(twin), metadata=metadata)


def _torchvision_metadata(
    student: DualEmbedSwin, cfg: StudentConfig, modality: Modality
) -> dict[str, str]:
    """What a reader of the torchvision-layout file needs to build and feed the model."""
    layout = swin_layout(student)
    in_chans = student.embedding(modality).proj.in_channels
    bands = _ms_band_names(cfg) if modality == "ms" else list(RGB_BANDS)
    return {
        "format": TORCHVISION_FORMAT,
        "deo_version": __version__,
        "model": "torchvision.models.SwinTransformer",
        "source_arch": cfg.arch,
        "patch_size": json.dumps([_TV_PATCH, _TV_PATCH]),
        "embed_dim": str(layout.embed_dim),
        "embed_dims": json.dumps(list(student.stage_dims)),
        "depths": json.dumps(list(layout.depths)),
        "num_heads": json.dumps(list(layout.num_heads)),
        "window_size": json.dumps([layout.window_size, layout.window_size]),
        "in_chans": str(in_chans),
        "modality": modality,
        "bands": json.dumps(bands),
    }


def swin_layout(student: DualEmbedSwin) -> SwinLayout:
    """The torchvision arguments matching ``student``; ConfigError listing what cannot match."""
    problems = list(dict.fromkeys(_layout_problems(student)))
    if problems:
        raise ConfigError(
            "the student is not expressible as torchvision's SwinTransformer: "
            + "; ".join(problems)
        )
    return SwinLayout(
        embed_dim=student.embed_dim,
        depths=tuple(len(stage.blocks) for stage in student.layers),
        num_heads=tuple(stage.blocks[0].attn.num_heads for stage in student.layers),
        window_size=student.cfg.window_size,
    )


def _layout_problems(student: DualEmbedSwin) -> Iterator[str]:
    """Every way the student differs from what torchvision's Swin v1 can compute."""
    for modality, embed in (("ms", student.ms_embed), ("rgb", student.rgb_embed)):
        if embed is None:
            continue
        kernel, stride = tuple(embed.proj.kernel_size), tuple(embed.proj.stride)
        if kernel != (_TV_PATCH, _TV_PATCH) or stride != kernel:
            yield (
                f"{modality} patch size {kernel} stride {stride}: torchvision's Swin layout "
                f"patchifies {_TV_PATCH}x{_TV_PATCH}"
            )
        if not _is_tv_layer_norm(embed.norm):
            yield f"{modality} patch embedding is not followed by a LayerNorm(eps=1e-5)"
    if not _is_tv_layer_norm(student.norm):
        yield "final norm is not a LayerNorm(eps=1e-5)"
    for index, stage in enumerate(student.layers):
        yield from _stage_problems(student, index, stage)


def _stage_problems(student: DualEmbedSwin, index: int, stage: nn.Module) -> Iterator[str]:
    dim = student.embed_dim * 2**index
    window = student.cfg.window_size
    # Smallest img_size whose last-stage grid still holds a whole window.
    fitting_size = window * student.patch_size[0] * 2 ** (len(student.layers) - 1)
    if student.stage_dims[index] != dim:
        yield f"stage {index} is {student.stage_dims[index]} wide; torchvision doubles to {dim}"
    downsample = stage.downsample
    if index == 0 and not isinstance(downsample, nn.Identity):
        yield "stage 0 downsamples; torchvision merges patches only between stages"
    if index > 0 and not (
        isinstance(downsample, TimmPatchMerging)
        and downsample.reduction.out_features == dim
        and _is_tv_layer_norm(downsample.norm)
    ):
        yield f"stage {index} does not start with a 2x patch merging to {dim} channels"
    for number, block in enumerate(stage.blocks):
        where = f"stage {index} block {number}"
        if tuple(block.window_size) != (window, window):
            yield (
                f"stage {index} uses a {tuple(block.window_size)} window (timm fitted it to the "
                f"stage's grid at img_size {student.cfg.img_size}); torchvision's Swin uses the "
                f"one {window}x{window} window in every stage, so build the student with "
                f"img_size >= {fitting_size} (or a window that fits every stage)"
            )
        if bool(any(block.target_shift_size)) != (number % 2 == 1):
            yield f"{where}: shifted windows are not on every second block as in torchvision"
        if block.mlp.fc1.out_features != _TV_MLP_RATIO * dim:
            yield f"{where}: MLP ratio is not {_TV_MLP_RATIO}"
        act = block.mlp.act
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            yield f"{where}: MLP activation {act} is not exact GELU"
        if block.attn.qkv.bias is None or block.attn.qkv.out_features != 3 * dim:
            yield f"{where}: attention qkv is not a biased {dim}->{3 * dim} projection"
        if not (_is_tv_layer_norm(block.norm1) and _is_tv_layer_norm(block.norm2)):
            yield f"{where}: block norms are not LayerNorm(eps=1e-5)"


def _is_tv_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and module.eps == _TV_LAYER_NORM_EPS


def _map_key(name: str, tensor: Tensor, modality: Modality) -> tuple[str, Tensor] | None:
    """(torchvision name, tensor) for one student tensor; None for the other embedding."""
    if match := _EMBED_KEY.fullmatch(name):
        source, module, leaf = match.groups()
        if source != modality:
            return None
        return f"features.0.{TIMM_TO_TORCHVISION_EMBED[module]}.{leaf}", tensor
    if match := _NORM_KEY.fullmatch(name):
        return name, tensor
    if match := _DOWNSAMPLE_KEY.fullmatch(name):
        stage, module, leaf = match.groups()
        return f"features.{2 * int(stage)}.{module}.{leaf}", _merge_to_torchvision(tensor)
    if (match := _BLOCK_KEY.fullmatch(name)) and match.group(3) in TIMM_TO_TORCHVISION_BLOCK:
        stage, block, module, leaf = match.groups()
        target = f"features.{2 * int(stage) + 1}.{block}.{TIMM_TO_TORCHVISION_BLOCK[module]}.{leaf}"
        return target, tensor
    raise ConfigError(f"no torchvision Swin name for student tensor {name!r}")


def _merge_to_torchvision(tensor: Tensor) -> Tensor:
    """Reorder a patch-merging tensor's 4*C input features from timm's to torchvision's order.

    The merged vector is four C-wide neighbour slots; the norm's weight/bias (4C,) and the
    reduction's input columns (out, 4C) follow the slot order, so both are permuted.
    """
    slots = len(TIMM_MERGE_ORDER)
    width = tensor.shape[-1] // slots
    order = [TIMM_MERGE_ORDER.index(offset) for offset in TORCHVISION_MERGE_ORDER]
    columns = torch.cat([torch.arange(s * width, (s + 1) * width) for s in order])
    return tensor[..., columns]


def relative_position_index(window: int) -> Tensor:
    """torchvision's flattened (window**4,) index into a (2w-1)**2-row bias table.

    Entry (query, key) is (dr + w - 1) * (2w - 1) + (dc + w - 1) for the row/column offsets
    from key to query; timm indexes the same table identically (but keeps the index 2-D and
    out of its state dict), so the tables themselves copy over unchanged.
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + window - 1
    d_col = cols[:, None] - cols[None, :] + window - 1
    return (d_row * (2 * window - 1) + d_col).flatten()


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
