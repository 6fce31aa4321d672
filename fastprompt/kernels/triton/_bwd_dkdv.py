"""Triton prompt attention, backward: the dK/dV kernel.

A program owns ``BLOCK_N`` keys of one (sequence, head) -- a block of the sequence's prompt set or
of its own keys, both in the one launch -- and walks the sequence's queries. Image keys get dk/dv
in q.dtype; prompt keys get the sequence's fp32 gradient in a per-sequence buffer that is written
everywhere (zeros past a set's length), with Prompt Condensation's per-(sequence, prompt) terms
and gate computed from it on the spot when asked (``SCORES``). Launched by
:mod:`fastprompt.kernels.triton.prompt_attention_backward`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastprompt.kernels.triton import _tuning
from fastprompt.kernels.triton._common import LOG2E_C, load_tile, prompt_set, store_rows


@triton.jit
def _dkdv_step(
    dk0, dk1, dv0, dv1, gate,
    k0, k1, v0, v1,
    q_base, do_base, lse_base, delta_base,
    s_qn, s_qd, s_don, s_dod,
    start, N_Q, qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    SCORES: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    rows = start + tl.arange(0, BLOCK_M)
    q0 = load_tile(q_base, rows, s_qn, s_qd, N_Q, 0, D0, MASKED)
    do0 = load_tile(do_base, rows, s_don, s_dod, N_Q, 0, D0, MASKED)
    if MASKED:
        # lse = +inf makes the probabilities of padded queries exactly 0: no select needed
        lse = tl.load(lse_base + rows, mask=rows < N_Q, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < N_Q, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    # Transposed scores (keys × queries): the accumulating dots below have the keys on M.
    s_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)
    if D1 > 0:
        q1 = load_tile(q_base, rows, s_qn, s_qd, N_Q, D0, D1, MASKED)
        s_t = tl.dot(k1, tl.trans(q1), acc=s_t, input_precision=PRECISION)
    p_t = tl.exp2(s_t * qk_scale - (lse * LOG2E_C)[None, :])
    dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
    if D1 > 0:
        do1 = load_tile(do_base, rows, s_don, s_dod, N_Q, D0, D1, MASKED)
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
    b_first, b_end, h, H, N_Q, qk_scale,
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
    per_seq = N_Q // BLOCK_M
    n_seq = tl.where(has_work, b_end - b_first, 0)
    zero = (b_first * 0).to(tl.int64)
    for i in range(0, n_seq * per_seq):
        b = zero + b_first + i // per_seq
        row = (b * H + h) * N_Q
        dk0, dk1, dv0, dv1, gate = _dkdv_step(
            dk0, dk1, dv0, dv1, gate, k0, k1, v0, v1, Q + b * s_qb + h * s_qh,
            DO + b * s_dob + h * s_doh, LSE + row, DELTA + row, s_qn, s_qd, s_don, s_dod,
            (i % per_seq) * BLOCK_M, N_Q, qk_scale, D0, D1, BLOCK_M, False, SCORES, PRECISION,
        )  # fmt: skip
    if per_seq * BLOCK_M < N_Q:
        for j in range(0, n_seq):
            b = zero + b_first + j
            row = (b * H + h) * N_Q
            dk0, dk1, dv0, dv1, gate = _dkdv_step(
                dk0, dk1, dv0, dv1, gate, k0, k1, v0, v1, Q + b * s_qb + h * s_qh,
                DO + b * s_dob + h * s_doh, LSE + row, DELTA + row, s_qn, s_qd, s_don, s_dod,
                per_seq * BLOCK_M, N_Q, qk_scale, D0, D1, BLOCK_M, True, SCORES, PRECISION,
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
def _dkdv_prompt_keys(
    k_base, v_base, s_kn, s_kd, s_vn, s_vd, start, plen,
    Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod,
    b_first, b_end, h, H, N_Q, P, qk_scale, scale,
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
        s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod, b_first, b_end, h, H, N_Q, qk_scale,
        D0, D1, BLOCK_M, SCORES, PRECISION,
    )  # fmt: skip
    # Every row below P is written (zeros past the set's length): no zero-filled buffer.
    valid = keys < plen
    in_p = keys < P
    dk0 = tl.where(valid[:, None], dk0 * scale, 0.0)
    dv0 = tl.where(valid[:, None], dv0, 0.0)
    store_rows(dpk_base, keys, s_dpn, s_dpd, dk0, in_p, 0, D0)
    store_rows(dpv_base, keys, s_dpn, s_dpd, dv0, in_p, 0, D0)
    if D1 > 0:
        dk1 = tl.where(valid[:, None], dk1 * scale, 0.0)
        dv1 = tl.where(valid[:, None], dv1, 0.0)
        store_rows(dpk_base, keys, s_dpn, s_dpd, dk1, in_p, D0, D1)
        store_rows(dpv_base, keys, s_dpn, s_dpd, dv1, in_p, D0, D1)
    if SCORES:
        tl.store(gate_base + keys, tl.where(valid, gate, 0.0), mask=in_p)
        # The terms read the block's gradient back from the rows just stored, a few columns at a
        # time, rather than from the accumulators: with both accumulators and a full-width u_k,
        # u_v tile live at once, d = 128 spilled. The barrier makes the rows other threads stored
        # visible to every thread of the block.
        tl.debug_barrier()
        _score_terms(
            dpk_base, dpv_base, s_dpn, s_dpd, uk_base, uv_base, s_us, s_up, s_ud,
            terms_base, terms_stride, keys, in_p, P, NUM_U, D0 + D1, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _score_terms(
    dpk_base, dpv_base, s_dpn, s_dpd, uk_base, uv_base, s_us, s_up, s_ud,
    terms_base, terms_stride, keys, in_p, P,
    NUM_U: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """TERMS[s, keys] = Σ_d dK·u_k[s] + dV·u_v[s] over the key block's stored fp32 gradient
    rows, in 16-column chunks (d is a multiple of 16)."""
    for s_i in tl.static_range(NUM_U):
        term = tl.zeros([BLOCK_N], tl.float32)
        for c in tl.static_range(0, D, 16):
            dk = load_tile(dpk_base, keys, s_dpn, s_dpd, P, c, 16, True)
            dv = load_tile(dpv_base, keys, s_dpn, s_dpd, P, c, 16, True)
            uk = load_tile(uk_base + s_i * s_us, keys, s_up, s_ud, P, c, 16, True)
            uv = load_tile(uv_base + s_i * s_us, keys, s_up, s_ud, P, c, 16, True)
            term += tl.sum(dk * uk.to(tl.float32) + dv * uv.to(tl.float32), 1)
        tl.store(terms_base + s_i * terms_stride + keys, term, mask=in_p)


@triton.jit
def _dkdv_image_keys(
    k_base, v_base, s_kn, s_kd, s_vn, s_vd, start,
    Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod,
    b, h, H, N_Q, N_K, qk_scale, scale, bad,
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
        k_base, v_base, s_kn, s_kd, s_vn, s_vd, keys, N_K, D0, D1, BLOCK_N
    )
    dk0, dk1, dv0, dv1, _ = _dkdv_queries(
        dk0, dk1, dk0, dk1, tl.zeros([BLOCK_N], tl.float32), k0, k1, v0, v1, start < N_K,
        Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh, s_don, s_dod, b, b + 1, h, H, N_Q,
        qk_scale, D0, D1, BLOCK_M, False, PRECISION,
    )  # fmt: skip
    poison = tl.where(bad, float("nan"), 1.0)
    ok = keys < N_K
    ty = dk_base.dtype.element_ty
    store_rows(dk_base, keys, s_dkn, s_dkd, (dk0 * (scale * poison)).to(ty), ok, 0, D0)
    store_rows(dv_base, keys, s_dkn, s_dkd, (dv0 * poison).to(ty), ok, 0, D0)
    if D1 > 0:
        store_rows(dk_base, keys, s_dkn, s_dkd, (dk1 * (scale * poison)).to(ty), ok, D0, D1)
        store_rows(dv_base, keys, s_dkn, s_dkd, (dv1 * poison).to(ty), ok, D0, D1)


@triton.jit(do_not_specialize=["SEQ_GROUP", "P_BUCKET", "N_BUCKET", "K_BUCKET", "ARCH"])
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
    B, H, N_Q, N_K, P, T, SEQ_GROUP, qk_scale, scale, P_BUCKET, N_BUCKET, K_BUCKET, ARCH,
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

    DK/DV: image-key gradients (B, H, N_K, d) in q.dtype, sharing strides. DPK/DPV: prompt-key
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
            s_dod, b_first, tl.minimum(b_first + SEQ_GROUP, B), h, H, N_Q, P, qk_scale, scale,
            DPK + part, DPV + part, s_dpn, s_dpd, UK + t * s_ut + h * s_uh,
            UV + t * s_ut + h * s_uh, s_us, s_up, s_ud, TERMS + gh64 * P, GATE + gh64 * P,
            B * H * P, NUM_U, SCORES, D0, D1, BLOCK_M, BLOCK_N, PRECISION,
        )  # fmt: skip
    else:
        rest = pid - n_prompt
        nbn = tl.cdiv(N_K, BLOCK_N)
        bh = rest // nbn
        b = bh // H
        h = bh % H
        b64 = b.to(tl.int64)
        _t_img, _plen_img, bad = prompt_set(IDX, LENS, b, T, P, HAS_INDEX, HAS_LENGTHS)
        _dkdv_image_keys(
            K + b64 * s_kb + h * s_kh, V + b64 * s_vb + h * s_vh, s_kn, s_kd, s_vn, s_vd,
            (rest % nbn) * BLOCK_N, Q, DO, LSE, DELTA, s_qb, s_qh, s_qn, s_qd, s_dob, s_doh,
            s_don, s_dod, b, h, H, N_Q, N_K, qk_scale, scale, bad, DK + b64 * s_dkb + h * s_dkh,
            DV + b64 * s_dkb + h * s_dkh, s_dkn, s_dkd, D0, D1, BLOCK_M, BLOCK_N, PRECISION,
        )  # fmt: skip


dkdv_tuned = _tuning.autotuned("dkdv", _prompt_attention_bwd_dkdv_kernel)
