"""Triton prompt attention, backward: dq, image dk/dv, and prompt dk/dv per set, deterministic.

Four launches, no atomics, no zero-filled buffers:

1. ``_bwd_preprocess_kernel``: Δ = rowsum(dO ∘ O) in fp32, one read of dO and O.
2. ``_prompt_attention_bwd_dkdv_kernel``: a program owns ``BLOCK_N`` keys of one (sequence, head)
   -- a block of the sequence's prompt set or of its own keys, both in the one launch -- and walks
   the sequence's queries. Image keys get dk/dv in q.dtype; prompt keys get the sequence's fp32
   gradient in a per-sequence buffer that is written everywhere (zeros past a set's length), with
   Prompt Condensation's per-(sequence, prompt) terms and gate computed from it on the spot when
   asked (``SCORES``).
3. ``_prompt_attention_bwd_dq_kernel``: a program owns ``BLOCK_M`` queries and walks the prompt
   keys, then the image keys (only each range's last block masked).
4. ``_prompt_grad_reduce_kernel``: each set's prompt gradient is the sum of its sequences' fp32
   gradients in increasing sequence order (plain fp32 adds: no TF32, bitwise reproducible). The
   sequences of a set come from a stable sort of ``prompt_index``; T = B (a set per sequence) is a
   copy, not a product with an identity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastprompt.kernels.triton import _tuning
from fastprompt.kernels.triton._common import LOG2E, LOG2E_C, Launch, bucket, load_tile, prompt_set

__all__ = [
    "prompt_attention_bwd",
    "prompt_attention_bwd_per_sequence",
    "prompt_attention_bwd_scored",
]

_PRE_BLOCK, _REDUCE_BLOCK = 64, 1024


@triton.jit
def _bwd_preprocess_kernel(
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
def _dkdv_step(
    dk0, dk1, dv0, dv1, gate,
    k0, k1, v0, v1,
    q_base, do_base, lse_base, delta_base,
    s_qn, s_qd, s_don, s_dod,
    start, N, qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    SCORES: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    rows = start + tl.arange(0, BLOCK_M)
    q0 = load_tile(q_base, rows, s_qn, s_qd, N, 0, D0, MASKED)
    do0 = load_tile(do_base, rows, s_don, s_dod, N, 0, D0, MASKED)
    if MASKED:
        # lse = +inf makes the probabilities of padded queries exactly 0: no select needed
        lse = tl.load(lse_base + rows, mask=rows < N, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < N, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    # Transposed scores (keys × queries): the accumulating dots below have the keys on M.
    s_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)
    if D1 > 0:
        q1 = load_tile(q_base, rows, s_qn, s_qd, N, D0, D1, MASKED)
        s_t = tl.dot(k1, tl.trans(q1), acc=s_t, input_precision=PRECISION)
    p_t = tl.exp2(s_t * qk_scale - (lse * LOG2E_C)[None, :])
    dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
    if D1 > 0:
        do1 = load_tile(do_base, rows, s_don, s_dod, N, D0, D1, MASKED)
        dp_t = tl.dot(v1, tl.trans(do1), acc=dp_t, input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if SCORES:
        gate += tl.sum(ds_t, 1)
    p_t = p_t.to(do0.dtype)
    ds_t = ds_t.to(q0.dtype)
    dv0 = tl.dot(p_t, do0, acc=dv0, input_precision=PRECISION)
    dk0 = tl.dot(ds_t, q0, acc=dk0, input_precision=PRECISION)
    if D1 > 0:
        dv1 = tl.dot(p_t, do1, acc=dv1, input_precision=PRECISION)
        dk1 = tl.dot(ds_t, q1, acc=dk1, input_precision=PRECISION)
    return dk0, dk1, dv0, dv1, gate


@triton.jit
def _dkdv_queries(
    dk0, dk1, dv0, dv1, gate, k0, k1, v0, v1, has_work,
    Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod,
    b_first, b_end, h, H, N, qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SCORES: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate the queries of sequences [b_first, b_end) into a key block's dK (unscaled), dV
    and Σ_queries dS. One flat loop over every (sequence, full query block), software-pipelined
    like a single sequence's, then one over the sequences' partial last blocks (masked).

    Keys past their valid range read as 0; their rows come out as garbage and the caller masks
    them (every dot here is row-local in the keys, so they never reach a valid row)."""
    per_seq = N // BLOCK_M
    n_seq = tl.where(has_work, b_end - b_first, 0)
    zero = (b_first * 0).to(tl.int64)
    for i in range(0, n_seq * per_seq):
        b = zero + b_first + i // per_seq
        row = (b * H + h) * N
        dk0, dk1, dv0, dv1, gate = _dkdv_step(
            dk0, dk1, dv0, dv1, gate, k0, k1, v0, v1, Q + b * s_qb + h * s_qh,
            DO + b * s_dob + h * s_doh, LSE + row, DELTA + row, s_qn, s_qd, s_don, s_dod,
            (i % per_seq) * BLOCK_M, N, qk_scale, D0, D1, BLOCK_M, False, SCORES, PRECISION,
        )  # fmt: skip
    if per_seq * BLOCK_M < N:
        for j in range(0, n_seq):
            b = zero + b_first + j
            row = (b * H + h) * N
            dk0, dk1, dv0, dv1, gate = _dkdv_step(
                dk0, dk1, dv0, dv1, gate, k0, k1, v0, v1, Q + b * s_qb + h * s_qh,
                DO + b * s_dob + h * s_doh, LSE + row, DELTA + row, s_qn, s_qd, s_don, s_dod,
                per_seq * BLOCK_M, N, qk_scale, D0, D1, BLOCK_M, True, SCORES, PRECISION,
            )  # fmt: skip
    return dk0, dk1, dv0, dv1, gate


