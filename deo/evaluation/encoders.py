"""The encoders evaluated side by side, loaded into one architecture: ``DualEmbedSwin``.

Three kinds, so that every protocol runs the same code on each:

- ``student``: our trained backbone, deo's safetensors export (``backbone.safetensors``), with
  the input spec ``deo export`` wrote beside it (``input_spec.json``);
- ``random``: the same architecture with seeded random weights — the floor any pre-training
  has to clear on the same protocol;
- ``torchvision``: an external checkpoint, in either of two layouts, its architecture read off
  the tensor shapes:
  - torchgeo's ``DEO`` (``feat_extr.*``: the authors' released ``DEO_swin_b.pth`` and our
    ``deo_torchgeo.pth``): both patch embeddings, the MS one (``conv_ms``) and the optical one
    (``conv_rgb``);
  - ``torchvision.models.SwinTransformer`` (``features.0.0.weight``, ...): one stem, which is
    the RGB path for 3 channels and the MS path otherwise.

The MS path's channels are always the model's ``MODEL_BANDS`` (R, G, B, B05 ... B12, contract
C2). A checkpoint's own input bands are matched to them by name (``B4`` or ``B04``) from, in
this order: the configured ``bands``, the checkpoint's input spec (a sidecar ``input_spec.json``
or ``<weights>.json``, or safetensors metadata), its ``bands`` metadata; with none of them a
10-channel checkpoint is taken to be in the released DEO's order (``B4 B3 B2 B5 ... B12``). The
loaded encoder carries the checkpoint's input spec (torchgeo's DEO layout without one: the
released model's, ``RELEASED_DEO``), so the evaluation normalises it as it was trained.

Pickled checkpoints are read with ``torch.load(weights_only=True)``: a file that needs arbitrary
code to unpickle is refused.
"""

from __future__ import annotations

import copy
import dataclasses
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

from deo.errors import ConfigError
from deo.models.export import from_torchgeo, from_torchvision, load_backbone
from deo.models.input_spec import (
    MODEL_BANDS,
    RELEASED_DEO,
    InputSpec,
    normalise_band_names,
)
from deo.models.student import PATCH_SIZE, DualEmbedSwin, Modality, StudentConfig, StudentFeatures

log = logging.getLogger(__name__)

EncoderKind = Literal["student", "random", "torchvision"]
Layout = Literal["torchgeo", "torchvision"]
RANDOM_DIGEST = "random"
SPEC_FILE = "input_spec.json"

# Prefixes training frameworks put in front of a backbone's keys (DDP, wrapper modules).
_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Containers a checkpoint may nest its state dict in.
_NESTED_KEYS = ("state_dict", "model")
# The architecture name only names the family; every width is overridden from the file.
_BASE_ARCH = "swin_b"

_BLOCK_TABLE = re.compile(r"features\.(\d+)\.(\d+)\.attn\.relative_position_bias_table$")


@dataclass(frozen=True)
class LoadedEncoder:
    """A backbone ready for evaluation, with what a results row needs to name it.

    ``modalities`` are the patch embeddings that hold loaded (or, for the floor, deliberately
    random) weights; asking for another one is an error, not a silently random path.
    ``input_spec`` is how the model wants its input normalised (None: not known).
    """

    name: str
    kind: EncoderKind
    model: DualEmbedSwin
    config: StudentConfig
    modalities: frozenset[str]
    digest: str
    input_spec: InputSpec | None = None


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
    names the MS input channels of an external checkpoint (either spelling, B4 or B04).
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
        sidecar = path.parent / SPEC_FILE
        spec = InputSpec.read(sidecar) if sidecar.is_file() else None
    elif kind == "torchvision":
        loaded = load_external_checkpoint(path, checkpoint_bands)
        model, cfg, modalities, spec = loaded.model, loaded.config, loaded.modalities, loaded.spec
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
        input_spec=spec,
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


# --------------------------------------------------------------------- external checkpoints


@dataclass(frozen=True)
class ExternalCheckpoint:
    """An external checkpoint rebuilt as a ``DualEmbedSwin``: the paths it fills, its spec."""

    model: DualEmbedSwin
    config: StudentConfig
    layout: Layout
    modalities: frozenset[str]
    spec: InputSpec | None


