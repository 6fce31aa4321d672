"""Triton prompt attention, backward: the dQ kernel.

A program owns ``BLOCK_M`` queries of one (sequence, head) and walks the prompt keys, then the
image keys (only each range's last block masked). Launched by
:mod:`fastprompt.kernels.triton.prompt_attention_backward`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastprompt.kernels.triton import _tuning
from fastprompt.kernels.triton._common import LOG2E_C, load_tile, prompt_set, store_rows


@triton.jit
def _dq_block(
    dq0, dq1, q0, q1, do0, do1, lse2, delta,
    k_base, v_base, s_kn, s_kd, s_vn, s_vd, start, n_valid,
    qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    keys = start + tl.arange(0, BLOCK_N)
    k0 = load_tile(k_base, keys, s_kn, s_kd, n_valid, 0, D0, MASKED)
    v0 = load_tile(v_base, keys, s_vn, s_vd, n_valid, 0, D0, MASKED)
    s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
    dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
    if D1 > 0:
        k1 = load_tile(k_base, keys, s_kn, s_kd, n_valid, D0, D1, MASKED)
        v1 = load_tile(v_base, keys, s_vn, s_vd, n_valid, D0, D1, MASKED)
        s = tl.dot(q1, tl.trans(k1), acc=s, input_precision=PRECISION)
        dp = tl.dot(do1, tl.trans(v1), acc=dp, input_precision=PRECISION)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(keys[None, :] < n_valid, p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = tl.dot(ds, k0, acc=dq0, input_precision=PRECISION)
    if D1 > 0:
        dq1 = tl.dot(ds, k1, acc=dq1, input_precision=PRECISION)
    return dq0, dq1


@triton.jit
def _dq_keys(
    dq0, dq1, q0, q1, do0, do1, lse2, delta,
    k_base, v_base, s_kn, s_kd, s_vn, s_vd, n_valid,
    qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    n_full = (n_valid // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        dq0, dq1 = _dq_block(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
            start, n_valid, qk_scale, D0, D1, BLOCK_N, False, PRECISION,
        )  # fmt: skip
    if n_full < n_valid:
        dq0, dq1 = _dq_block(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
            n_full, n_valid, qk_scale, D0, D1, BLOCK_N, True, PRECISION,
        )  # fmt: skip
    return dq0, dq1


@triton.jit(do_not_specialize=["P_BUCKET", "N_BUCKET", "K_BUCKET", "ARCH"])
def _prompt_attention_bwd_dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, IDX, LENS, DQ,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    s_dob, s_doh, s_don, s_dod,
    s_dqb, s_dqh, s_dqn, s_dqd,
    H, N_Q, N_K, P, T, qk_scale, scale, P_BUCKET, N_BUCKET, K_BUCKET, ARCH,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
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
    b64 = b.to(tl.int64)
    t, plen, bad = prompt_set(IDX, LENS, b, T, P, HAS_INDEX, HAS_LENGTHS)
    rows = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = Q + b64 * s_qb + h * s_qh
    do_base = DO + b64 * s_dob + h * s_doh
    q0 = load_tile(q_base, rows, s_qn, s_qd, N_Q, 0, D0, True)
    do0 = load_tile(do_base, rows, s_don, s_dod, N_Q, 0, D0, True)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    if D1 > 0:
        q1 = load_tile(q_base, rows, s_qn, s_qd, N_Q, D0, D1, True)
        do1 = load_tile(do_base, rows, s_don, s_dod, N_Q, D0, D1, True)
        dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    else:
        q1, do1, dq1 = q0, do0, dq0
    row_ok = rows < N_Q
    lse2 = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0)
    dq0, dq1 = _dq_keys(
        dq0, dq1, q0, q1, do0, do1, lse2, delta,
        PK + t * s_pkt + h * s_pkh, PV + t * s_pvt + h * s_pvh, s_pkn, s_pkd, s_pvn, s_pvd,
        plen, qk_scale, D0, D1, BLOCK_N, PRECISION,
    )  # fmt: skip
    dq0, dq1 = _dq_keys(
        dq0, dq1, q0, q1, do0, do1, lse2, delta,
        K + b64 * s_kb + h * s_kh, V + b64 * s_vb + h * s_vh, s_kn, s_kd, s_vn, s_vd,
        N_K, qk_scale, D0, D1, BLOCK_N, PRECISION,
    )  # fmt: skip
    factor = tl.where(bad, float("nan"), scale)
    dq_base = DQ + b64 * s_dqb + h * s_dqh
    ty = DQ.dtype.element_ty
    store_rows(dq_base, rows, s_dqn, s_dqd, (dq0 * factor).to(ty), row_ok, 0, D0)
    if D1 > 0:
        store_rows(dq_base, rows, s_dqn, s_dqd, (dq1 * factor).to(ty), row_ok, D0, D1)


dq_tuned = _tuning.autotuned("dq", _prompt_attention_bwd_dq_kernel)