@triton.jit
def _key_tiles(
    k_base, v_base, s_kn, s_kd, s_vn, s_vd, keys, n_valid,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """K and V tiles of a key block (two column chunks when D1 > 0) and zeroed accumulators."""
    k0 = load_tile(k_base, keys, s_kn, s_kd, n_valid, 0, D0, True)
    v0 = load_tile(v_base, keys, s_vn, s_vd, n_valid, 0, D0, True)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    if D1 > 0:
        k1 = load_tile(k_base, keys, s_kn, s_kd, n_valid, D0, D1, True)
        v1 = load_tile(v_base, keys, s_vn, s_vd, n_valid, D0, D1, True)
        dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
    else:
        k1, v1, dk1 = k0, v0, dk0
    return k0, k1, v0, v1, dk0, dk1


@triton.jit
def _store_rows(base, rows, s_r, s_c, x, row_ok, C0: tl.constexpr, W: tl.constexpr):
    cols = C0 + tl.arange(0, W)
    tl.store(base + rows[:, None] * s_r + cols[None, :] * s_c, x, mask=row_ok[:, None])


@triton.jit
def _dkdv_prompt_keys(
    k_base, v_base, s_kn, s_kd, s_vn, s_vd, start, plen,
    Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod,
    b_first, b_end, h, H, N, P, qk_scale, scale,
    dpk_base, dpv_base, s_dpn, s_dpd,
    uk_base, uv_base, s_us, s_up, s_ud, terms_base, gate_base, terms_stride,
    NUM_U: tl.constexpr,
    SCORES: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """A block of prompt keys, summed in fp32 over sequences [b_first, b_end) of one set (one
    sequence when the set is indexed or scores are asked for): the gradient partial of the group
    and, with SCORES, the sequence's terms and gate."""
    keys = start + tl.arange(0, BLOCK_N)
    k0, k1, v0, v1, dk0, dk1 = _key_tiles(
        k_base, v_base, s_kn, s_kd, s_vn, s_vd, keys, plen, D0, D1, BLOCK_N
    )
    dv0 = dk0
    dv1 = dk1
    gate = tl.zeros([BLOCK_N], tl.float32)
    # A block wholly past its set's length has no work (its rows are written as zeros).
    dk0, dk1, dv0, dv1, gate = _dkdv_queries(
        dk0, dk1, dv0, dv1, gate, k0, k1, v0, v1, start < plen, Q, DO, LSE, DELTA,
        s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod, b_first, b_end, h, H, N, qk_scale,
        D0, D1, BLOCK_M, SCORES, PRECISION,
    )  # fmt: skip
    # Every row below P is written (zeros past the set's length): no zero-filled buffer.
    valid = keys < plen
    in_p = keys < P
    dk0 = tl.where(valid[:, None], dk0 * scale, 0.0)
    dv0 = tl.where(valid[:, None], dv0, 0.0)
    _store_rows(dpk_base, keys, s_dpn, s_dpd, dk0, in_p, 0, D0)
    _store_rows(dpv_base, keys, s_dpn, s_dpd, dv0, in_p, 0, D0)
    if D1 > 0:
        dk1 = tl.where(valid[:, None], dk1 * scale, 0.0)
        dv1 = tl.where(valid[:, None], dv1, 0.0)
        _store_rows(dpk_base, keys, s_dpn, s_dpd, dk1, in_p, D0, D1)
        _store_rows(dpv_base, keys, s_dpn, s_dpd, dv1, in_p, D0, D1)
    if SCORES:
        tl.store(gate_base + keys, tl.where(valid, gate, 0.0), mask=in_p)
        for s_i in tl.static_range(NUM_U):
            uk = load_tile(uk_base + s_i * s_us, keys, s_up, s_ud, plen, 0, D0, True)
            uv = load_tile(uv_base + s_i * s_us, keys, s_up, s_ud, plen, 0, D0, True)
            term = tl.sum(dk0 * uk.to(tl.float32) + dv0 * uv.to(tl.float32), 1)
            if D1 > 0:
                uk = load_tile(uk_base + s_i * s_us, keys, s_up, s_ud, plen, D0, D1, True)
                uv = load_tile(uv_base + s_i * s_us, keys, s_up, s_ud, plen, D0, D1, True)
                term += tl.sum(dk1 * uk.to(tl.float32) + dv1 * uv.to(tl.float32), 1)
            tl.store(terms_base + s_i * terms_stride + keys, term, mask=in_p)


@triton.jit
def _dkdv_image_keys(
    k_base, v_base, s_kn, s_kd, s_vn, s_vd, start,
    Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod,
    b, h, H, N, qk_scale, scale, bad,
    dk_base, dv_base, s_dkn, s_dkd,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """A block of one sequence's own keys: dk, dv in the inputs' dtype (NaN for a bad index)."""
    keys = start + tl.arange(0, BLOCK_N)
    k0, k1, v0, v1, dk0, dk1 = _key_tiles(
        k_base, v_base, s_kn, s_kd, s_vn, s_vd, keys, N, D0, D1, BLOCK_N
    )
    dk0, dk1, dv0, dv1, _ = _dkdv_queries(
        dk0, dk1, dk0, dk1, tl.zeros([BLOCK_N], tl.float32), k0, k1, v0, v1, start < N,
        Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod, b, b + 1, h, H, N,
        qk_scale, D0, D1, BLOCK_M, False, PRECISION,
    )  # fmt: skip
    poison = tl.where(bad, float("nan"), 1.0)
    ok = keys < N
    ty = dk_base.dtype.element_ty
    _store_rows(dk_base, keys, s_dkn, s_dkd, (dk0 * (scale * poison)).to(ty), ok, 0, D0)
    _store_rows(dv_base, keys, s_dkn, s_dkd, (dv0 * poison).to(ty), ok, 0, D0)
    if D1 > 0:
        _store_rows(dk_base, keys, s_dkn, s_dkd, (dk1 * (scale * poison)).to(ty), ok, D0, D1)
        _store_rows(dv_base, keys, s_dkn, s_dkd, (dv1 * poison).to(ty), ok, D0, D1)


@triton.jit(do_not_specialize=["SEQ_GROUP", "P_BUCKET", "N_BUCKET"])
def _prompt_attention_bwd_dkdv_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, IDX, LENS, DK, DV, DPK, DPV, UK, UV, TERMS, GATE,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    s_dob, s_doh, s_don, s_dod,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dpb, s_dph, s_dpn, s_dpd,
    s_us, s_ut, s_uh, s_up, s_ud,
    B, H, N, P, T, SEQ_GROUP, qk_scale, scale, P_BUCKET, N_BUCKET,
    NUM_U: tl.constexpr,
    SCORES: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One launch for every key block: first the prompt blocks (a program per group of
    SEQ_GROUP sequences, head and block; groups > 1 only for the unindexed shared set), then
    the image blocks (a program per sequence, head and block; a head's blocks side by side).

    DK/DV: image-key gradients (B, H, N, d) in q.dtype, sharing strides. DPK/DPV: prompt-key
    gradient partials (cdiv(B, SEQ_GROUP), H, P, d) fp32, sharing strides. With SCORES (groups
    of 1): GATE (B, H, P) = Σ_queries dS and, for each of the NUM_U vector pairs (UK/UV:
    (S, T, H, P, d), shared strides), TERMS (S, B, H, P) = Σ_d dK·u_k + dV·u_v."""
    pid = tl.program_id(0)
    nbp = tl.cdiv(P, BLOCK_N)
    n_prompt = tl.cdiv(B, SEQ_GROUP) * H * nbp
    if pid < n_prompt:
        kb = pid % nbp
        gh = pid // nbp
        h = gh % H
        g = gh // H
        b_first = g * SEQ_GROUP
        # a group shares one set: groups > 1 only without an index
        t, plen, _bad_first = prompt_set(IDX, LENS, b_first, T, P, HAS_INDEX, HAS_LENGTHS)
        part = g.to(tl.int64) * s_dpb + h * s_dph
        gh64 = gh.to(tl.int64)
        _dkdv_prompt_keys(
            PK + t * s_pkt + h * s_pkh, PV + t * s_pvt + h * s_pvh, s_pkn, s_pkd, s_pvn, s_pvd,
            kb * BLOCK_N, plen, Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don,
            s_dod, b_first, tl.minimum(b_first + SEQ_GROUP, B), h, H, N, P, qk_scale, scale,
            DPK + part, DPV + part, s_dpn, s_dpd, UK + t * s_ut + h * s_uh,
            UV + t * s_ut + h * s_uh, s_us, s_up, s_ud, TERMS + gh64 * P, GATE + gh64 * P,
            B * H * P, NUM_U, SCORES, D0, D1, BLOCK_M, BLOCK_N, PRECISION,
        )  # fmt: skip
    else:
        rest = pid - n_prompt
        nbn = tl.cdiv(N, BLOCK_N)
        bh = rest // nbn
        b = bh // H
        h = bh % H
        b64 = b.to(tl.int64)
        _t_img, _plen_img, bad = prompt_set(IDX, LENS, b, T, P, HAS_INDEX, HAS_LENGTHS)
        _dkdv_image_keys(
            K + b64 * s_kb + h * s_kh, V + b64 * s_vb + h * s_vh, s_kn, s_kd, s_vn, s_vd,
            (rest % nbn) * BLOCK_N, Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh,
            s_don, s_dod, b, h, H, N, qk_scale, scale, bad, DK + b64 * s_dkb + h * s_dkh,
            DV + b64 * s_dkb + h * s_dkh, s_dkn, s_dkd, D0, D1, BLOCK_M, BLOCK_N, PRECISION,
        )  # fmt: skip


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


@triton.jit(do_not_specialize=["P_BUCKET", "N_BUCKET"])
def _prompt_attention_bwd_dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, IDX, LENS, DQ,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_pkt, s_pkh, s_pkn, s_pkd,
    s_pvt, s_pvh, s_pvn, s_pvd,
    s_dob, s_doh, s_don, s_dod,
    s_dqb, s_dqh, s_dqn, s_dqd,
    H, N, P, T, qk_scale, scale, P_BUCKET, N_BUCKET,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    t, plen, bad = prompt_set(IDX, LENS, b, T, P, HAS_INDEX, HAS_LENGTHS)
    rows = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = Q + b64 * s_qb + h * s_qh
    do_base = DO + b64 * s_dob + h * s_doh
    q0 = load_tile(q_base, rows, s_qn, s_qd, N, 0, D0, True)
    do0 = load_tile(do_base, rows, s_don, s_dod, N, 0, D0, True)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    if D1 > 0:
        q1 = load_tile(q_base, rows, s_qn, s_qd, N, D0, D1, True)
        do1 = load_tile(do_base, rows, s_don, s_dod, N, D0, D1, True)
        dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    else:
        q1, do1, dq1 = q0, do0, dq0
    row_ok = rows < N
    lse2 = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    dq0, dq1 = _dq_keys(
        dq0, dq1, q0, q1, do0, do1, lse2, delta,
        PK + t * s_pkt + h * s_pkh, PV + t * s_pvt + h * s_pvh, s_pkn, s_pkd, s_pvn, s_pvd,
        plen, qk_scale, D0, D1, BLOCK_N, PRECISION,
    )  # fmt: skip
    dq0, dq1 = _dq_keys(
        dq0, dq1, q0, q1, do0, do1, lse2, delta,
        K + b64 * s_kb + h * s_kh, V + b64 * s_vb + h * s_vh, s_kn, s_kd, s_vn, s_vd,
        N, qk_scale, D0, D1, BLOCK_N, PRECISION,
    )  # fmt: skip
    factor = tl.where(bad, float("nan"), scale)
    dq_base = DQ + b64 * s_dqb + h * s_dqh
    ty = DQ.dtype.element_ty
    _store_rows(dq_base, rows, s_dqn, s_dqd, (dq0 * factor).to(ty), row_ok, 0, D0)
    if D1 > 0:
        _store_rows(dq_base, rows, s_dqn, s_dqd, (dq1 * factor).to(ty), row_ok, D0, D1)


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


_dkdv_tuned = _tuning.autotuned("dkdv", _prompt_attention_bwd_dkdv_kernel)
_dq_tuned = _tuning.autotuned("dq", _prompt_attention_bwd_dq_kernel)
TUNED = {"dkdv": _dkdv_tuned, "dq": _dq_tuned}


# Tests set this to exercise sequence groups on tiny shapes.
_GROUP_OVERRIDE: int | None = None


def seq_group(b: int, h: int, p: int) -> int:
    """Sequences per prompt-key program for the unindexed shared set: up to 8, while at least
    ~256 prompt programs remain to fill the GPU (B·H·cdiv(P, 64) / G). Each doubling halves the
    fp32 partials written and read (78.6 MB per layer at B 64, H 12, P 200, d 64 for G = 1)."""
    if _GROUP_OVERRIDE is not None:
        return _GROUP_OVERRIDE
    blocks = b * h * triton.cdiv(p, 64)
    g = 1
    while g < 8 and blocks // (2 * g) >= 256:
        g *= 2
    return g


def bwd_plan(
    dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v, group=1
):
    """Outputs and launch plan of the backward up to fp32 prompt-gradient partials.

    Returns ``(dq, dk, dv, dpk_part, dpv_part, terms, gate, plan)``. The partials are
    (cdiv(B, group), H, P, d): per sequence for ``group = 1``, else summed over consecutive
    sequences (only valid without ``prompt_index`` and ``u_k``). ``terms`` (S, B, H, P) and
    ``gate`` (B, H, P) are None without ``u_k``."""
    b, h, n, d = q.shape
    t, _, p, _ = pk.shape
    if group > 1 and (prompt_index is not None or u_k is not None):
        raise ValueError("sequence groups need the shared, unindexed set and no scores")
    dq = torch.empty_like(q)
    # Contiguous and alike: the kernel writes dK and dV with one set of strides.
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dpk = torch.empty((triton.cdiv(b, group), h, p, d), device=q.device, dtype=torch.float32)
    dpv = torch.empty_like(dpk)
    scores = u_k is not None
    terms = gate = None
    if scores:
        terms = torch.empty((u_k.shape[0], b, h, p), device=q.device, dtype=torch.float32)
        gate = torch.empty((b, h, p), device=q.device, dtype=torch.float32)
    if q.numel() == 0:
        return dq, dk, dv, dpk.zero_(), dpv.zero_(), terms, gate, []
    (idx, lens), meta = _tuning.common_meta(q, pk, scale, prompt_index, prompt_lengths)
    lse = lse.contiguous()
    delta = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    buckets = (bucket(p, 1024), bucket(n, 4096))
    plan = [
        Launch(
            _bwd_preprocess_kernel,
            (b * h * triton.cdiv(n, _PRE_BLOCK),),
            (out, dout, delta, *out.stride(), *dout.stride(), h, n),
            {
                "D0": meta["D0"],
                "D1": meta["D1"],
                "BLOCK_M": _PRE_BLOCK,
                "num_warps": 4,
                "enable_fp_fusion": True,
            },
            role="preprocess",
        )
    ]
    if scores:  # u_k and u_v share strides (the caller makes both contiguous)
        u_args = (u_k, u_v, terms, gate, *u_k.stride())
    else:
        u_args = (dpk, dpk, dpk, dpk, 0, 0, 0, 0, 0)
    qk_scale = scale * LOG2E
    dkdv_args = (
        q, k, v, pk, pv, dout, lse, delta, idx, lens, dk, dv, dpk, dpv, *u_args[:4],
        *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), *dout.stride(),
        *dk.stride(), *dpk.stride(), *u_args[4:],
        b, h, n, p, t, group, qk_scale, scale, *buckets,
    )  # fmt: skip
    dkdv_meta = {**meta, "NUM_U": u_k.shape[0] if scores else 0, "SCORES": scores}

    def dkdv_grid(m):
        prompt_blocks = triton.cdiv(b, group) * h * triton.cdiv(p, m["BLOCK_N"])
        return (prompt_blocks + b * h * triton.cdiv(n, m["BLOCK_N"]),)

    plan.append(Launch(_dkdv_tuned, dkdv_grid, dkdv_args, dkdv_meta, role="dkdv"))
    dq_args = (
        q, k, v, pk, pv, dout, lse, delta, idx, lens, dq,
        *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), *dout.stride(),
        *dq.stride(), h, n, p, t, qk_scale, scale, *buckets,
    )  # fmt: skip

    def dq_grid(m):
        return (b * h * triton.cdiv(n, m["BLOCK_M"]),)

    plan.append(Launch(_dq_tuned, dq_grid, dq_args, meta, role="dq"))
    return dq, dk, dv, dpk, dpv, terms, gate, plan


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


def _check_u(u_k, u_v, q, pk) -> None:
    t, h, p, d = pk.shape
    for name, u in (("u_k", u_k), ("u_v", u_v)):
        if u.dim() != 5 or tuple(u.shape[1:]) != (t, h, p, d) or u.device != q.device:
            raise ValueError(
                f"prompt_attention_bwd_scored: {name} must be (S, T={t}, H={h}, P={p}, d={d}) "
                f"on {q.device}, got {tuple(u.shape)} on {u.device}"
            )
    if u_k.shape != u_v.shape:
        raise ValueError(f"u_k {tuple(u_k.shape)} and u_v {tuple(u_v.shape)} must match")


def _backward(
    dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v, per_set
):
    if u_k is not None:
        _check_u(u_k, u_v, q, pk)
        # one stride set for both (the kernel indexes UK and UV alike)
        u_k, u_v = u_k.contiguous(), u_v.contiguous()
    grouped = per_set and prompt_index is None and u_k is None
    group = seq_group(q.shape[0], q.shape[1], pk.shape[2]) if grouped else 1
    dq, dk, dv, dpk, dpv, terms, gate, plan = bwd_plan(
        dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v, group
    )
    if per_set:
        dpk, dpv, reduce = reduce_plan(dpk, dpv, prompt_index, pk.shape[0])
        plan += reduce
    _tuning.run(plan, q)
    if u_k is None:
        return dq, dk, dv, dpk, dpv
    # heads summed here (small tensors); deterministic
    return dq, dk, dv, dpk, dpv, terms.sum(2), gate.sum(1)


def prompt_attention_bwd(
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
):
    """Prompt attention backward on Triton.

    Parameters
    ----------
    dout : Tensor, shape (B, H, N, d), q.dtype
        Gradient of ``out``; any strides.
    q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale
        As in :func:`fastprompt.kernels.triton.prompt_attention_fwd`.
    out : Tensor, shape (B, H, N, d)
        Forward output.
    lse : Tensor, shape (B, H, N), float32
        Forward log-sum-exp.

    Returns
    -------
    dq, dk, dv : Tensor, shapes of q, k, v, q.dtype
    dprompt_k, dprompt_v : Tensor, shape (T, H, P, d), float32
        Summed over the sequences of each set in increasing sequence order, in fp32 (no atomics,
        no TF32: bitwise reproducible). Rows past a set's length are zero.
    """
    return _backward(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale,
        None, None, per_set=True,
    )  # fmt: skip


def prompt_attention_bwd_scored(
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v
):
    """:func:`prompt_attention_bwd` plus Prompt Condensation's per-(sequence, prompt) terms.

    Parameters
    ----------
    u_k, u_v : Tensor, shape (S, T, H, P, d)
        Per-prompt vectors (any float dtype; read in fp32).
    (others as in :func:`prompt_attention_bwd`)

    Returns
    -------
    dq, dk, dv, dprompt_k, dprompt_v
        As :func:`prompt_attention_bwd`.
    terms : Tensor, shape (S, B, P), float32
        ``Σ_{h,d} dK_seq[b,h,i]·u_k[s,t_b,h,i] + dV_seq[b,h,i]·u_v[s,t_b,h,i]`` from the
        per-sequence gradients, before they are summed per set.
    gate : Tensor, shape (B, P), float32
        Σ over heads and queries of dS[b, h, n, i].
    """
    return _backward(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale,
        u_k, u_v, per_set=True,
    )  # fmt: skip


def prompt_attention_bwd_per_sequence(
    dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale
):
    """As :func:`prompt_attention_bwd` but with the *per-sequence* prompt gradients
    (B, H, P, d) fp32, before the per-set reduction (the tests check the reduction with it)."""
    return _backward(
        dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, None, None,
        per_set=False,
    )  # fmt: skip
