"""Triton prompt attention, backward: the untuned kernels around dK/dV and dQ.

Δ = rowsum(dO ∘ O) before them (``bwd_preprocess_kernel``), and after them each set's prompt
gradient as the sum of its sequences' fp32 gradients in increasing sequence order (plain fp32
adds: no TF32, bitwise reproducible). The sequences of a set come from a stable sort of
``prompt_index``; T = B (a set per sequence) is a copy, not a product with an identity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastprompt.kernels.triton._common import Launch, load_tile

PRE_BLOCK, _REDUCE_BLOCK = 64, 1024


@triton.jit
def bwd_preprocess_kernel(
    OUT, DO, DELTA,
    s_ob, s_oh, s_on, s_od,
    s_dob, s_doh, s_don, s_dod,
    H, N,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_base = OUT + b * s_ob + h * s_oh
    do_base = DO + b * s_dob + h * s_doh
    o = load_tile(o_base, rows, s_on, s_od, N, 0, D0, True).to(tl.float32)
    do = load_tile(do_base, rows, s_don, s_dod, N, 0, D0, True).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if D1 > 0:
        o = load_tile(o_base, rows, s_on, s_od, N, D0, D1, True).to(tl.float32)
        do = load_tile(do_base, rows, s_don, s_dod, N, D0, D1, True).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@triton.jit
def _prompt_grad_reduce_kernel(
    DPK, DPV, ORDER, STARTS, OUTK, OUTV, ROW, B,
    HAS_INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """OUT[t] = Σ DP[b] over the sequences b of set t, in increasing b (ORDER: a stable argsort of
    the index, STARTS: each set's first position in it). Rows are ROW = H·P·d fp32 values."""
    pid = tl.program_id(0)
    chunks = tl.cdiv(ROW, BLOCK)
    t = (pid // chunks).to(tl.int64)
    offs = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < ROW
    if HAS_INDEX:
        lo = tl.load(STARTS + t).to(tl.int32)
        hi = tl.load(STARTS + t + 1).to(tl.int32)
    else:  # every sequence uses set 0
        lo = 0
        hi = tl.where(t == 0, B, 0)
    acc_k = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    for i in range(lo, hi):
        if HAS_INDEX:
            src = tl.load(ORDER + i).to(tl.int64) * ROW
        else:
            src = (t * 0 + i) * ROW  # int64 (t is), also where i is a Python int
        acc_k += tl.load(DPK + src + offs, mask=mask, other=0.0)
        acc_v += tl.load(DPV + src + offs, mask=mask, other=0.0)
    tl.store(OUTK + t * ROW + offs, acc_k, mask=mask)
    tl.store(OUTV + t * ROW + offs, acc_v, mask=mask)


def reduce_plan(dpk, dpv, prompt_index, num_sets):
    """Per-set fp32 sums of prompt-gradient partials (R, H, P, d) → (T, H, P, d): R = B rows,
    one per sequence, with ``prompt_index``; without it, R rows all of set 0."""
    b, h, p, d = dpk.shape
    outk = torch.empty((num_sets, h, p, d), device=dpk.device, dtype=torch.float32)
    outv = torch.empty_like(outk)
    row = h * p * d
    if row == 0:
        return outk, outv, []
    if prompt_index is None:
        order = starts = dpk  # unused pointers
    else:
        # A stable sort lists each set's sequences in increasing order: a fixed summation order.
        sorted_index, order = torch.sort(prompt_index, stable=True)
        bounds = torch.arange(num_sets + 1, device=dpk.device, dtype=sorted_index.dtype)
        starts = torch.searchsorted(sorted_index, bounds)
    launch = Launch(
        _prompt_grad_reduce_kernel,
        (num_sets * triton.cdiv(row, _REDUCE_BLOCK),),
        (dpk, dpv, order, starts, outk, outv, row, b),
        {"HAS_INDEX": prompt_index is not None, "BLOCK": _REDUCE_BLOCK, "num_warps": 4},
        role="reduce",
    )
    return outk, outv, [launch]
