"""Temporal aggregation of per-date feature maps, as PANGAEA runs multi-temporal benchmarks.

A single-date encoder sees each date of a time series on its own; before the decoder, each
stage's ``(B, T, C, h, w)`` maps are merged into one ``(B, C, h, w)`` map by a learned module,
trained with the decoder while the encoder stays frozen:

- ``ltae``: a Lightweight Temporal Attention Encoder (Garnot & Landrieu, 2020) shared by every
  pixel of a stage, as PANGAEA configures it (no positional encoding, ``d_model`` = ``mlp`` =
  the stage width, 16 heads of 4-dimensional keys, dropout 0.2). PANGAEA maps every stage to
  the widest one first so a single L-TAE serves all; here each stage has its own, at its width.
- ``linear``: a learned linear map over the time axis (PANGAEA's ``linear`` strategy).
- ``median``: no module; the reader gives the per-pixel temporal median as one image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from deo.errors import ConfigError

Aggregation = Literal["ltae", "linear", "median"]


@dataclass(frozen=True)
class TemporalConfig:
    """The ``evaluate.protocol.temporal`` section: how time series benchmarks are evaluated."""

    aggregation: Aggregation = "ltae"
    dates: int = 6
    n_head: int = 16
    d_k: int = 4
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.aggregation not in ("ltae", "linear", "median"):
            raise ConfigError(
                "evaluate.protocol.temporal.aggregation must be ltae, linear or median, "
                f"not {self.aggregation!r}"
            )
        if self.dates < 1:
            raise ConfigError(f"evaluate.protocol.temporal.dates must be >= 1, not {self.dates}")

    @property
    def reader_dates(self) -> int | None:
        """Dates per sample the reader yields; None: the temporal median."""
        return None if self.aggregation == "median" else self.dates


class LTAE(nn.Module):
    """L-TAE over ``(B, T, C, H, W)``: one learned query per head attends over the dates.

    Per pixel: group-norm the T input vectors, project them to ``d_model`` (1×1 conv), derive
    keys with a linear layer, score them against each head's master query (scaled by
    sqrt(d_k)), softmax over time, and sum each head's slice of the projected vectors with its
    weights; the heads' outputs are concatenated, passed through an MLP (linear, batch norm,
    ReLU), dropout and a final group norm.
    """

    def __init__(self, channels: int, n_head: int = 16, d_k: int = 4, dropout: float = 0.2):
        super().__init__()
        if channels % n_head:
            raise ConfigError(f"L-TAE: {channels} channels do not split into {n_head} heads")
        self.n_head, self.d_k = n_head, d_k
        self.in_norm = nn.GroupNorm(n_head, channels)
        self.inconv = nn.Conv1d(channels, channels, 1)
        self.query = nn.Parameter(torch.randn(n_head, d_k) * math.sqrt(2.0 / d_k))
        self.key = nn.Linear(channels, n_head * d_k)
        nn.init.normal_(self.key.weight, mean=0.0, std=math.sqrt(2.0 / d_k))
        self.attn_dropout = nn.Dropout(0.1)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.BatchNorm1d(channels), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.GroupNorm(n_head, channels)

    def attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T, C) pixel sequences -> per-head outputs concatenated (N, C), weights (N, h, T)."""
        n, t, c = x.shape
        x = self.in_norm(x.transpose(1, 2))
        x = self.inconv(x).transpose(1, 2)  # (N, T, C)
        keys = self.key(x).view(n, t, self.n_head, self.d_k)
        scores = torch.einsum("nthd,hd->nht", keys, self.query) / math.sqrt(self.d_k)
        weights = self.attn_dropout(scores.softmax(dim=-1))
        values = x.view(n, t, self.n_head, c // self.n_head)
        out = torch.einsum("nht,nthv->nhv", weights, values).reshape(n, c)
        return out, weights

    def forward(self, x: Tensor) -> Tensor:
        b, t, c, h, w = x.shape
        pixels = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)
        out, _ = self.attention(pixels)
        out = self.out_norm(self.dropout(self.mlp(out)))
        return out.view(b, h, w, c).permute(0, 3, 1, 2)


class LinearOverTime(nn.Module):
    """A learned weighted sum over the ``dates`` time steps (with a bias), per channel alike."""

    def __init__(self, dates: int):
        super().__init__()
        self.map = nn.Linear(dates, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.map(x.permute(0, 2, 3, 4, 1)).squeeze(-1)


def temporal_modules(cfg: TemporalConfig, stage_dims: Sequence[int]) -> nn.ModuleList:
    """One aggregation module per encoder stage."""
    if cfg.aggregation == "ltae":
        return nn.ModuleList(LTAE(d, cfg.n_head, cfg.d_k, cfg.dropout) for d in stage_dims)
    if cfg.aggregation == "linear":
        return nn.ModuleList(LinearOverTime(cfg.dates) for _ in stage_dims)
    raise ConfigError(f"temporal aggregation {cfg.aggregation!r} has no learned module")
