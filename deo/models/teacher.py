"""The frozen optical teacher: a DINOv3 ViT (timm's ``Eva``) that turns RGB views into targets.

DEO matches three things of this teacher with the student's RGB path: the final-layer [cls]
token, the final-layer patch tokens and the patch tokens of one middle block. This module
returns them by name (:class:`TeacherOutputs`), so no caller depends on a tuple's order.

Layer indices are 0-based block indices, as in DINOv3's ``get_intermediate_layers(n=[...])``
and timm's ``forward_intermediates(indices=[...])``: the paper's "layers 8 and 11" of ViT-B
are ``blocks[8]`` and ``blocks[11]`` (the last block); for ViT-L they are 15 and 23.

Every returned token has been through the model's final LayerNorm, the middle layer's too.
That is what DINOv3's ``get_intermediate_layers(..., norm=True)`` (its default, and the call
the authors' wrapper makes) returns, and it puts all three targets on one scale.

Weights are never downloaded: the user supplies Meta's original ``.pth`` or timm's
``.safetensors``; Meta's keys are converted by timm's own ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention, checkpoint_filter_fn
from torch import Tensor, nn

from deo.errors import ConfigError
from deo.models.attention import (
    AttentionKernel,
    AttentionSetting,
    attend,
    check_setting,
    resolve_kernel,
)

log = logging.getLogger(__name__)

LICENCE_HINT = (
    "DINOv3 weights are licence-gated and are never downloaded by this pipeline: accept the "
    "DINOv3 License and download them yourself from Meta's release page "
    "https://ai.meta.com/dinov3/ (original .pth files, e.g. "
    "dinov3_vitb16_pretrain_lvd1689m-*.pth) or from Hugging Face (the gated facebook/dinov3-* "
    "repositories; timm-format model.safetensors under timm/<arch>.<tag>), then set "
    "teacher.weights to the local file"
)

# DEO's middle blocks (0-based) for the depths the paper uses: ViT-B (12) -> 8, ViT-L (24) -> 15.
# The paper gives no rule between the two (8/12 and 15/24 are not one ratio), so other depths
# fall back to about two thirds of the way up.
PAPER_MID_LAYER: dict[int, int] = {12: 8, 24: 15}

_SUPPORTED_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass(frozen=True)
class TeacherConfig:
    """Which teacher, which weights file, which blocks give the targets.

    ``arch`` is a timm model name, optionally with a pretrained tag
    (``vit_large_patch16_dinov3.sat493m``); the tag selects the normalisation the weights were
    trained with, so name the tag of the weights you supply.
    """

    arch: str = "vit_base_patch16_dinov3"
    weights: str | None = None
    mid_layer: int | None = None
    final_layer: int | None = None
    tiny: bool = False
    tiny_embed_dim: int = 64
    tiny_depth: int = 4
    tiny_heads: int = 4
    seed: int = 0
    # Attention kernel (deo.models.attention): auto = xformers on CUDA when installed, else SDPA.
    attention: AttentionSetting = "auto"


@dataclass
class TeacherOutputs:
    """The teacher's targets for a batch of RGB views; P = grid[0] * grid[1].

    cls:         (B, D)    [cls] token of ``final_layer``, after the final norm.
    patch_final: (B, P, D) patch tokens of ``final_layer`` (no cls/registers), after the final norm.
    patch_mid:   (B, P, D) patch tokens of ``mid_layer`` (no cls/registers), after the final norm.
    grid:        (rows, cols) of patches, row-major order of the P axis.
    """

    cls: Tensor
    patch_final: Tensor
    patch_mid: Tensor
    grid: tuple[int, int]


def default_layers(depth: int) -> tuple[int, int]:
    """(mid, final) 0-based block indices for a ViT of ``depth`` blocks.

    ``final`` is the last block; ``mid`` is the paper's choice where it has one (12 -> 8,
    24 -> 15), else round(2/3 * depth), kept below ``final`` so the two targets differ.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    final = depth - 1
    mid = PAPER_MID_LAYER.get(depth, round(2 * depth / 3))
    return max(0, min(mid, final - 1)), final


def resolve_layers(cfg: TeacherConfig, depth: int) -> tuple[int, int]:
    """The configured (mid, final) indices, defaults filled in and checked against ``depth``."""
    default_mid, default_final = default_layers(depth)
    mid = default_mid if cfg.mid_layer is None else cfg.mid_layer
    final = default_final if cfg.final_layer is None else cfg.final_layer
    if not 0 <= mid <= final < depth:
        raise ConfigError(
            f"teacher layers need 0 <= mid_layer <= final_layer < depth; got mid_layer={mid}, "
            f"final_layer={final} for {cfg.arch!r} with {depth} blocks (indices are 0-based)"
        )
    return mid, final


