"""Triton kernels for prompt attention: forward, and backward for q, image k/v and prompt k/v.

Numerics and launch configuration only (autograd and dispatch live in ``fastprompt.ops``).
Each program's key loop walks its sequence's prompt set first, read through ``prompt_index``
(batch stride 0 for the shared set: it is never expanded or copied), then the sequence's own keys,
with an online softmax in fp32 and base-2 exponentials. Prompt-key gradients are written per
sequence in fp32 and summed per set afterwards in a fixed order, so the backward is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _load_keys(base, offs_n, offs_d, s_n, s_d, n_valid, D: tl.constexpr):
    mask = (offs_n[:, None] < n_valid) & (offs_d[None, :] < D)
    return tl.load(base + offs_n[:, None] * s_n + offs_d[None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def _attend(
    q,
    k_base,
    v_base,
    s_kn,
    s_kd,
    s_vn,
    s_vd,
    n_valid,
    m_i,
    l_i,
    acc,
    qk_scale,
    offs_d,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax accumulation of q against keys/values [0, n_valid)."""
    for start in range(0, n_valid, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_keys(k_base, offs_n, offs_d, s_kn, s_kd, n_valid, D)
        v = _load_keys(v_base, offs_n, offs_d, s_vn, s_vd, n_valid, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(offs_n[None, :] < n_valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prompt_attention_fwd_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    IDX,
    LENS,
    OUT,
    LSE,
    s_qb,
    s_qh,
    s_qn,
    s_qd,
    s_kb,
    s_kh,
    s_kn,
    s_kd,
    s_vb,
    s_vh,
    s_vn,
    s_vd,
    s_pkt,
    s_pkh,
    s_pkn,
    s_pkd,
    s_pvt,
    s_pvh,
    s_pvn,
    s_pvd,
    s_ob,
    s_oh,
    s_on,
    s_od,
    H,
    N,
    P,
    qk_scale,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t = tl.load(IDX + b).to(tl.int64) if HAS_INDEX else 0
    plen = tl.load(LENS + t).to(tl.int32) if HAS_LENGTHS else P
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend(
        q,
        PK + t * s_pkt + h * s_pkh,
        PV + t * s_pvt + h * s_pvh,
        s_pkn,
        s_pkd,
        s_pvn,
        s_pvd,
        plen,
        m_i,
        l_i,
        acc,
        qk_scale,
        offs_d,
        BLOCK_N,
        D,
        PRECISION,
    )
    m_i, l_i, acc = _attend(
        q,
        K + b * s_kb + h * s_kh,
        V + b * s_vb + h * s_vh,
        s_kn,
        s_kd,
        s_vn,
        s_vd,
        N,
        m_i,
        l_i,
        acc,
        qk_scale,
        offs_d,
        BLOCK_N,
        D,
        PRECISION,
    )
    out = acc / l_i[:, None]
    o_ptrs = OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def _prompt_attention_bwd_kv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    IDX,
    LENS,
    DK,
    DV,
    UK,
    UV,
    TERMS,
    GATE,
    s_qb,
    s_qh,
    s_qn,
    s_qd,
    s_kb,
    s_kh,
    s_kn,
    s_kd,
    s_vb,
    s_vh,
    s_vn,
    s_vd,
    s_dob,
    s_doh,
    s_don,
    s_dod,
    s_dkb,
    s_dkh,
    s_dkn,
    s_dkd,
    s_us,
    s_ut,
    s_uh,
    s_up,
    s_ud,
    H,
    N,
    NK,
    BH,
    qk_scale,
    scale,
    PROMPTS: tl.constexpr,
    NUM_U: tl.constexpr,
    SCORES: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one block of keys of one sequence·head. With PROMPTS, the keys are the
    sequence's prompt set (K/V are the tables, K's batch stride is the set stride) and dK/dV are
    per-sequence fp32 partials; DK and DV share strides.

    With SCORES (prompt keys only), the epilogue also writes Prompt Condensation's terms while the
    per-sequence gradients are in registers: GATE (B, H, P) = Σ_queries dS, and for each of the
    NUM_U vectors u (UK/UV: (S, T, H, P, d), shared strides) TERMS (S, B, H, P) =
    Σ_d dK·u_k + dV·u_v. Heads are summed by the launcher."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if PROMPTS:
        t = tl.load(IDX + b).to(tl.int64) if HAS_INDEX else 0
        n_valid = tl.load(LENS + t).to(tl.int32) if HAS_LENGTHS else NK
    else:
        t = b
        n_valid = NK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_keys(K + t * s_kb + h * s_kh, offs_n, offs_d, s_kn, s_kd, n_valid, D)
    v = _load_keys(V + t * s_vb + h * s_vh, offs_n, offs_d, s_vn, s_vd, n_valid, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    gate = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N
        q = _load_keys(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_qn, s_qd, N, D)
        do = _load_keys(DO + b * s_dob + h * s_doh, offs_m, offs_d, s_don, s_dod, N, D)
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + pid_bh * N + offs_m, mask=m_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
        p = tl.where(m_mask[:, None] & (offs_n[None, :] < n_valid), p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SCORES:
            gate += tl.sum(ds, 0)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    if SCORES:
        n_mask = offs_n < n_valid
        tl.store(GATE + pid_bh * NK + offs_n, gate, mask=n_mask)
        for s_i in tl.static_range(NUM_U):
            u_base = s_i * s_us + t * s_ut + h * s_uh
            uk = _load_keys(UK + u_base, offs_n, offs_d, s_up, s_ud, n_valid, D).to(tl.float32)
            uv = _load_keys(UV + u_base, offs_n, offs_d, s_up, s_ud, n_valid, D).to(tl.float32)
            term = tl.sum(dk * uk + dv * uv, 1)
            tl.store(TERMS + (s_i * BH + pid_bh) * NK + offs_n, term, mask=n_mask)
    mask = (offs_n[:, None] < n_valid) & (offs_d[None, :] < D)
    ptrs = b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd
    # Rows past a prompt set's length stay zero (the buffers are zero-initialised).
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _prompt_attention_bwd_q_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    DO,
    LSE,
    DELTA,
    IDX,
    LENS,
    DQ,
    s_qb,
    s_qh,
    s_qn,
    s_qd,
    s_kb,
    s_kh,
    s_kn,
    s_kd,
    s_vb,
    s_vh,
    s_vn,
    s_vd,
    s_pkt,
    s_pkh,
    s_pkn,
    s_pkd,
    s_pvt,
    s_pvh,
    s_pvn,
    s_pvd,
    s_dob,
    s_doh,
    s_don,
    s_dod,
    s_dqb,
    s_dqh,
    s_dqn,
    s_dqd,
    H,
    N,
    P,
    qk_scale,
    scale,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t = tl.load(IDX + b).to(tl.int64) if HAS_INDEX else 0
    plen = tl.load(LENS + t).to(tl.int32) if HAS_LENGTHS else P
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    q = _load_keys(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_qn, s_qd, N, D)
    do = _load_keys(DO + b * s_dob + h * s_doh, offs_m, offs_d, s_don, s_dod, N, D)
    lse2 = tl.load(LSE + pid_bh * N + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * N + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_over(
        q,
        do,
        lse2,
        delta,
        dq,
        PK + t * s_pkt + h * s_pkh,
        PV + t * s_pvt + h * s_pvh,
        s_pkn,
        s_pkd,
        s_pvn,
        s_pvd,
        plen,
        qk_scale,
        offs_d,
        BLOCK_N,
        D,
        PRECISION,
    )
    dq = _dq_over(
        q,
        do,
        lse2,
        delta,
        dq,
        K + b * s_kb + h * s_kh,
        V + b * s_vb + h * s_vh,
        s_kn,
        s_kd,
        s_vn,
        s_vd,
        N,
        qk_scale,
        offs_d,
        BLOCK_N,
        D,
        PRECISION,
    )
    dq = dq * scale
    ptrs = DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqn + offs_d[None, :] * s_dqd
    tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dq_over(
    q,
    do,
    lse2,
    delta,
    dq,
    k_base,
    v_base,
    s_kn,
    s_kd,
    s_vn,
    s_vd,
    n_valid,
    qk_scale,
    offs_d,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    for start in range(0, n_valid, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_keys(k_base, offs_n, offs_d, s_kn, s_kd, n_valid, D)
        v = _load_keys(v_base, offs_n, offs_d, s_vn, s_vd, n_valid, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(offs_n[None, :] < n_valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


# ----------------------------------------------------------------------------------------------
# Launchers: allocate, choose the grid, launch. Nothing else.
# ----------------------------------------------------------------------------------------------


def _config(q: torch.Tensor) -> dict:
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return {
        "BLOCK_M": 64 if d <= 64 else 32,
        "BLOCK_N": 32,
        "BLOCK_D": block_d,
        "D": d,
        "PRECISION": precision,
    }


def _index_args(prompt_index, prompt_lengths, q):
    dummy = q.new_zeros(1, dtype=torch.int32)
    return (
        prompt_index if prompt_index is not None else dummy,
        prompt_lengths if prompt_lengths is not None else dummy,
        prompt_index is not None,
        prompt_lengths is not None,
    )


def prompt_attention_fwd_triton(q, k, v, pk, pv, prompt_index, prompt_lengths, scale):
    """Forward launcher: ``(out (B, H, N, d) stored as (B, N, H, d), lse (B, H, N) fp32)``."""
    b, h, n, _ = q.shape
    out = q.new_empty((b, n, h, q.shape[-1])).transpose(1, 2)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    idx, lens, has_idx, has_lens = _index_args(prompt_index, prompt_lengths, q)
    cfg = _config(q)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * h)
    _prompt_attention_fwd_kernel[grid](
        q,
        k,
        v,
        pk,
        pv,
        idx,
        lens,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *pk.stride(),
        *pv.stride(),
        *out.stride(),
        h,
        n,
        pk.shape[2],
        scale * _LOG2E,
        HAS_INDEX=has_idx,
        HAS_LENGTHS=has_lens,
        **cfg,
    )
    return out, lse


def prompt_attention_bwd_triton(
    dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale
):
    """Backward launcher: dq, dk, dv and per-sequence fp32 prompt gradients (B, H, P, d).

    The op sums the per-sequence prompt gradients per set (in a fixed order) afterwards.
    """
    return _bwd(dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, None, None)[
        :5
    ]


def prompt_attention_bwd_scores_triton(
    dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v
):
    """Backward launcher with the score epilogue: the five gradients of
    :func:`prompt_attention_bwd_triton`, then ``terms`` (S, B, P) and ``gate`` (B, P), fp32."""
    return _bwd(dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v)


def _bwd(dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v):
    b, h, n, d = q.shape
    p = pk.shape[2]
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    idx, lens, has_idx, has_lens = _index_args(prompt_index, prompt_lengths, q)
    cfg = _config(q)
    flags = {"HAS_INDEX": has_idx, "HAS_LENGTHS": has_lens, **cfg}
    dq = torch.empty_like(q)
    # Contiguous and alike: the kernel writes dK and dV with one set of strides.
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dpk = torch.zeros((b, h, p, d), device=q.device, dtype=torch.float32)
    dpv = torch.zeros_like(dpk)
    scores = u_k is not None
    if scores:
        u_k, u_v = u_k.contiguous(), u_v.contiguous()
        terms = torch.zeros((u_k.shape[0], b, h, p), device=q.device, dtype=torch.float32)
        gate = torch.zeros((b, h, p), device=q.device, dtype=torch.float32)
        u_strides = u_k.stride()
    else:
        u_k = u_v = terms = gate = dpk
        u_strides = (0, 0, 0, 0, 0)
    common = (*q.stride(),)
    _prompt_attention_bwd_kv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), b * h)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        idx,
        lens,
        dk,
        dv,
        dk,
        dv,
        dk,
        dk,
        *common,
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *dk.stride(),
        0,
        0,
        0,
        0,
        0,
        h,
        n,
        n,
        b * h,
        scale * _LOG2E,
        scale,
        PROMPTS=False,
        NUM_U=0,
        SCORES=False,
        **flags,
    )
    if p > 0:
        _prompt_attention_bwd_kv_kernel[(triton.cdiv(p, cfg["BLOCK_N"]), b * h)](
            q,
            pk,
            pv,
            dout,
            lse,
            delta,
            idx,
            lens,
            dpk,
            dpv,
            u_k,
            u_v,
            terms,
            gate,
            *common,
            *pk.stride(),
            *pv.stride(),
            *dout.stride(),
            *dpk.stride(),
            *u_strides,
            h,
            n,
            p,
            b * h,
            scale * _LOG2E,
            scale,
            PROMPTS=True,
            NUM_U=u_k.shape[0] if scores else 0,
            SCORES=scores,
            **flags,
        )
    _prompt_attention_bwd_q_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), b * h)](
        q,
        k,
        v,
        pk,
        pv,
        dout,
        lse,
        delta,
        idx,
        lens,
        dq,
        *common,
        *k.stride(),
        *v.stride(),
        *pk.stride(),
        *pv.stride(),
        *dout.stride(),
        *dq.stride(),
        h,
        n,
        p,
        scale * _LOG2E,
        scale,
        **flags,
    )
    if scores:
        return dq, dk, dv, dpk, dpv, terms.sum(2), gate.sum(1)
    return dq, dk, dv, dpk, dpv, None, None