def load_external_checkpoint(
    path: Path, checkpoint_bands: Sequence[str] | None = None
) -> ExternalCheckpoint:
    """Rebuild a torchgeo-DEO or torchvision-Swin checkpoint as a ``DualEmbedSwin``.

    The architecture (width, depths, heads, window) is read from the tensor shapes, the MS
    conv's input channels are put in ``MODEL_BANDS`` order by band name, and every tensor of the
    file must land in the model (the relative-position indices must equal torchvision's).
    """
    path = Path(path)
    obj, metadata = _read_checkpoint(path)
    state, layout = _unwrap(obj, path)
    if layout == "torchgeo":
        ours = from_torchgeo(state, path)
    else:
        head = [k for k in state if k.startswith("head.")]
        if head:
            log.info("%s: dropped the classifier head (%s)", path, ", ".join(head))
        stem = {k: v for k, v in state.items() if not k.startswith("head.")}
        in_chans = stem["features.0.0.weight"].shape[1]
        ours = from_torchvision(stem, _modality(metadata, in_chans, path), path)
    modalities = frozenset(m for m in ("ms", "rgb") if f"{m}_embed.proj.weight" in ours)
    cfg = _config_from_shapes(ours, path)
    spec = _checkpoint_spec(path, metadata, layout)
    if "ms" in modalities:
        bands = _checkpoint_bands(checkpoint_bands, spec, metadata, path)
        ours["ms_embed.proj.weight"] = select_bands(ours["ms_embed.proj.weight"], bands, path)
        cfg = dataclasses.replace(cfg, ms_channels=len(MODEL_BANDS))
    if spec is not None:
        spec = spec_in_model_order(spec, path)
    model = DualEmbedSwin(cfg, with_rgb="rgb" in modalities)
    _check_indices(ours, model, path)
    try:
        missing, unexpected = model.load_state_dict(ours, strict=False)
    except RuntimeError as err:
        raise ConfigError(
            f"{path}: weights do not fit the Swin read off their shapes: {err}"
        ) from err
    # Only the MS embedding may stay unfilled (an RGB-only torchvision checkpoint).
    unfilled = [k for k in missing if "ms" in modalities or not k.startswith("ms_embed.")]
    if unfilled or unexpected:
        raise ConfigError(
            f"{path}: weights do not fit the Swin read off their shapes "
            f"(missing {unfilled[:5]}, unexpected {unexpected[:5]})"
        )
    log.info("%s: %s layout, paths %s, input spec %s", path, layout, sorted(modalities), spec)
    return ExternalCheckpoint(model.eval(), cfg, layout, modalities, spec)


def _modality(metadata: dict[str, str], in_chans: int, path: Path) -> Modality:
    """The path a one-stem checkpoint fills: its metadata's word, else its channel count."""
    modality = metadata.get("modality") or ("rgb" if in_chans == 3 else "ms")
    if modality not in ("ms", "rgb"):
        raise ConfigError(f"{path}: metadata names an unknown modality {modality!r}")
    if modality == "rgb" and in_chans != 3:
        raise ConfigError(f"{path}: an RGB checkpoint must take 3 channels, not {in_chans}")
    return cast(Modality, modality)


def _checkpoint_spec(path: Path, metadata: dict[str, str], layout: Layout) -> InputSpec | None:
    """The checkpoint's input spec: sidecar file, metadata, or the released model's layout."""
    for sidecar in (path.parent / SPEC_FILE, path.with_suffix(".json")):
        if sidecar.is_file():
            return InputSpec.read(sidecar)
    if "input_spec" in metadata:
        return InputSpec.from_json(metadata["input_spec"], f"{path} (metadata input_spec)")
    return RELEASED_DEO if layout == "torchgeo" else None


def _checkpoint_bands(
    configured: Sequence[str] | None,
    spec: InputSpec | None,
    metadata: dict[str, str],
    path: Path,
) -> tuple[str, ...]:
    """The MS conv's input bands, ESA spelling: configured, spec, metadata, else the release's."""
    if configured:
        return normalise_band_names(list(configured))
    if spec is not None:
        return spec.bands
    recorded = json.loads(metadata.get("bands", "null"))
    if recorded:
        return normalise_band_names(recorded)
    return RELEASED_DEO.bands


def select_bands(weight: Tensor, bands: Sequence[str], source: Path | str) -> Tensor:
    """The MS conv's input channels for ``MODEL_BANDS``, chosen by band name from ``bands``."""
    in_chans = weight.shape[1]
    if len(bands) != in_chans:
        raise ConfigError(
            f"{source}: {len(bands)} band names ({' '.join(bands)}) for a {in_chans}-channel "
            f"first conv; name the checkpoint's input bands (evaluate.models.external.NAME."
            f"bands, e.g. the 13 Sentinel-2 L1C bands B01 ... B12)"
        )
    absent = [b for b in MODEL_BANDS if b not in bands]
    if absent:
        raise ConfigError(f"{source}: the checkpoint has no input channel for band(s) {absent}")
    index = torch.tensor([list(bands).index(b) for b in MODEL_BANDS])
    if index.tolist() != list(range(in_chans)):
        log.info("%s: channels %s of its inputs %s", source, list(MODEL_BANDS), list(bands))
    return weight[:, index].contiguous()