def arch_depth(arch: str) -> int:
    """Number of blocks of a timm architecture, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return len(_create_model(arch).blocks)


def _create_model(arch: str, tiny: TeacherConfig | None = None) -> nn.Module:
    """Build a DINOv3 ViT with random weights; ``tiny`` shrinks it to the tiny_* dimensions."""
    if not timm.is_model(arch) or "dinov3" not in arch or not arch.startswith("vit_"):
        known = ", ".join(timm.list_models("vit_*dinov3*"))
        raise ConfigError(f"teacher.arch {arch!r} is not a DINOv3 ViT that timm knows: {known}")
    kwargs: dict[str, int] = {}
    if tiny is not None:
        kwargs = {
            "embed_dim": tiny.tiny_embed_dim,
            "depth": tiny.tiny_depth,
            "num_heads": tiny.tiny_heads,
        }
    # pretrained=False: weights only ever come from the user's local file.
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if getattr(model, "cls_token", None) is None or not hasattr(model, "forward_intermediates"):
        raise ConfigError(f"teacher.arch {arch!r} has no [cls] token or no forward_intermediates")
    return model


def _build_tiny_model(cfg: TeacherConfig) -> nn.Module:
    """The tiny random teacher, identical for a given seed whatever the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _create_model(cfg.arch, tiny=cfg)
    # DINOv3's LayerScale starts at 1e-5, which makes every random block an identity map: the
    # middle and final targets would coincide and a layer mix-up could not show. Open it fully.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                param.fill_(1.0)
    return model


