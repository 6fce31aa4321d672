"""A Swin block's windows: the shifted-window partition of its patches, the way back, and the
windows' attention bias (``docs/design.md`` §4, "Swin").

timm's ``SwinTransformerBlock._attn`` rolls the patches, pads them to whole windows and partitions
them (a roll, a pad and a permuted copy: three copies, each with a copy in the backward), then
undoes it on the attention's output. :func:`partition` does the same for the official path
(``reorder=False``). Where no padding is needed (the usual case: 224 px, window 7), a shifted
partition is a fixed permutation of the image's tokens, and ``reorder=True`` applies it as one
gather, whose backward is one gather by the inverse permutation: the same numbers (a permutation
moves values, it rounds nothing) with one copy where timm makes three. The fused block uses it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastprompt._compat import tracing

__all__ = ["Windows", "partition", "reverse", "window_attention", "window_bias"]


class Windows(NamedTuple):
    """A block's window partition of normalised patches, as timm's ``SwinTransformerBlock._attn``
    makes it: (B·nW, M, C) windows, image by image, and how to put them back."""

    windows: Tensor
    mask: Tensor | None
    count: int  # windows per image
    size: tuple[int, int, int, int]  # B, H, W, C of the patches
    padded: tuple[int, int]  # H, W after padding to whole windows
    # The token permutation (order, inverse) when the partition was one gather, else None.
    orders: tuple[Tensor, Tensor] | None = None


class _Reorder(torch.autograd.Function):
    """Tokens (B, N, C) gathered along N by a permutation: ``x[:, order]``. Its backward gathers
    the gradient by the inverse permutation (index_select's own backward zero-fills a buffer and
    scatters into it: two passes)."""

    generate_vmap_rule = True  # torch.func.vmap over the model: index_select batches itself

    @staticmethod
    def forward(x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        return x.index_select(1, order)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, order, inverse = inputs
        ctx.order, ctx.inverse = order, inverse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _Reorder.apply(grad, ctx.inverse, ctx.order), None, None


# (H, W, window, shift, device) -> (order, inverse); a handful of entries per model.
_ORDERS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _orders(
    hw: tuple[int, int], ws: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Where each partitioned token comes from (``order``: windows image by image, tokens row by
    row in a window, of the patches rolled by -shift) and its inverse, for patches of size ``hw``
    that are whole windows."""
    key = (hw, ws, shift, device)
    # A trace, a dispatch mode (FakeTensorMode: fake tensors) and a CUDA graph capture (its
    # kernels run only at replay) make tensors this cache cannot keep or hand out.
    traced = (
        tracing()
        or _get_current_dispatch_mode() is not None
        or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    )
    hit = None if traced else _ORDERS.get(key)
    if hit is not None:
        return hit
    h, w = hw
    with torch.inference_mode(False):  # saved by the backward of every later forward
        grid = torch.arange(h * w, device=device).view(h, w)
        grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(0, 1))
        order = grid.view(h // ws[0], ws[0], w // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(h * w, device=device)
    if not traced:
        if len(_ORDERS) >= 64:
            _ORDERS.clear()
        _ORDERS[key] = (order, inverse)
    return order, inverse


def _mask(blk: nn.Module, h: Tensor) -> Tensor | None:
    """The shift mask of patches ``h`` (B, H, W, C) padded to whole windows (None unshifted)."""
    return blk.get_attn_mask(h) if getattr(blk, "dynamic_mask", False) else blk.attn_mask


def partition(blk: nn.Module, h: Tensor, reorder: bool = False) -> Windows:
    """Normalised patches (B, H, W, C) as the block's windows (B·nW, M, C).

    ``reorder``: one gather instead of roll, pad and partition, where no padding is needed
    (the same numbers; see the module docstring).
    """
    b, hh, ww, c = h.shape
    ws, shift = tuple(blk.window_size), tuple(blk.shift_size)
    pad_h = (ws[0] - hh % ws[0]) % ws[0]
    pad_w = (ws[1] - ww % ws[1]) % ws[1]
    if reorder and not (pad_h or pad_w):
        orders = _orders((hh, ww), ws, shift, h.device)
        windows = _Reorder.apply(h.flatten(1, 2), *orders).view(-1, ws[0] * ws[1], c)
        count = (hh // ws[0]) * (ww // ws[1])
        return Windows(windows, _mask(blk, h), count, (b, hh, ww, c), (hh, ww), orders)
    if any(shift):
        h = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(1, 2))
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
    if part.orders is not None:
        order, inverse = part.orders
        return _Reorder.apply(out.reshape(b, -1, c), inverse, order).view(b, hh, ww, c)
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


def window_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Attention of windows (S, H, M, d) under a bias, computed as the model's own
    ``WindowAttention`` computes it: PyTorch's fused attention when timm's ``fused_attn`` is on,
    else scores, bias, softmax and product written out, as timm does by default (its switch is
    experimental for Swin) and as the official VPT-Swin does."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return (((q * attn.scale) @ k.transpose(-2, -1)) + bias).softmax(-1) @ v
