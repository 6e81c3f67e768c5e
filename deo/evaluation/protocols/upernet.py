"""A compact UPerNet decoder (Xiao et al., 2018), as PANGAEA puts it on a hierarchical encoder.

A pyramid pooling module (PPM) summarises the last, coarsest map at several grid sizes; a
feature pyramid (FPN) then carries that context top-down into the finer maps through 1x1
laterals, each level is smoothed by a 3x3 conv, all levels are upsampled to the finest one,
concatenated and fused, and a 1x1 conv gives the class logits at the finest map's resolution
(1/4 of the input for Swin). Conv-BN-ReLU blocks throughout, as in PANGAEA's UPerNet; BatchNorm
needs training batches of at least two, which the protocol's loader ensures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _resize(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerNet(nn.Module):
    """Logits (B, num_classes, H0, W0) from NCHW maps ordered fine to coarse (H0 the finest)."""

    def __init__(
        self,
        in_dims: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        top = in_dims[-1]
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_bn_relu(top, channels, 1))
            for scale in pool_scales
        )
        self.bottleneck = _conv_bn_relu(top + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_conv_bn_relu(d, channels, 1) for d in in_dims[:-1])
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in in_dims[:-1])
        self.fuse = _conv_bn_relu(len(in_dims) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        top = maps[-1]
        context = [_resize(branch(top), top.shape[-2:]) for branch in self.ppm]
        levels = [lateral(m) for lateral, m in zip(self.laterals, maps[:-1], strict=True)]
        levels.append(self.bottleneck(torch.cat([top, *context], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse context into finer levels
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [smooth(level) for smooth, level in zip(self.smooth, levels[:-1], strict=True)]
        outs.append(levels[-1])
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))