def _tiny_spec(cfg: TeacherConfig) -> dict[str, object]:
    """What determines the tiny teacher's random weights; its digest stands in for a file's."""
    return {
        "arch": cfg.arch,
        "embed_dim": cfg.tiny_embed_dim,
        "depth": cfg.tiny_depth,
        "num_heads": cfg.tiny_heads,
        "seed": cfg.seed,
        "timm": timm.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def _expected_arch(cfg: TeacherConfig) -> str:
    if cfg.tiny:
        return (
            f"tiny {cfg.arch} (embed_dim={cfg.tiny_embed_dim}, depth={cfg.tiny_depth}, "
            f"heads={cfg.tiny_heads})"
        )
    return cfg.arch


def _read_state_dict(path: Path, cfg: TeacherConfig) -> dict[str, Tensor]:
    """Load a weights file as a flat tensor dict; pickled objects other than tensors are refused."""
    expected = _expected_arch(cfg)
    if not path.is_file():
        raise ConfigError(
            f"teacher weights file {path} does not exist (expected {expected} weights). "
            f"{LICENCE_HINT}."
        )
    if not os.access(path, os.R_OK):
        raise ConfigError(f"teacher weights file {path} is not readable (expected {expected})")
    if path.suffix not in _SUPPORTED_SUFFIXES:
        raise ConfigError(
            f"teacher weights file {path}: unknown format {path.suffix!r}; use Meta's original "
            f".pth or a timm .safetensors for {expected}"
        )
    try:
        if path.suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            # weights_only=True: a checkpoint is data, never code to run at load time.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, SafetensorError, OSError, EOFError) as err:
        raise ConfigError(
            f"teacher weights file {path} cannot be read as {expected} weights "
            f"(a plain state dict is required; arbitrary pickled objects are refused): {err}"
        ) from err
    if not isinstance(state, dict):
        raise ConfigError(f"teacher weights file {path} holds a {type(state).__name__}, not a dict")
    return state


def _convert(state: dict[str, Tensor], model: nn.Module, path: Path) -> dict[str, Tensor]:
    """Map Meta's DINOv3 keys (``storage_tokens``, ``ls1.gamma``, ``qkv.bias``) to timm's.

    timm's own ``eva.checkpoint_filter_fn`` does it; on timm keys it changes nothing. It prints
    one line per block when it drops the all-zero qkv bias of the bias-free variants, hence the
    redirected stdout.
    """
    if any(k.startswith(("embeddings.", "layer.")) for k in state):
        raise ConfigError(
            f"teacher weights file {path} is in Hugging Face transformers layout "
            "(embeddings.*, layer.*), which this pipeline does not convert; use Meta's original "
            ".pth or timm's model.safetensors instead"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        return checkpoint_filter_fn(state, model)


def _key_order(key: str) -> tuple[bool, list[int | str]]:
    """Sort order for messages: top-level keys (cls_token, norm) first, then blocks 0, 1, 2, ..."""
    parts = re.split(r"(\d+)", key)
    return key.startswith("blocks."), [int(p) if p.isdigit() else p for p in parts]


def _compare(state: dict[str, Tensor], model: nn.Module, path: Path, expected: str) -> None:
    """Raise a ConfigError listing missing, unexpected and mis-shaped keys, if there are any."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(getattr(v, "shape", ("not a tensor",))) for k, v in state.items()}
    missing = sorted(want.keys() - have.keys(), key=_key_order)
    unexpected = sorted(have.keys() - want.keys(), key=_key_order)
    mismatched = [
        f"{k}: file {have[k]} vs model {want[k]}"
        for k in sorted(want.keys() & have.keys(), key=_key_order)
        if have[k] != want[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for label, items in (
        ("shape mismatches", mismatched),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if items:
            shown = "; ".join(items[:5]) + (" ..." if len(items) > 5 else "")
            problems.append(f"{len(items)} {label} ({shown})")
    raise ConfigError(
        f"teacher weights file {path} does not fit the expected architecture {expected}: "
        + ", ".join(problems)
        + ". Check teacher.arch against the file name (vitb16 -> vit_base_patch16_dinov3, "
        "vitl16 -> vit_large_patch16_dinov3, ...)"
    )


def _load_weights(model: nn.Module, path: Path, cfg: TeacherConfig) -> None:
    state = _convert(_read_state_dict(path, cfg), model, path)
    _compare(state, model, path, _expected_arch(cfg))
    model.load_state_dict(state, strict=True)


def check_weights(cfg: TeacherConfig) -> None:
    """Pre-flight: the weights file exists, loads, and has the keys and shapes of ``cfg.arch``.

    Runs before any GPU job starts so a wrong path or a ViT-L file given for ViT-B fails in
    seconds with a message naming the file, not an hour later inside a training job. The model
    is built on the meta device: only shapes are compared, nothing is initialised.
    """
    if cfg.weights is None:
        if cfg.tiny:
            return
        raise ConfigError(
            f"teacher.weights is not set (expected {cfg.arch} weights). {LICENCE_HINT}."
        )
    path = Path(cfg.weights)
    state = _read_state_dict(path, cfg)
    with torch.device("meta"):
        model = _create_model(cfg.arch, tiny=cfg if cfg.tiny else None)
    resolve_layers(cfg, len(model.blocks))
    _compare(_convert(state, model, path), model, path, _expected_arch(cfg))


def build_tiny_teacher_weights(path: Path, cfg: TeacherConfig) -> None:
    """Write the tiny random-weight teacher as timm-key safetensors.

    The embedded default then runs the same load path as a real DINOv3 file (and its caches
    record a real file digest); the file's metadata says what it is.
    """
    if not cfg.tiny:
        raise ConfigError("build_tiny_teacher_weights needs teacher.tiny = true")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in _build_tiny_model(cfg).state_dict().items()}
    metadata = {"deo_tiny_teacher": json.dumps(_tiny_spec(cfg), sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, tmp, metadata=metadata)
    tmp.replace(path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def route_attention(model: nn.Module, setting: AttentionSetting) -> None:
    """Send every attention block of a timm ViT through ``setting``'s kernel.

    SDPA is timm's own fused path (``fused_attn``); xformers runs ``eva_attention``, timm's
    ``EvaAttention.forward`` step for step with the attention product on xformers.
    """
    check_setting(setting)
    for module in model.modules():
        if isinstance(module, EvaAttention):
            module.fused_attn = True
            module.forward = functools.partial(_routed_attention, module, setting)


def _routed_attention(
    attn: EvaAttention,
    setting: AttentionSetting,
    x: Tensor,
    rope: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    kernel = resolve_kernel(setting, x.device)
    if kernel == "sdpa" or attn_mask is not None or is_causal:
        return EvaAttention.forward(attn, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    return eva_attention(attn, x, rope, kernel)


def eva_attention(
    attn: EvaAttention, x: Tensor, rope: Tensor | None, kernel: AttentionKernel
) -> Tensor:
    """timm's ``EvaAttention.forward`` (no mask) with the attention product on ``kernel``."""
    b, n, c = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x) + bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (
            proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q, k = (
            torch.cat(
                [t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2
            ).type_as(v)
            for t in (q, k)
        )
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = attend(q, k, v, None, kernel, dropout_p).transpose(1, 2).reshape(b, n, c)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class VFMTeacher(nn.Module):
    """A frozen DINOv3 ViT that maps RGB in [0, 1] to :class:`TeacherOutputs`.

    Always in eval mode and without gradients: its outputs are targets. ``mean``/``std`` are
    the normalisation of these weights, from timm's pretrained config of ``cfg.arch`` (ImageNet
    for the LVD-1689M ViTs, satellite statistics for ``*.sat493m``); it is applied inside
    ``forward`` so callers never normalise for the teacher.
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.tiny:
            log.warning(
                "TEACHER IS A TINY RANDOM-WEIGHT ViT (%s, seed %d), NOT DINOv3: its targets carry "
                "no knowledge; use it only to test the pipeline",
                _expected_arch(cfg),
                cfg.seed,
            )
            model = _build_tiny_model(cfg)
        elif cfg.weights is None:
            raise ConfigError(
                f"teacher.weights is not set (expected {cfg.arch} weights). {LICENCE_HINT}."
            )
        else:
            model = _create_model(cfg.arch)
        self.depth = len(model.blocks)
        self.mid_layer, self.final_layer = resolve_layers(cfg, self.depth)
        if cfg.weights is not None:
            _load_weights(model, Path(cfg.weights), cfg)
        model.requires_grad_(False)
        route_attention(model, cfg.attention)
        self.model = model.eval()
        self.embed_dim: int = model.embed_dim
        self.patch_size: tuple[int, int] = tuple(model.patch_embed.patch_size)
        self.num_prefix_tokens: int = model.num_prefix_tokens
        pretrained = model.pretrained_cfg
        self.mean: tuple[float, float, float] = tuple(float(m) for m in pretrained["mean"])
        self.std: tuple[float, float, float] = tuple(float(s) for s in pretrained["std"])
        # Buffers so .to(device) moves them; not persistent: they are a property of the weights.
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._digest: str | None = None
        log.info(
            "teacher %s: depth %d, mid block %d, final block %d, mean %s, std %s",
            _expected_arch(cfg),
            self.depth,
            self.mid_layer,
            self.final_layer,
            self.mean,
            self.std,
        )

    def train(self, mode: bool = True) -> VFMTeacher:
        """No-op: the teacher stays in eval mode whatever its parent module does."""
        return super().train(False)

    def weights_digest(self) -> str:
        """sha256 of the weights file, or of the tiny teacher's init spec when it has no file."""
        if self._digest is None:
            if self.cfg.weights is not None:
                self._digest = _sha256_file(Path(self.cfg.weights))
            else:
                spec = json.dumps(_tiny_spec(self.cfg), sort_keys=True).encode()
                self._digest = hashlib.sha256(spec).hexdigest()
        return self._digest

    def forward(self, rgb: Tensor, *, normalised: bool = False) -> TeacherOutputs:
        """rgb (B, 3, H, W) in [0, 1], H and W multiples of the patch size -> targets.

        ``normalised``: ``rgb`` is the model's normalised optical channels (channels 0-2 of a
        view), used as they are: the authors feed DINOv3 ``ms_data[:, :3]`` without
        re-normalising it to the weights' statistics.
        """
        if rgb.ndim != 4 or rgb.shape[1] != 3 or not rgb.is_floating_point():
            raise ValueError(
                f"teacher expects float (B, 3, H, W) RGB in [0, 1], got {rgb.dtype} "
                f"{tuple(rgb.shape)}"
            )
        height, width = rgb.shape[-2:]
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(
                f"teacher input {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}; crop or resize the view first"
            )
        take = sorted({self.mid_layer, self.final_layer})
        with torch.no_grad():
            x = rgb if normalised else (rgb - self._mean) / self._std
            layers = self.model.forward_intermediates(
                x,
                indices=take,
                norm=True,
                output_fmt="NLC",
                return_prefix_tokens=True,
                stop_early=True,
                intermediates_only=True,
            )
        by_index = dict(zip(take, layers, strict=True))
        patch_final, prefix_final = by_index[self.final_layer]
        patch_mid, _ = by_index[self.mid_layer]
        grid = (height // self.patch_size[0], width // self.patch_size[1])
        # The [cls] token is the first prefix token; registers follow it (timm's _pos_embed).
        return TeacherOutputs(
            cls=prefix_final[:, 0],
            patch_final=patch_final,
            patch_mid=patch_mid,
            grid=grid,
        )

    def extra_repr(self) -> str:
        return f"config={asdict(self.cfg)}, mid_layer={self.mid_layer}, final={self.final_layer}"
