"""A Swin block's windows: partition gives timm's roll, pad and partition bit for bit (skipping a
pad of nothing), forward and backward, and reverse undoes it."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_swin

from fastprompt.backbones.swin_windows import partition, reverse


def _timm_windows(blk, h):
    """timm's own ``_attn`` layout, written out: roll by -shift, pad, partition."""
    b, hh, ww, c = h.shape
    ws, shift = blk.window_size, blk.shift_size
    x = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else h
    x = torch.nn.functional.pad(x, (0, 0, 0, (-ww) % ws[1], 0, (-hh) % ws[0]))
    hp, wp = x.shape[1:3]
    x = x.view(b, hp // ws[0], ws[0], wp // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws[0] * ws[1], c)


@pytest.mark.parametrize("size", [32, 36], ids=["whole windows", "padded"])
@pytest.mark.parametrize("block", [0, 1, 3], ids=["unshifted", "shifted", "stage 1 shifted"])
def test_partition_is_timms_partition(block, size):
    model = tiny_swin(img_size=size)
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    blk = blocks[block]
    res = blk.input_resolution if hasattr(blk, "input_resolution") else None
    hh, ww = res if res is not None else (size // 2, size // 2)
    c = blk.norm1.normalized_shape[0]
    h = torch.randn(2, hh, ww, c, dtype=torch.float64, requires_grad=True)
    expected = _timm_windows(blk, h)
    part = partition(blk, h)
    assert torch.equal(part.windows, expected)
    assert part.count * h.shape[0] == part.windows.shape[0]
    g = torch.randn_like(expected)
    (got,) = torch.autograd.grad(part.windows, h, g)
    (ref,) = torch.autograd.grad(expected, h, g)
    assert torch.equal(got, ref)
    # The way back: reverse(partition(h)) is h, and its gradient the identity's.
    out = reverse(blk, part, part.windows)
    assert torch.equal(out, h)
    (back,) = torch.autograd.grad(out, h, torch.ones_like(out))
    assert torch.equal(back, torch.ones_like(h))


def test_reverse_takes_window_outputs_of_any_strides():
    blk = tiny_swin().layers[0].blocks[1]
    h = torch.randn(2, 16, 16, blk.norm1.normalized_shape[0])
    part = partition(blk, h)
    strided = part.windows.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(reverse(blk, part, strided), h)


def test_vmap_over_the_fused_swin_gives_the_batched_logits():
    import fastprompt

    prompted = fastprompt.vpt(tiny_swin(), 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = torch.func.vmap(lambda xi: prompted(xi[None]))(x)[:, 0]
        assert torch.equal(got, prompted(x))
