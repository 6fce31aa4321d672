"""Triton prompt attention, forward: image queries attend to their prompt set, then their own keys.

Numerics and launch configuration only (autograd and dispatch live in ``fastprompt.ops``).
A program owns ``BLOCK_M`` queries of one (sequence, head) and walks the sequence's prompt set
(read through ``prompt_index``; the shared set is never expanded or copied), then the sequence's
own keys, with an online softmax in fp32 and base-2 exponentials. The grid is one-dimensional
(sequence·head major, query block minor), so B·H is not capped at 65,535 and the query blocks of a
head run side by side, sharing its keys in L2. Only each key range's last block is masked; the
scale is folded into the exponent (one FMA per score).

The backward is in :mod:`fastprompt.kernels.triton.prompt_attention_backward`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastprompt.kernels.triton import _tuning
from fastprompt.kernels.triton._common import (
    LN2_C,
    LOG2E,
    Launch,
    empty_heads_last,
    fits_int32,
    load_tile,
    prompt_set,
)

__all__ = [
    "prompt_attention_fwd",
]


@triton.jit
def _fwd_block(
    acc0,
    acc1,
    m_i,
    l_i,
    q0,
    q1,
    k_base,
    v_base,
    s_kn,
    s_kd,
    s_vn,
    s_vd,
    start,
    n_valid,
    qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    NEG_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs = start + tl.arange(0, BLOCK_N)
    k0 = load_tile(k_base, offs, s_kn, s_kd, n_valid, 0, D0, MASKED)
    s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
    if D1 > 0:
        k1 = load_tile(k_base, offs, s_kn, s_kd, n_valid, D0, D1, MASKED)
        s = tl.dot(q1, tl.trans(k1), acc=s, input_precision=PRECISION)
    if MASKED:
        s = tl.where(offs[None, :] < n_valid, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        # max(c·s) = c·max(s) for c >= 0 (c·min(s) otherwise), so the scale costs one FMA below
        if NEG_SCALE:
            m_new = tl.maximum(m_i, tl.min(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = load_tile(v_base, offs, s_vn, s_vd, n_valid, 0, D0, MASKED)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc=acc0 * alpha[:, None], input_precision=PRECISION)
    if D1 > 0:
        v1 = load_tile(v_base, offs, s_vn, s_vd, n_valid, D0, D1, MASKED)
        acc1 = tl.dot(p, v1, acc=acc1 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _fwd_keys(
    acc0,
    acc1,
    m_i,
    l_i,
    q0,
    q1,
    k_base,
    v_base,
    s_kn,
    s_kd,
    s_vn,
    s_vd,
    n_valid,
    qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEG_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Keys [0, n_valid): full blocks unmasked, then the partial last block, if any, masked."""
    n_full = (n_valid // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _fwd_block(
            acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, s_kn, s_kd, s_vn, s_vd, start,
            n_valid, qk_scale, D0, D1, BLOCK_N, False, NEG_SCALE, PRECISION,
        )  # fmt: skip
    if n_full < n_valid:
        acc0, acc1, m_i, l_i = _fwd_block(
            acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, s_kn, s_kd, s_vn, s_vd, n_full,
            n_valid, qk_scale, D0, D1, BLOCK_N, True, NEG_SCALE, PRECISION,
        )  # fmt: skip
    return acc0, acc1, m_i, l_i


