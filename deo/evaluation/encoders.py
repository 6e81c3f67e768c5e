"""The encoders evaluated side by side, loaded into one architecture: ``DualEmbedSwin``.

Three kinds, so that every protocol runs the same code on each:

- ``student``: our trained backbone, deo's safetensors export (``backbone.safetensors``);
- ``random``: the same architecture with seeded random weights — the floor any pre-training
  has to clear on the same protocol;
- ``torchvision``: an external checkpoint under ``torchvision.models.SwinTransformer`` names,
  the layout torchgeo's Swin weights use, and so the layout of the authors' released
  ``DEO_swin_b.pth``. It is mapped back into ``DualEmbedSwin`` (the inverse of
  ``deo.models.export.to_torchvision_swin``), its architecture read off the tensor shapes.

A torchvision-layout file holds one patch embedding: a 3-channel first conv is the RGB path, a
10-channel one the MS path. Any other channel count (12- or 13-band Sentinel-2 checkpoints) is
refused unless the checkpoint's band names are given, in which case the MS path's ten bands are
selected from the conv's input channels by name. Pickled checkpoints are read with
``torch.load(weights_only=True)``: a file that needs arbitrary code to unpickle is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from deo.data.bands import MS_BANDS
from deo.errors import ConfigError
from deo.models.export import (
    TIMM_MERGE_ORDER,
    TIMM_TO_TORCHVISION_BLOCK,
    TIMM_TO_TORCHVISION_EMBED,
    TORCHVISION_MERGE_ORDER,
    load_backbone,
    relative_position_index,
)
from deo.models.student import DualEmbedSwin, Modality, StudentConfig, StudentFeatures

log = logging.getLogger(__name__)

EncoderKind = Literal["student", "random", "torchvision"]
RANDOM_DIGEST = "random"

# Prefixes training frameworks put in front of a backbone's keys (DDP, wrapper modules).
_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Containers a checkpoint may nest its state dict in.
_NESTED_KEYS = ("state_dict", "model")
# The architecture name only seeds timm's defaults; every width is overridden from the file.
_BASE_ARCH = "swin_tiny_patch4_window7_224"
_TV_PATCH = 4

_TV_EMBED = re.compile(r"features\.0\.(0|2)\.(weight|bias)$")
_TV_MERGE = re.compile(r"features\.(\d+)\.(norm|reduction)\.(weight|bias)$")
_TV_BLOCK = re.compile(r"features\.(\d+)\.(\d+)\.(.+)\.([^.]+)$")
_TV_NORM = re.compile(r"norm\.(weight|bias)$")
# torchvision sub-module -> timm's: the export's tables, inverted.
_BLOCK_MODULES = {tv: timm for timm, tv in TIMM_TO_TORCHVISION_BLOCK.items()}
_EMBED_MODULES = {tv: timm for timm, tv in TIMM_TO_TORCHVISION_EMBED.items()}


@dataclass(frozen=True)
class LoadedEncoder:
    """A backbone ready for evaluation, with what a results row needs to name it.

    ``modalities`` are the patch embeddings that hold loaded (or, for the floor, deliberately
    random) weights; asking for another one is an error, not a silently random path.
    """

    name: str
    kind: EncoderKind
    model: DualEmbedSwin
    config: StudentConfig
    modalities: frozenset[str]
    digest: str


def load_encoder(
    kind: EncoderKind,
    *,
    name: str,
    path: Path | str | None = None,
    config: StudentConfig | None = None,
    seed: int = 0,
    checkpoint_bands: Sequence[str] | None = None,
) -> LoadedEncoder:
    """Load one of the compared encoders, in eval mode.

    ``student`` and ``torchvision`` need ``path``; ``random`` needs ``config`` (the
    architecture, normally the trained student's) and uses ``seed``. ``checkpoint_bands``
    names the input channels of a torchvision-layout checkpoint whose first conv is neither
    3- nor 10-channel.
    """
    if kind == "random":
        if config is None:
            raise ConfigError(f"encoder {name!r}: kind 'random' needs the architecture (config)")
        return LoadedEncoder(
            name=name,
            kind=kind,
            model=random_encoder(config, seed),
            config=config,
            modalities=frozenset({"ms", "rgb"}),
            digest=RANDOM_DIGEST,
        )
    if path is None:
        raise ConfigError(f"encoder {name!r}: kind {kind!r} needs a weights file (path)")
    path = Path(path)
    if kind == "student":
        model, cfg = load_backbone(path)
        modalities = {"ms"} | ({"rgb"} if model.rgb_embed is not None else set())
    elif kind == "torchvision":
        model, cfg, modality = load_torchvision_checkpoint(path, checkpoint_bands)
        modalities = {modality}
    else:
        raise ConfigError(f"encoder {name!r}: unknown kind {kind!r}")
    log.info("encoder %s: %s weights from %s (%s)", name, kind, path, sorted(modalities))
    return LoadedEncoder(
        name=name,
        kind=kind,
        model=model.eval(),
        config=cfg,
        modalities=frozenset(modalities),
        digest=file_sha256(path),
    )


def random_encoder(cfg: StudentConfig, seed: int) -> DualEmbedSwin:
    """``DualEmbedSwin(cfg)`` with both embeddings, initialised from ``seed`` alone.

    The global RNG is forked, so building the floor neither depends on nor disturbs whatever
    ran before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DualEmbedSwin(cfg, with_rgb=True).eval()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a weights file: the checkpoint digest of a results row."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------- torchvision layout


def load_torchvision_checkpoint(
    path: Path, checkpoint_bands: Sequence[str] | None = None
) -> tuple[DualEmbedSwin, StudentConfig, Modality]:
    """Rebuild a torchvision-layout Swin checkpoint as a ``DualEmbedSwin`` and the path it fills.

    The architecture (width, depths, heads, window) is read from the tensor shapes; the
    ``img_size`` is the smallest one at which every stage holds a whole window, so timm builds
    the single window size torchvision uses in every stage. A safetensors file written by
    ``deo.models.export.export_torchgeo`` names its modality and bands in its metadata.
    """
    state, metadata = _read_checkpoint(path)
    state = _unwrap(state, path)
    cfg = _config_from_shapes(state, path)
    in_chans = state["features.0.0.weight"].shape[1]
    modality = _modality(metadata, in_chans, cfg, path)
    bands = list(checkpoint_bands) if checkpoint_bands else _metadata_bands(metadata)
    mapped = from_torchvision_swin(state, modality, path)
    # Channels are matched by band name whenever the checkpoint's bands are known or needed.
    if modality == "ms" and (in_chans != cfg.ms_channels or bands not in (None, list(MS_BANDS))):
        embed = mapped["ms_embed.proj.weight"]
        mapped["ms_embed.proj.weight"] = select_bands(embed, bands, path)
    model = DualEmbedSwin(cfg, with_rgb=modality == "rgb")
    try:
        missing, unexpected = model.load_state_dict(mapped, strict=False)
    except RuntimeError as err:
        raise ConfigError(
            f"{path}: weights do not fit the Swin read off their shapes: {err}"
        ) from err
    # Only the other path's embedding may stay unfilled (an RGB checkpoint leaves ms_embed).
    unfilled = [k for k in missing if modality == "ms" or not k.startswith("ms_embed.")]
    if unfilled or unexpected:
        raise ConfigError(
            f"{path}: weights do not fit the Swin read off their shapes "
            f"(missing {unfilled[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval(), cfg, modality


def from_torchvision_swin(
    state: dict[str, Tensor], modality: Modality, source: Path | str = "state dict"
) -> dict[str, Tensor]:
    """The inverse of ``to_torchvision_swin``: torchvision names -> ``DualEmbedSwin`` names.

    The patch embedding goes to ``{modality}_embed``; a classifier head is dropped (logged);
    the relative-position index buffers are checked against the one the student computes and
    dropped (timm keeps its index out of the state dict). An unknown key fails loudly.
    """
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    for name, tensor in state.items():
        if name.startswith("head."):
            dropped.append(name)
            continue
        if name.endswith("attn.relative_position_index"):
            _check_index(name, tensor, source)
            continue
        out_name, out_tensor = _unmap_key(name, tensor, modality, source)
        out[out_name] = out_tensor.detach().clone().contiguous()
    if dropped:
        log.info("%s: dropped the classifier head (%s)", source, ", ".join(dropped))
    return out


def _modality(metadata: dict[str, str], in_chans: int, cfg: StudentConfig, path: Path) -> Modality:
    """The path a one-embedding checkpoint fills: its metadata's word, else its channel count."""
    modality = metadata.get("modality") or ("rgb" if in_chans == cfg.rgb_channels else "ms")
    if modality not in ("ms", "rgb"):
        raise ConfigError(f"{path}: metadata names an unknown modality {modality!r}")
    if modality == "rgb" and in_chans != cfg.rgb_channels:
        raise ConfigError(
            f"{path}: an RGB checkpoint must take {cfg.rgb_channels} channels, not {in_chans}"
        )
    return cast(Modality, modality)


def _metadata_bands(metadata: dict[str, str]) -> list[str] | None:
    """Band names an exported file records for its channels (our export writes [] if unknown)."""
    return json.loads(metadata.get("bands", "null")) or None


def select_bands(weight: Tensor, bands: Sequence[str] | None, source: Path | str) -> Tensor:
    """The first conv's input channels for the MS path's ten bands, chosen by band name."""
    in_chans = weight.shape[1]
    if bands is None:
        raise ConfigError(
            f"{source}: the first conv takes {in_chans} input channels but the MS path takes "
            f"{len(MS_BANDS)} ({' '.join(MS_BANDS)}); a 3-channel checkpoint is read as the RGB "
            f"path. Name the checkpoint's input bands (checkpoint_bands, e.g. the 13 Sentinel-2 "
            f"L1C bands B01 ... B12) so the ten are selected by name"
        )
    if len(bands) != in_chans:
        raise ConfigError(
            f"{source}: {len(bands)} checkpoint band names given for a {in_chans}-channel conv"
        )
    absent = [b for b in MS_BANDS if b not in bands]
    if absent:
        raise ConfigError(f"{source}: the checkpoint has no input channel for band(s) {absent}")
    index = torch.tensor([list(bands).index(b) for b in MS_BANDS])
    log.info("%s: selected bands %s of its %d input channels", source, list(MS_BANDS), in_chans)
    return weight[:, index].contiguous()


def _read_checkpoint(path: Path) -> tuple[object, dict[str, str]]:
    """(loaded object, metadata) of a .safetensors file or a tensors-only pickled file."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{path}: not a readable safetensors file: {err}") from err
        return tensors, metadata
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{path}: refused by torch.load(weights_only=True): the file holds objects other "
            f"than tensors and plain containers, and unpickling them could run code. Save the "
            f"state dict alone (torch.save(model.state_dict(), ...)) or as safetensors. ({err})"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ConfigError(f"{path}: not a readable PyTorch checkpoint: {err}") from err


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """The flat tensor dict inside a checkpoint, without wrapper prefixes."""
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: expected a state dict of tensors")
    state: dict[str, Tensor] = obj
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    if "features.0.0.weight" not in state:
        raise ConfigError(
            f"{path}: not a torchvision Swin state dict (no 'features.0.0.weight'; "
            f"keys start {sorted(state)[:3]})"
        )
    return state


def _config_from_shapes(state: dict[str, Tensor], path: Path) -> StudentConfig:
    """The ``StudentConfig`` whose torchvision layout has exactly these tensor shapes."""
    conv = state["features.0.0.weight"]
    if tuple(conv.shape[2:]) != (_TV_PATCH, _TV_PATCH):
        raise ConfigError(f"{path}: patch size {tuple(conv.shape[2:])}, expected 4x4")
    blocks: dict[int, set[int]] = {}
    for name in state:
        if match := _TV_BLOCK.fullmatch(name):
            feature, block = int(match.group(1)), int(match.group(2))
            if feature % 2 == 1:
                blocks.setdefault(feature // 2, set()).add(block)
    n_stages = len(blocks)
    if sorted(blocks) != list(range(n_stages)) or n_stages == 0:
        raise ConfigError(f"{path}: stages {sorted(blocks)} are not 0..n-1")
    tables = [state[f"features.{2 * s + 1}.0.attn.relative_position_bias_table"] for s in blocks]
    windows = {_window_of(t.shape[0], path) for t in tables}
    if len(windows) != 1:
        raise ConfigError(f"{path}: stages use different windows {sorted(windows)}")
    (window,) = windows
    return StudentConfig(
        arch=_BASE_ARCH,
        window_size=window,
        img_size=window * _TV_PATCH * 2 ** (n_stages - 1),
        embed_dim=conv.shape[0],
        depths=tuple(len(blocks[s]) for s in range(n_stages)),
        num_heads=tuple(t.shape[1] for t in tables),
        drop_path_rate=0.0,
    )


def _window_of(rows: int, path: Path) -> int:
    """Window w of a (2w - 1)**2-row relative-position table."""
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ConfigError(f"{path}: a {rows}-row position table is not (2w - 1)^2 rows")
    return (side + 1) // 2


def _unmap_key(
    name: str, tensor: Tensor, modality: Modality, source: Path | str
) -> tuple[str, Tensor]:
    if match := _TV_EMBED.fullmatch(name):
        module, leaf = match.groups()
        return f"{modality}_embed.{_EMBED_MODULES[module]}.{leaf}", tensor
    if _TV_NORM.fullmatch(name):
        return name, tensor
    if (match := _TV_MERGE.fullmatch(name)) and int(match.group(1)) % 2 == 0:
        feature, module, leaf = match.groups()
        return f"layers.{int(feature) // 2}.downsample.{module}.{leaf}", _merge_to_timm(tensor)
    if (match := _TV_BLOCK.fullmatch(name)) and match.group(3) in _BLOCK_MODULES:
        feature, block, module, leaf = match.groups()
        if int(feature) % 2 == 1:
            stage = int(feature) // 2
            return f"layers.{stage}.blocks.{block}.{_BLOCK_MODULES[module]}.{leaf}", tensor
    raise ConfigError(f"{source}: no DualEmbedSwin name for torchvision tensor {name!r}")


def _merge_to_timm(tensor: Tensor) -> Tensor:
    """Reorder a patch-merging tensor's 4*C inputs from torchvision's neighbour order to timm's."""
    width = tensor.shape[-1] // len(TIMM_MERGE_ORDER)
    order = [TORCHVISION_MERGE_ORDER.index(offset) for offset in TIMM_MERGE_ORDER]
    columns = torch.cat([torch.arange(s * width, (s + 1) * width) for s in order])
    return tensor[..., columns]


def _check_index(name: str, index: Tensor, source: Path | str) -> None:
    """A stored relative-position index must be the one timm computes for that window."""
    window = math.isqrt(math.isqrt(index.numel()))
    if not torch.equal(index.flatten().long(), relative_position_index(window)):
        raise ConfigError(f"{source}: {name} is not the standard relative-position index")


# --------------------------------------------------------------------- the wrapper


class FeatureEncoder(nn.Module):
    """A loaded backbone fixed to one modality: ``pooled`` and the stage maps of an image batch.

    Frozen by default: no gradients, and the backbone stays in eval mode (no drop-path) even
    when the protocol puts the whole model in train mode. ``trainable=True`` fine-tunes a private
    copy, so the loaded encoder stays pristine for the next seed or benchmark.
    """

    def __init__(self, encoder: LoadedEncoder, modality: Modality, trainable: bool = False):
        super().__init__()
        if modality not in encoder.modalities:
            raise ConfigError(
                f"encoder {encoder.name!r} has no trained {modality} path (it has "
                f"{sorted(encoder.modalities)}); the benchmark needs {modality} input"
            )
        self.backbone = copy.deepcopy(encoder.model) if trainable else encoder.model
        self.modality: Modality = modality
        self.trainable = trainable
        self.backbone.requires_grad_(trainable)
        self.backbone.train(False)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return self.backbone.stage_dims

    @property
    def stride(self) -> int:
        """Total downsampling of the last stage: a dense input is padded to a multiple of it."""
        return self.backbone.patch_size[0] * 2 ** (len(self.stage_dims) - 1)

    def train(self, mode: bool = True) -> FeatureEncoder:
        super().train(mode)
        self.backbone.train(mode and self.trainable)
        return self

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.backbone.parameters() if self.trainable else ()

    def forward(self, x: Tensor) -> StudentFeatures:
        patch = self.backbone.patch_size[0]
        if x.shape[-1] % patch or x.shape[-2] % patch:
            raise ValueError(f"input {tuple(x.shape)} is not a multiple of the patch size {patch}")
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.backbone(x, self.modality)
