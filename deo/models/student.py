"""The DEO student: torchvision's Swin Transformer (v1) with two patch embeddings feeding one
set of stages.

The authors train ``torchvision.models.swin_b`` with its stem deleted and two patch
embeddings in front (``DEO/main_dino.py``, ``DEO/utils/misc.py``: ``conv_ms``, ``conv_rgb``), and
torchgeo 0.10.1 ships the released model the same way (``torchgeo.models.DEO``, window 12).
This module computes exactly that function: its stages and merges are torchvision's own
``SwinTransformerBlock`` / ``PatchMerging`` modules (indices 0..6 as in ``DEO.feat_extr.features``),
and only the attention kernel is swapped (:class:`WindowAttention`). Like torchvision, a map
that the window does not divide is zero-padded and the padding *is attended to*: at 224 px
with window 12 every stage is padded, and masking it would be a different function from the
released weights'.

The MS (10 bands) and optical (RGB, 3 bands) inputs each get their own patch embedding;
everything after it is shared, so what the RGB path learns from the optical VFM lands in the
weights the MS path uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import (
    ShiftedWindowAttention,
    SwinTransformer,
    SwinTransformerBlock,
)

from deo.models.attention import AttentionSetting, attend, check_setting, resolve_kernel

Modality = Literal["ms", "rgb"]

# torchvision's builders (``swin_t``, ``swin_s``, ``swin_b`` in
# torchvision/models/swin_transformer.py): (embed_dim, depths, num_heads). Patch 4, MLP ratio 4.
TORCHVISION_ARCHS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
PATCH_SIZE = 4
# The additive bias torchvision puts on pairs across a shifted window's wrap-around seam.
_SEAM_BIAS = -100.0


@dataclass(frozen=True)
class StudentConfig:
    """Architecture of the student backbone.

    ``arch`` supplies widths, depths and head counts (a torchvision Swin builder name); the
    window is always taken from this config (torchvision's default is 7, the released DEO 12).
    """

    arch: str = "swin_t"
    # Attention window in tokens; shifted blocks shift by half of it (torchvision's rule).
    window_size: int = 7
    # The global crop size the model is trained at; recorded in the export's input spec.
    img_size: int = 224
    # Overrides for tiny demo/test models; None keeps the arch's values.
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    ms_channels: int = 10
    rgb_channels: int = 3
    # torchvision's stochastic depth: block i of n drops with drop_path_rate * i / (n - 1).
    drop_path_rate: float = 0.1
    # Stage whose map feeds the VFM middle-layer head; -2 is the stage before the last.
    mid_stage: int = -2
    # Attention kernel (deo.models.attention): auto = xformers on CUDA when installed, else SDPA.
    attention: AttentionSetting = "auto"

    def widths(self) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """(embed_dim, depths, num_heads): the arch's, with this config's overrides."""
        if self.arch not in TORCHVISION_ARCHS:
            raise ValueError(
                f"student arch {self.arch!r} is not a torchvision Swin; use one of "
                f"{sorted(TORCHVISION_ARCHS)} (embed_dim/depths/num_heads override its widths)"
            )
        embed_dim, depths, num_heads = TORCHVISION_ARCHS[self.arch]
        embed_dim = embed_dim if self.embed_dim is None else self.embed_dim
        depths = depths if self.depths is None else tuple(self.depths)
        num_heads = num_heads if self.num_heads is None else tuple(self.num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"student depths {depths} and num_heads {num_heads} differ in length")
        if sum(depths) < 2:
            raise ValueError(f"student depths {depths}: torchvision's Swin needs >= 2 blocks")
        return embed_dim, depths, num_heads


@dataclass
class StudentFeatures:
    """What one forward pass of the student returns, by name.

    ``stages`` are the raw stage outputs (no final norm), NCHW: torchgeo's
    ``DEO.forward_features`` permuted to channels-first. ``pooled`` is torchvision's image
    embedding: final norm per token, then the mean.
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


class PatchEmbedding(nn.Module):
    """torchvision's Swin stem: a 4x4 stride-4 conv, channels-last, LayerNorm(eps=1e-5).

    The same function as torchvision's ``Sequential(Conv2d, Permute, LayerNorm)``, with named
    parts (``proj``, ``norm``) where torchvision numbers them (0, 2).
    """

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class WindowAttention(ShiftedWindowAttention):
    """torchvision's shifted-window attention, with the attention product on a chosen kernel.

    Parameters and buffers are torchvision's (``qkv``, ``proj``, ``relative_position_bias_table``,
    ``relative_position_index``); ``forward`` is ``window_attention``, the same computation as
    torchvision's ``shifted_window_attention`` with the softmax step done by
    ``deo.models.attention.attend``.
    """

    attention: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        return window_attention(self, x, resolve_kernel(self.attention, x.device))


def window_attention(module: ShiftedWindowAttention, x: Tensor, kernel: str) -> Tensor:
    """torchvision's ``shifted_window_attention`` for ``module`` on (B, H, W, C).

    Step for step as torchvision: pad to whole windows (padding zeros become tokens that are
    attended to), drop the shift along an axis the padded map does not exceed, roll, and bias
    pairs across the wrap-around seam by -100. The relative-position bias and the seam bias go
    to the kernel as one additive bias.
    """
    b, h, w, c = x.shape
    win = module.window_size
    heads = module.num_heads
    pad_r = (win[1] - w % win[1]) % win[1]
    pad_b = (win[0] - h % win[0]) % win[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = h + pad_b, w + pad_r
    shift = [
        0 if win[0] >= ph else module.shift_size[0],
        0 if win[1] >= pw else module.shift_size[1],
    ]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = ph // win[0], pw // win[1]
    area = win[0] * win[1]
    windows = x.view(b, nh, win[0], nw, win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(-1, area, c)

    qkv = F.linear(windows, module.qkv.weight, module.qkv.bias)
    qkv = qkv.reshape(-1, area, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B * nW, heads, area, d)
    bias = module.get_relative_position_bias()  # (1, heads, area, area)
    if shifted:
        # Fold the windows into the head axis so the per-window seam bias broadcasts over B.
        seam = _seam_bias(ph, pw, win, shift, x.device, bias.dtype)  # (nW, 1, area, area)
        bias = (bias + seam).reshape(1, nh * nw * heads, area, area)
        q, k, v = (t.reshape(b, nh * nw * heads, area, -1) for t in (q, k, v))
    dropout_p = module.attention_dropout if module.training else 0.0
    out = attend(q, k, v, bias, kernel, dropout_p)
    out = out.reshape(b * nh * nw, heads, area, -1).transpose(1, 2).reshape(-1, area, c)
    out = F.linear(out, module.proj.weight, module.proj.bias)
    out = F.dropout(out, p=module.dropout, training=module.training)

    out = out.view(b, nh, nw, win[0], win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if shifted:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


def _seam_bias(
    ph: int,
    pw: int,
    win: list[int],
    shift: list[int],
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """(nW, 1, A, A) additive bias of torchvision's shifted windows on a (ph, pw) rolled map.

    The rolled map is cut into 3 x 3 regions by the slices (0, -win), (-win, -shift),
    (-shift, end) per axis, torchvision's own; pairs of tokens from different regions get -100.
    """
    labels = torch.zeros((ph, pw), device=device)
    rows = ((0, -win[0]), (-win[0], -shift[0]), (-shift[0], None))
    cols = ((0, -win[1]), (-win[1], -shift[1]), (-shift[1], None))
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            labels[r0:r1, c0:c1] = 3 * i + j
    area = win[0] * win[1]
    labels = labels.view(ph // win[0], win[0], pw // win[1], win[1]).permute(0, 2, 1, 3)
    labels = labels.reshape(-1, area)
    different = labels[:, None, :] != labels[:, :, None]
    bias = torch.zeros(different.shape, device=device, dtype=dtype)
    return bias.masked_fill(different, _SEAM_BIAS).unsqueeze(1)


class DualEmbedSwin(nn.Module):
    """torchvision's Swin stages with an MS and an optional RGB patch embedding in front.

    ``features`` holds torchgeo's ``DEO.feat_extr.features`` (stages at 0, 2, 4, 6, patch
    merges at 1, 3, 5) and ``norm`` its final norm, so the state dict is torchgeo's with the
    ``feat_extr.`` prefix dropped and ``conv_ms``/``conv_rgb`` named ``ms_embed``/``rgb_embed``.
    ``with_rgb=False`` builds the MS embedding only: the EMA teacher never sees RGB, and its
    parameter names are then a subset of the student's, so an EMA update can pair them by name.
    """

    def __init__(self, cfg: StudentConfig, with_rgb: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        embed_dim, depths, num_heads = cfg.widths()
        _check_mid_stage(cfg.mid_stage, len(depths))
        if cfg.window_size < 1:
            raise ValueError(f"student window_size must be >= 1, got {cfg.window_size}")
        swin = SwinTransformer(
            patch_size=[PATCH_SIZE, PATCH_SIZE],
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=[cfg.window_size, cfg.window_size],
            stochastic_depth_prob=cfg.drop_path_rate,
            num_classes=1,
            block=partial(SwinTransformerBlock, attn_layer=WindowAttention),
        )
        self.patch_size: tuple[int, int] = (PATCH_SIZE, PATCH_SIZE)
        self.embed_dim: int = embed_dim
        self.depths: tuple[int, ...] = depths
        self.num_heads: tuple[int, ...] = num_heads
        self.ms_embed = PatchEmbedding(cfg.ms_channels, embed_dim)
        self.rgb_embed = PatchEmbedding(cfg.rgb_channels, embed_dim) if with_rgb else None
        # torchvision's features without its stem (features[0]), as the authors and torchgeo.
        self.features = nn.Sequential(*list(swin.features)[1:])
        self.norm = swin.norm
        self.stage_dims: tuple[int, ...] = tuple(embed_dim * 2**i for i in range(len(depths)))
        self.num_features: int = self.stage_dims[-1]
        self.mid_stage = cfg.mid_stage
        self.set_attention(cfg.attention)

    def set_attention(self, setting: AttentionSetting) -> None:
        """Choose the attention kernel of every block (resolved per call, by device)."""
        check_setting(setting)
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.attention = setting

    @property
    def distill_dims(self) -> tuple[int, int, int]:
        """Widths of (pooled, final stage, mid stage): the order ``DistillHeads`` takes."""
        return self.num_features, self.stage_dims[-1], self.stage_dims[self.mid_stage]

    def embedding(self, modality: Modality) -> PatchEmbedding:
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

        H and W must be multiples of the patch size (4); any such size works: torchvision's
        blocks pad each map to whole windows and its merges pad odd maps.
        """
        embed = self.embedding(modality)
        expected = embed.proj.in_channels
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(
                f"{modality} input must be (B, {expected}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-1] % PATCH_SIZE or x.shape[-2] % PATCH_SIZE:
            raise ValueError(f"input {tuple(x.shape)} is not a multiple of the patch size 4")
        x = embed(x)  # (B, H, W, C)
        stages: list[Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index % 2 == 0:  # a stage; odd indices are patch merges
                stages.append(x.permute(0, 3, 1, 2))
        pooled = self.norm(x).mean(dim=(1, 2))
        return StudentFeatures(pooled=pooled, stages=stages, mid_stage=self.mid_stage)

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """Everything export needs: both embeddings, the shared stages and the final norm.

        Keys are ``ms_embed.*``, ``rgb_embed.*`` (when built), ``features.*`` and ``norm.*``,
        including torchvision's ``relative_position_index`` buffers. Loads back strictly.
        """
        return {name: tensor.detach().clone() for name, tensor in self.state_dict().items()}

    def no_weight_decay(self) -> set[str]:
        """Parameter names Swin exempts from weight decay (relative-position tables)."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


def _check_mid_stage(mid_stage: int, n_stages: int) -> None:
    if not -n_stages <= mid_stage < n_stages:
        raise ValueError(f"mid_stage {mid_stage} is outside the {n_stages} stages")
    if mid_stage % n_stages == n_stages - 1:
        raise ValueError(
            f"mid_stage {mid_stage} is the last stage; the middle head would copy the final one"
        )