@triton.jit(do_not_specialize=["P_BUCKET", "N_BUCKET", "K_BUCKET", "ARCH"])
def _prompt_attention_fwd_kernel(
    Q, K, V, PK, PV, IDX, LENS, OUT, LSE,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    s_ob, s_oh, s_on, s_od,
    H, N_Q, N_K, P, T, qk_scale, P_BUCKET, N_BUCKET, K_BUCKET, ARCH,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    NEG_SCALE: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(N_Q, BLOCK_M)
    bh = pid // num_m
    b = bh // H
    h = bh % H
    t, plen, bad = prompt_set(IDX, LENS, b, T, P, HAS_INDEX, HAS_LENGTHS)
    rows = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = Q + b.to(tl.int64) * s_qb + h * s_qh
    q0 = load_tile(q_base, rows, s_qn, s_qd, N_Q, 0, D0, True)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    if D1 > 0:
        q1 = load_tile(q_base, rows, s_qn, s_qd, N_Q, D0, D1, True)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    else:
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0, acc1, m_i, l_i = _fwd_keys(
        acc0, acc1, m_i, l_i, q0, q1,
        PK + t * s_pkt + h * s_pkh, PV + t * s_pvt + h * s_pvh,
        s_pkn, s_pkd, s_pvn, s_pvd, plen, qk_scale, D0, D1, BLOCK_N, NEG_SCALE, PRECISION,
    )  # fmt: skip
    acc0, acc1, m_i, l_i = _fwd_keys(
        acc0, acc1, m_i, l_i, q0, q1,
        K + b.to(tl.int64) * s_kb + h * s_kh, V + b.to(tl.int64) * s_vb + h * s_vh,
        s_kn, s_kd, s_vn, s_vd, N_K, qk_scale, D0, D1, BLOCK_N, NEG_SCALE, PRECISION,
    )  # fmt: skip
    # A query without keys (no image key and no valid prompt key) gets 0 and -inf.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2_C, float("-inf"))
    lse = tl.where(bad, float("nan"), lse)
    inv = tl.where(bad, float("nan"), 1.0 / l_safe)
    o_base = OUT + b.to(tl.int64) * s_ob + h * s_oh
    cols0 = tl.arange(0, D0)
    row_ok = rows[:, None] < N_Q
    o_ptrs = o_base + rows[:, None] * s_on + cols0[None, :] * s_od
    tl.store(o_ptrs, (acc0 * inv[:, None]).to(OUT.dtype.element_ty), mask=row_ok)
    if D1 > 0:
        cols1 = D0 + tl.arange(0, D1)
        o_ptrs = o_base + rows[:, None] * s_on + cols1[None, :] * s_od
        tl.store(o_ptrs, (acc1 * inv[:, None]).to(OUT.dtype.element_ty), mask=row_ok)
    tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse, mask=rows < N_Q)


_fwd_tuned = _tuning.autotuned("fwd", _prompt_attention_fwd_kernel)


def fwd_plan(q, k, v, pk, pv, prompt_index, prompt_lengths, scale):
    """Outputs and the launch plan of the forward (nothing is launched)."""
    b, h, n, _ = q.shape
    t, _, p, _ = pk.shape
    q, k, v, pk, pv = (
        fits_int32(x, name) for x, name in zip((q, k, v, pk, pv), ("q", "k", "v", "pk", "pv"))
    )
    out = empty_heads_last(q)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse, []
    (idx, lens), meta = _tuning.common_meta(q, pk, scale, prompt_index, prompt_lengths)
    qk_scale = scale * LOG2E
    args = (
        q, k, v, pk, pv, idx, lens, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), *out.stride(),
        h, n, k.shape[2], p, t, qk_scale, *_tuning.key_args(q, k, pk),
    )  # fmt: skip
    meta["NEG_SCALE"] = qk_scale < 0

    def grid(m):
        return (b * h * triton.cdiv(n, m["BLOCK_M"]),)

    return out, lse, [Launch(_fwd_tuned, grid, args, meta, role="fwd")]


def prompt_attention_fwd(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale):
    """Prompt attention forward on Triton.

    Parameters
    ----------
    q : Tensor, shape (B, H, N_q, d), float16/bfloat16/float32
        Image queries, any strides (timm passes views of a (B, N, 3, H, d) buffer).
    k, v : Tensor, shape (B, H, N_k, d)
        Image keys and values, any strides; N_k may differ from N_q (0 included).
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
        Prompt sets, any strides; T = 1 is the shared set and is never expanded.
    prompt_index : Tensor, shape (B,), int32/int64, or None
        Set of each sequence (None: set 0). Out-of-range values give NaN outputs for that
        sequence (the op is expected to reject them first).
    prompt_lengths : Tensor, shape (T,), int, or None
        Valid keys per set (None: all P).
    scale : float
        Score scale.

    Returns
    -------
    out : Tensor, shape (B, H, N_q, d), q.dtype
        Stored as (B, N_q, H, d): ``out.transpose(1, 2)`` is contiguous.
    lse : Tensor, shape (B, H, N_q), float32, contiguous
        Natural-log log-sum-exp of each query's scaled scores.
    """
    out, lse, plan = fwd_plan(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale)
    _tuning.run(plan, q)
    return out, lse