def spec_in_model_order(spec: InputSpec, source: Path | str) -> InputSpec:
    """``spec`` with its channels reordered to ``MODEL_BANDS``, as the loaded conv is."""
    absent = [b for b in MODEL_BANDS if b not in spec.bands]
    if absent:
        raise ConfigError(f"{source}: the input spec has no statistics for band(s) {absent}")
    index = [spec.bands.index(b) for b in MODEL_BANDS]
    optical = [spec.bands[c] for c in spec.optical_channels]
    return dataclasses.replace(
        spec,
        bands=MODEL_BANDS,
        optical_channels=tuple(MODEL_BANDS.index(b) for b in optical if b in MODEL_BANDS),
        mean=tuple(spec.mean[i] for i in index),
        std=tuple(spec.std[i] for i in index),
    )


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


def _unwrap(obj: object, path: Path) -> tuple[dict[str, Tensor], Layout]:
    """The flat tensor dict inside a checkpoint, without wrapper prefixes, and its layout."""
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
    if "feat_extr.conv_ms.0.weight" in state or "feat_extr.conv_rgb.0.weight" in state:
        return state, "torchgeo"
    if "features.0.0.weight" in state:
        return state, "torchvision"
    raise ConfigError(
        f"{path}: neither torchgeo's DEO layout (feat_extr.conv_ms.0.weight) nor a torchvision "
        f"Swin state dict (features.0.0.weight); keys start {sorted(state)[:3]}"
    )


def _config_from_shapes(state: dict[str, Tensor], path: Path) -> StudentConfig:
    """The ``StudentConfig`` whose ``DualEmbedSwin`` has exactly these tensor shapes."""
    convs = [
        state[f"{m}_embed.proj.weight"] for m in ("ms", "rgb") if f"{m}_embed.proj.weight" in state
    ]
    conv = convs[0]
    if tuple(conv.shape[2:]) != (PATCH_SIZE, PATCH_SIZE):
        raise ConfigError(f"{path}: patch size {tuple(conv.shape[2:])}, expected 4x4")
    blocks: dict[int, dict[int, Tensor]] = {}
    for name, tensor in state.items():
        if match := _BLOCK_TABLE.fullmatch(name):
            feature, block = int(match.group(1)), int(match.group(2))
            if feature % 2:
                raise ConfigError(f"{path}: attention block {name!r} in a patch-merging slot")
            blocks.setdefault(feature // 2, {})[block] = tensor
    n_stages = len(blocks)
    if n_stages == 0 or sorted(blocks) != list(range(n_stages)):
        raise ConfigError(f"{path}: stages {sorted(blocks)} are not 0..n-1")
    windows = {_window_of(t.shape[0], path) for stage in blocks.values() for t in stage.values()}
    if len(windows) != 1:
        raise ConfigError(f"{path}: blocks use different windows {sorted(windows)}")
    (window,) = windows
    return StudentConfig(
        arch=_BASE_ARCH,
        window_size=window,
        img_size=window * PATCH_SIZE * 2 ** (n_stages - 1),
        embed_dim=conv.shape[0],
        depths=tuple(len(blocks[s]) for s in range(n_stages)),
        num_heads=tuple(blocks[s][0].shape[1] for s in range(n_stages)),
        ms_channels=state["ms_embed.proj.weight"].shape[1]
        if "ms_embed.proj.weight" in state
        else 10,
        drop_path_rate=0.0,
    )


def _window_of(rows: int, path: Path) -> int:
    """Window w of a (2w - 1)**2-row relative-position table."""
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ConfigError(f"{path}: a {rows}-row position table is not (2w - 1)^2 rows")
    return (side + 1) // 2


def _check_indices(state: dict[str, Tensor], model: DualEmbedSwin, path: Path) -> None:
    """Stored relative-position indices must be torchvision's for the window (no silent remap)."""
    own = model.state_dict()
    for name, index in state.items():
        if (
            name.endswith("attn.relative_position_index")
            and name in own
            and not torch.equal(index.flatten().long(), own[name].flatten().long())
        ):
            raise ConfigError(f"{path}: {name} is not torchvision's relative-position index")


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
