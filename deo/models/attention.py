"""Which kernel computes ``softmax(q kᵀ / √d + bias) v``: PyTorch's SDPA or xformers.

The student's window attention and the VFM's attention both call :func:`attend`, so one
config word (``attention: auto | sdpa | xformers``) picks the kernel for both. The two
kernels compute the same function; which is faster depends on the GPU and the bias shape,
which is why it is a switch and not a constant (``benchmarks/gpu_check.py`` compares them).

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, everywhere.
- ``xformers``: ``xformers.ops.memory_efficient_attention``, CUDA tensors only; asking for it
  without the package or off CUDA is an error, not a silent fallback.
- ``auto``: xformers where it is installed and the tensors are on CUDA, SDPA otherwise.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from deo.errors import ConfigError

AttentionSetting = Literal["auto", "sdpa", "xformers"]
AttentionKernel = Literal["sdpa", "xformers"]
ATTENTION_SETTINGS: tuple[str, ...] = ("auto", "sdpa", "xformers")

# xformers reads an additive bias whose rows start on 8-element boundaries.
_XFORMERS_ALIGN = 8


# Looked up once at import: the per-call resolution then reads a constant, which torch.compile
# traces without a graph break.
_XFORMERS = importlib.util.find_spec("xformers") is not None


def xformers_available() -> bool:
    """Whether the xformers package can be imported."""
    return _XFORMERS


def check_setting(setting: str) -> None:
    """Fail at build time on an unknown word, or on xformers without the package."""
    if setting not in ATTENTION_SETTINGS:
        raise ConfigError(f"attention {setting!r} is not one of {list(ATTENTION_SETTINGS)}")
    if setting == "xformers" and not xformers_available():
        raise ConfigError(
            "attention: xformers is configured but the xformers package is not installed "
            "(pip install xformers matching your torch build), or set attention: auto/sdpa"
        )


def resolve_kernel(setting: str, device: torch.device) -> AttentionKernel:
    """The kernel ``setting`` means for tensors on ``device``; ConfigError where it cannot run."""
    check_setting(setting)
    on_cuda = device.type == "cuda"
    if setting == "sdpa":
        return "sdpa"
    if setting == "auto":
        return "xformers" if on_cuda and xformers_available() else "sdpa"
    if not on_cuda:
        raise ConfigError(
            f"attention: xformers runs on CUDA only; the model is on {device}. "
            "Set attention: auto (SDPA off CUDA) or sdpa"
        )
    return "xformers"


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    kernel: AttentionKernel,
    dropout_p: float = 0.0,
) -> Tensor:
    """``softmax(q kᵀ / √d + bias) v`` on (B, H, N, d); ``bias`` broadcasts to (B, H, N, M).

    ``bias`` is additive (finite values, e.g. -100 for masked pairs as Swin uses), so both
    kernels see exactly the same logits.
    """
    if bias is not None:
        bias = bias.to(q.dtype)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return _xformers(q, k, v, bias, dropout_p)


def _xformers(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> Tensor:
    """xformers' memory-efficient kernel on (B, H, N, d) tensors (it takes (B, N, H, d))."""
    import xformers.ops as xops

    full = None
    if bias is not None:
        b, h, n, m = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        while bias.ndim < 4:
            bias = bias.unsqueeze(0)
        # Copy the bias into rows padded to the alignment, then view it at its true width and
        # broadcast over batch and heads without materialising the copies.
        width = -(-m // _XFORMERS_ALIGN) * _XFORMERS_ALIGN
        storage = bias.new_empty(*bias.shape[:-1], width)[..., :m]
        storage.copy_(bias)
        full = storage.expand(b, h, n, m)
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=full, p=dropout_p
    )
    return out.transpose(1, 2)
