"""Merging the prompt part and the image part by log-sum-exp.

``lse = logaddexp(lse_p, lse_i)``, ``out = e^(lse_p - lse) o_p + e^(lse_i - lse) o_i``, in fp32,
written into the (B, N, H, d) output storage; a row without any key gets ``out = 0``,
``lse = -inf``. On CUDA one Triton kernel does it in a single pass over the two partial outputs
(an elementwise merge in eager PyTorch takes several passes over fp32 temporaries, as much memory
traffic as the attention itself at ViT shapes); elsewhere, and if that kernel cannot run, the same
arithmetic in PyTorch (:func:`merge_torch`). Tests run both, the kernel in Triton's interpreter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastprompt._warnings import warn_at_caller

__all__ = ["merge", "merge_torch", "merge_triton"]


def merge_torch(o_p: Tensor, lse_p: Tensor, o_i: Tensor, lse_i: Tensor, out: Tensor) -> Tensor:
    """The merge in PyTorch: writes ``out`` (B, H, N, d) and returns lse (B, H, N)."""
    acc = torch.float64 if lse_p.dtype == torch.float64 else torch.float32
    lse_p, lse_i = lse_p.to(acc), lse_i.to(acc)
    lse = torch.logaddexp(lse_p, lse_i)
    empty = torch.isneginf(lse)
    zero = torch.zeros((), dtype=acc, device=lse.device)
    w_p = torch.where(empty, zero, torch.exp(lse_p - lse)).unsqueeze(-1)
    w_i = torch.where(empty, zero, torch.exp(lse_i - lse)).unsqueeze(-1)
    out.copy_(o_p.to(acc) * w_p + o_i.to(acc) * w_i)
    return lse


_KERNEL: list = []


def _kernel():
    if _KERNEL:
        return _KERNEL[0]
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(
        OP,
        OI,
        OUT,
        LP,
        LI,
        LSE,
        rows,
        H,
        N,
        sp_b,
        sp_h,
        sp_n,
        si_b,
        si_h,
        si_n,
        so_b,
        so_h,
        so_n,
        lp_b,
        lp_h,
        lp_n,
        li_b,
        li_h,
        li_n,
        D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # 64-bit rows: every offset below is a product with them, and a GPU holds outputs of
        # more than 2^31 elements (B·N·H·d = 2.4·10^9 for ViT-L at N 577, batch 4096).
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = row < rows
        b = row // (H * N)
        h = (row // N) % H
        n = row % N
        cols = tl.arange(0, BLOCK_D)
        lp = tl.load(LP + b * lp_b + h * lp_h + n * lp_n, mask=live, other=float("-inf"))
        li = tl.load(LI + b * li_b + h * li_h + n * li_n, mask=live, other=float("-inf"))
        lp, li = lp.to(tl.float32), li.to(tl.float32)
        m = tl.maximum(lp, li)
        empty = m == float("-inf")
        m_safe = tl.where(empty, 0.0, m)
        ep, ei = tl.exp(lp - m_safe), tl.exp(li - m_safe)
        total = tl.where(empty, 1.0, ep + ei)
        lse = tl.where(empty, float("-inf"), m_safe + tl.log(total))
        w_p = tl.where(empty, 0.0, ep / total)
        w_i = tl.where(empty, 0.0, ei / total)
        mask = live[:, None] & (cols[None, :] < D)
        op = tl.load(
            OP + (b * sp_b + h * sp_h + n * sp_n)[:, None] + cols[None, :], mask=mask, other=0.0
        )
        oi = tl.load(
            OI + (b * si_b + h * si_h + n * si_n)[:, None] + cols[None, :], mask=mask, other=0.0
        )
        merged = op.to(tl.float32) * w_p[:, None] + oi.to(tl.float32) * w_i[:, None]
        tl.store(
            OUT + (b * so_b + h * so_h + n * so_n)[:, None] + cols[None, :],
            merged.to(OUT.dtype.element_ty),
            mask=mask,
        )
        tl.store(LSE + row, lse, mask=live)

    _KERNEL.append(merge_kernel)
    return merge_kernel


def merge_triton(o_p: Tensor, lse_p: Tensor, o_i: Tensor, lse_i: Tensor, out: Tensor) -> Tensor:
    """:func:`merge_torch` as one Triton kernel (fp32 lse; rows of o_p, o_i, out unit-stride)."""
    import triton

    b, h, n, d = out.shape
    for t in (o_p, o_i, out):
        if t.stride(-1) != 1:
            raise ValueError("merge_triton: the head dim must be unit-stride")
    lse = torch.empty((b, h, n), dtype=torch.float32, device=out.device)
    rows = b * h * n
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(rows, block_r),)
    _kernel()[grid](
        o_p,
        o_i,
        out,
        lse_p,
        lse_i,
        lse,
        rows,
        h,
        n,
        *o_p.stride()[:3],
        *o_i.stride()[:3],
        *out.stride()[:3],
        *lse_p.stride(),
        *lse_i.stride(),
        D=d,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return lse


_BROKEN: list[str] = []


def merge(o_p: Tensor, lse_p: Tensor, o_i: Tensor, lse_i: Tensor, out: Tensor) -> Tensor:
    """Merge into ``out`` and return the lse: Triton on CUDA (once it has run), else PyTorch."""
    if out.device.type != "cuda" or lse_p.dtype == torch.float64 or _BROKEN:
        return merge_torch(o_p, lse_p, o_i, lse_i, out)
    try:
        return merge_triton(o_p, lse_p, o_i, lse_i, out)
    except Exception as e:  # no Triton, or it cannot compile here: say so once, then PyTorch
        _BROKEN.append(f"{type(e).__name__}: {e}")
        warn_at_caller(
            f"fastprompt: the cascade's Triton merge kernel cannot run here ({_BROKEN[0]}); "
            "merging in PyTorch (more memory traffic)",
            RuntimeWarning,
        )
        return merge_torch(o_p, lse_p, o_i, lse_i, out)
