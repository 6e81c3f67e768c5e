"""The DEO student: a Swin Transformer with two patch embeddings feeding one set of stages.

The multispectral (MS, 10 bands) and optical (RGB, 3 bands) inputs each get their own patch
embedding; everything after it — the stages and the final norm — is shared, so what the RGB
path learns from the optical VFM lands in the same weights the MS path uses.

The stages, blocks and attention modules are timm's ``SwinTransformer`` parts, built with
``pretrained=False``. Only the block-level *window bookkeeping* is done here, per forward, from
the feature map's shape (see ``_window_attention``): the student sees 224 px global crops,
96 px local crops and 256 px evaluation images with the same weights, and must not keep any
state between those sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import is_model, model_entrypoint
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

Modality = Literal["ms", "rgb"]

# The additive attention bias timm's Swin uses for masked pairs; finite so that a window made
# only of padding (whose outputs are cropped away) never produces NaN.
_MASKED = -100.0


@dataclass(frozen=True)
class StudentConfig:
    """Architecture of the student backbone.

    ``arch`` only supplies widths, depths and head counts (a timm Swin name); the window and the
    reference size are always taken from this config, never from the name.
    """

    arch: str = "swin_tiny_patch4_window7_224"
    # Attention window in tokens. The paper's Swin-B uses 12; 7 is Swin's ImageNet default.
    window_size: int = 7
    # Size each stage's window is fitted to at build time (timm clips a window to the stage's
    # grid at this size, which fixes the relative-position tables). Use the global crop size.
    img_size: int = 224
    # Overrides for tiny demo/test models; None keeps the arch's values.
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    ms_channels: int = 10
    rgb_channels: int = 3
    drop_path_rate: float = 0.1
    # Stage whose map feeds the VFM middle-layer head; -2 is the stage before the last.
    mid_stage: int = -2


@dataclass
class StudentFeatures:
    """What one forward pass of the student returns, by name.

    ``stages`` are the raw stage outputs (no final norm), NCHW, so a consumer can resize them
    to any token grid. ``pooled`` is timm's image embedding: final norm per token, then the mean.
    """

    pooled: Tensor
    stages: list[Tensor]
    mid_stage: int

    @property
    def patch_final(self) -> Tensor:
        """(B, C, H, W) map of the last stage."""
        return self.stages[-1]

    @property
    def patch_mid(self) -> Tensor:
        """(B, C, H, W) map of the configured middle stage."""
        return self.stages[self.mid_stage]


class DualEmbedSwin(nn.Module):
    """Swin backbone with an MS and an optional RGB patch embedding in front of shared stages.

    ``with_rgb=False`` builds the MS embedding only: the EMA teacher never sees RGB, and its
    parameter names are then a subset of the student's, so an EMA update can pair them by name.
    """

    def __init__(self, cfg: StudentConfig, with_rgb: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        swin = _build_timm_swin(cfg)
        self.patch_size: tuple[int, int] = tuple(swin.patch_embed.patch_size)
        self.embed_dim: int = swin.embed_dim
        self.ms_embed = self._patch_embed(cfg.ms_channels)
        self.rgb_embed = self._patch_embed(cfg.rgb_channels) if with_rgb else None
        # timm's own names, so ``layers.*`` and ``norm.*`` keys match a timm Swin state dict.
        self.layers = swin.layers
        self.norm = swin.norm
        self.stage_dims: tuple[int, ...] = tuple(info["num_chs"] for info in swin.feature_info)
        self.num_features: int = self.stage_dims[-1]
        self.mid_stage = cfg.mid_stage
        _check_mid_stage(cfg.mid_stage, len(self.stage_dims))

    @property
    def distill_dims(self) -> tuple[int, int, int]:
        """Widths of (pooled, final stage, mid stage): the order ``DistillHeads`` takes."""
        return self.num_features, self.stage_dims[-1], self.stage_dims[self.mid_stage]

    def _patch_embed(self, in_chans: int) -> PatchEmbed:
        # Same layer timm's Swin builds: conv patchify + LayerNorm, channels-last output.
        # strict_img_size=False lets any size divisible by the patch size through.
        return PatchEmbed(
            img_size=self.cfg.img_size,
            patch_size=self.patch_size,
            in_chans=in_chans,
            embed_dim=self.embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
        )

    def embedding(self, modality: Modality) -> PatchEmbed:
        """The patch embedding for ``modality``; fails clearly where it was not built."""
        if modality == "ms":
            return self.ms_embed
        if modality == "rgb":
            if self.rgb_embed is None:
                raise ValueError("this backbone was built with with_rgb=False: no RGB embedding")
            return self.rgb_embed
        raise ValueError(f"unknown modality {modality!r}; expected 'ms' or 'rgb'")

    def forward(self, x: Tensor, modality: Modality = "ms") -> StudentFeatures:
        """Embed ``x`` (B, C, H, W) with the modality's embedding and run the shared stages.

        H and W must be multiples of the patch size; otherwise any size works, because every
        block sizes its windows, shifts and masks from the feature map it receives.
        """
        embed = self.embedding(modality)
        expected = embed.proj.in_channels
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(
                f"{modality} input must be (B, {expected}, H, W), got {tuple(x.shape)}"
            )
        x = embed(x)  # (B, H, W, C)
        stages: list[Tensor] = []
        for stage in self.layers:
            x = stage.downsample(x)
            for block in stage.blocks:
                x = _block_forward(block, x)
            stages.append(x.permute(0, 3, 1, 2))
        pooled = self.norm(x).mean(dim=(1, 2))
        return StudentFeatures(pooled=pooled, stages=stages, mid_stage=self.mid_stage)

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """Everything export needs: both embeddings, the shared stages and the final norm.

        Keys are ``ms_embed.*``, ``rgb_embed.*`` (when built), ``layers.*`` and ``norm.*``;
        the last two are timm's Swin names. Loads back with ``load_state_dict``.
        """
        return {name: tensor.detach().clone() for name, tensor in self.state_dict().items()}

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm's Swin exempts from weight decay (relative-position tables)."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


def _build_timm_swin(cfg: StudentConfig) -> SwinTransformer:
    """A headless timm Swin whose stages and final norm the student adopts."""
    swin_module = SwinTransformer.__module__
    if not is_model(cfg.arch) or model_entrypoint(cfg.arch).__module__ != swin_module:
        raise ValueError(f"student arch {cfg.arch!r} is not a timm SwinTransformer")
    overrides = {
        key: value
        for key, value in (
            ("embed_dim", cfg.embed_dim),
            ("depths", cfg.depths),
            ("num_heads", cfg.num_heads),
        )
        if value is not None
    }
    model = timm.create_model(
        cfg.arch,
        pretrained=False,
        num_classes=0,
        img_size=cfg.img_size,
        window_size=cfg.window_size,
        strict_img_size=False,
        drop_path_rate=cfg.drop_path_rate,
        **overrides,
    )
    assert isinstance(model, SwinTransformer)
    return model


def _check_mid_stage(mid_stage: int, n_stages: int) -> None:
    if not -n_stages <= mid_stage < n_stages:
        raise ValueError(f"mid_stage {mid_stage} is outside the {n_stages} stages")
    if mid_stage % n_stages == n_stages - 1:
        raise ValueError(
            f"mid_stage {mid_stage} is the last stage; the middle head would copy the final one"
        )


def _block_forward(block: SwinTransformerBlock, x: Tensor) -> Tensor:
    """One timm Swin block on (B, H, W, C), with windows fitted to this H and W."""
    b, h, w, c = x.shape
    x = x + block.drop_path1(_window_attention(block, block.norm1(x)))
    x = x.reshape(b, h * w, c)
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x.reshape(b, h, w, c)


def _window_attention(block: SwinTransformerBlock, x: Tensor) -> Tensor:
    """(Shifted-)window attention of ``block`` on (B, H, W, C) of any H and W.

    Why not timm's own ``_attn``: with ``strict_img_size=False`` timm keeps the shift chosen at
    build time, rolls *before* padding and computes its shift mask on the padded map, so when a
    window does not divide the grid (96 px crops: 24, 12, 6, 3 tokens) the mask's region
    boundary misses the wrap-around boundary and padding tokens are attended to. Here, per call:
    - the window is the block's built window (its relative-position table fits it);
    - a shifted block shifts by half a window only along an axis longer than the window (as Swin
      decides at build time for a fixed size);
    - the rolled map is padded up to whole windows and one mask forbids both attention across
      the wrap-around seam and attention to padding, so outputs do not depend on the padding.
    At the build-time size with windows dividing every grid (224 px, window 7) this is exactly
    timm's computation, which the tests check.
    """
    _, h, w, c = x.shape
    win = block.window_size
    shifted_block = any(block.target_shift_size)
    shift = tuple(
        size // 2 if shifted_block and extent > size else 0
        for extent, size in zip((h, w), win, strict=True)
    )
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h, pad_w = (-h) % win[0], (-w) % win[1]
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w

    windows = window_partition(x, win).reshape(-1, win[0] * win[1], c)
    mask = _window_mask((h, w), (hp, wp), win, shift, x.device, x.dtype)
    out = block.attn(windows, mask=mask)
    out = window_reverse(out.reshape(-1, win[0], win[1], c), win, hp, wp)[:, :h, :w]
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2))
    return out


def _window_mask(
    size: tuple[int, int],
    padded: tuple[int, int],
    win: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor | None:
    """Additive mask (n_windows, A, A) for a rolled, padded map; None when nothing is masked.

    Each real token is labelled by which side of the wrap-around seam it lies on per axis (the
    last ``shift`` rows/columns of the rolled map came from the opposite edge); padding gets a
    label of its own. A query may attend to a key only with the same label, and never to
    padding. Within one window, tokens with the same label are neighbours in the image.
    """
    if not any(shift) and padded == size:
        return None

    def axis_side(extent: int, padded_extent: int, axis_shift: int) -> tuple[Tensor, Tensor]:
        pos = torch.arange(padded_extent, device=device)
        wrapped = pos >= extent - axis_shift if axis_shift else torch.zeros_like(pos, dtype=bool)
        return wrapped.long(), pos >= extent

    row_side, row_pad = axis_side(size[0], padded[0], shift[0])
    col_side, col_pad = axis_side(size[1], padded[1], shift[1])
    labels = row_side[:, None] * 2 + col_side[None, :]  # 0..3: the four seam-bounded regions
    is_pad = row_pad[:, None] | col_pad[None, :]
    labels = labels.masked_fill(is_pad, -1)

    area = win[0] * win[1]
    label_windows = window_partition(labels[None, :, :, None], win).reshape(-1, area)
    pad_windows = label_windows < 0
    blocked = (label_windows[:, :, None] != label_windows[:, None, :]) | pad_windows[:, None, :]
    mask = torch.zeros(blocked.shape, device=device, dtype=dtype)
    return mask.masked_fill(blocked, _MASKED)
