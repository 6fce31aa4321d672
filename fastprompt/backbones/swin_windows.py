"""A Swin block's windows: the shifted-window partition of its patches, the way back, the
windows' attention bias (a constant of the prompt attention op, refused while it trains) and
their attention as timm's ``WindowAttention`` computes it (``docs/design.md`` §4, "Swin").

:func:`partition` and :func:`reverse` follow timm's ``SwinTransformerBlock._attn`` (roll, pad to
whole windows, partition; and back), except that a pad of nothing is skipped (``F.pad`` copies
even then). Making the windows by one gather (roll and partition are together a fixed
permutation where no padding is needed) was tried and measured: half the time of the layout
copies on their own, no gain in a Swin-B training step (``docs/design.md`` §4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Windows",
    "constant_window_bias",
    "partition",
    "reverse",
    "split_qkv",
    "window_attention",
    "window_bias",
]


class Windows(NamedTuple):
    """A block's window partition of normalised patches, as timm's ``SwinTransformerBlock._attn``
    makes it: (B·nW, M, C) windows, image by image, and how to put them back."""

    windows: Tensor
    mask: Tensor | None
    count: int  # windows per image
    size: tuple[int, int, int, int]  # B, H, W, C of the patches
    padded: tuple[int, int]  # H, W after padding to whole windows


def _mask(blk: nn.Module, h: Tensor) -> Tensor | None:
    """The shift mask of patches ``h`` (B, H, W, C) padded to whole windows (None unshifted)."""
    return blk.get_attn_mask(h) if getattr(blk, "dynamic_mask", False) else blk.attn_mask


def partition(blk: nn.Module, h: Tensor) -> Windows:
    """Normalised patches (B, H, W, C) as the block's windows (B·nW, M, C), image by image."""
    b, hh, ww, c = h.shape
    ws, shift = blk.window_size, blk.shift_size
    if any(shift):
        h = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h = (ws[0] - hh % ws[0]) % ws[0]
    pad_w = (ws[1] - ww % ws[1]) % ws[1]
    if pad_h or pad_w:  # F.pad copies even when it pads nothing
        h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h.shape[1], h.shape[2]
    windows = h.view(b, hp // ws[0], ws[0], wp // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(-1, ws[0] * ws[1], c)
    count = (hp // ws[0]) * (wp // ws[1])
    return Windows(windows, _mask(blk, h), count, (b, hh, ww, c), (hp, wp))


def reverse(blk: nn.Module, part: Windows, out: Tensor) -> Tensor:
    """Window outputs (B·nW, M, C) back to (B, H, W, C): merge, crop the padding, unshift."""
    b, hh, ww, _ = part.size
    hp, wp = part.padded
    ws, shift = blk.window_size, blk.shift_size
    c = out.shape[-1]
    x = out.view(b, hp // ws[0], wp // ws[1], ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, c)[:, :hh, :ww, :]
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x


def window_bias(blk: nn.Module, part: Windows, dtype: torch.dtype) -> Tensor:
    """The windows' relative-position bias plus the shift mask: (1, H, M, M) without a mask,
    else (nW, H, M, M), one per window of an image, which prompt_attention reads with period nW
    over the B·nW windows (stored image by image): never repeated per image."""
    rel = blk.attn._get_rel_pos_bias().to(dtype)
    if part.mask is None:
        return rel
    m = rel.shape[-1]
    return rel + part.mask.to(dtype).view(part.count, 1, m, m)


def constant_window_bias(blk: nn.Module, part: Windows, dtype: torch.dtype, name: str) -> Tensor:
    """:func:`window_bias` for the prompt attention op, which takes it as a constant: refused
    while the block's bias table trains (``name``: the block's, for the message)."""
    bias = window_bias(blk, part, dtype)
    if bias.requires_grad and torch.is_grad_enabled():
        raise TypeError(
            f"fastprompt: {name}.attn.relative_position_bias_table trains (requires_grad=True), "
            "but the fused Swin path hands the relative-position bias to the prompt attention "
            "op as a constant, which it does not differentiate; freeze it "
            "(requires_grad_(False)) or use impl='naive'"
        )
    return bias


def split_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (S, H, N, d) of tokens (S, N, C), as timm's ``WindowAttention`` splits them."""
    s, n, _ = x.shape
    packed = attn.qkv(x)
    d = packed.shape[-1] // 3 // attn.num_heads
    return packed.reshape(s, n, 3, attn.num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)


def window_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Attention of windows (S, H, M, d) under a bias, computed as the model's own
    ``WindowAttention`` computes it: PyTorch's fused attention when timm's ``fused_attn`` is on,
    else scores, bias, softmax and product written out, as timm does by default (its switch is
    experimental for Swin) and as the official VPT-Swin does."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return (((q * attn.scale) @ k.transpose(-2, -1)) + bias).softmax(-1) @ v
