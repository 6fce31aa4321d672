"""Triton prompt attention, backward: dq, image dk/dv, and prompt dk/dv per set, deterministic.

The launchers. Four launches, no atomics, no zero-filled buffers:

1. Δ = rowsum(dO ∘ O) in fp32, one read of dO and O (:mod:`._bwd_reduce`).
2. dK/dV (:mod:`._bwd_dkdv`): a program per block of prompt keys or image keys; image keys get
   dk/dv in q.dtype, prompt keys a per-sequence (or per-group) fp32 gradient partial, and, with
   Prompt Condensation's vectors, its per-(sequence, prompt) terms and gate.
3. dQ (:mod:`._bwd_dq`): a program per block of queries, walking prompt keys then image keys.
4. Each set's prompt gradient as the fixed-order fp32 sum of its partials (:mod:`._bwd_reduce`).
"""

from __future__ import annotations

import torch
import triton

from fastprompt.kernels.triton import _tuning
from fastprompt.kernels.triton._bwd_dkdv import dkdv_tuned
from fastprompt.kernels.triton._bwd_dq import dq_tuned
from fastprompt.kernels.triton._bwd_reduce import PRE_BLOCK, bwd_preprocess_kernel, reduce_plan
from fastprompt.kernels.triton._common import (
    INT32_MAX,
    LOG2E,
    Launch,
    empty_heads_last,
    fits_int32,
)

__all__ = [
    "prompt_attention_bwd",
    "prompt_attention_bwd_per_sequence",
    "prompt_attention_bwd_scored",
]


TUNED = {"dkdv": dkdv_tuned, "dq": dq_tuned}


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
    n_k = k.shape[2]
    t, _, p, _ = pk.shape
    if group > 1 and (prompt_index is not None or u_k is not None):
        raise ValueError("sequence groups need the shared, unindexed set and no scores")
    names = ("dout", "q", "k", "v", "pk", "pv", "out")
    dout, q, k, v, pk, pv, out = (
        fits_int32(x, name) for x, name in zip((dout, q, k, v, pk, pv, out), names)
    )
    # In the layout the op returns, (B, N, H, d) storage, so that it copies nothing; dK and dV
    # alike (the kernel writes both with one set of strides).
    dq, dk, dv = empty_heads_last(q), empty_heads_last(k), empty_heads_last(v)
    dpk = torch.empty((triton.cdiv(b, group), h, p, d), device=q.device, dtype=torch.float32)
    dpv = torch.empty_like(dpk)
    scores = u_k is not None
    terms = gate = None
    if scores:
        terms = torch.empty((u_k.shape[0], b, h, p), device=q.device, dtype=torch.float32)
        gate = torch.empty((b, h, p), device=q.device, dtype=torch.float32)
    if q.numel() == 0:  # no query: every gradient is zero (image keys and prompts alike)
        if scores:
            terms.zero_()
            gate.zero_()
        return dq, dk.zero_(), dv.zero_(), dpk.zero_(), dpv.zero_(), terms, gate, []
    (idx, lens), meta = _tuning.common_meta(q, pk, scale, prompt_index, prompt_lengths)
    lse = lse.contiguous()
    delta = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    sizes = (n, n_k, p, t)
    keyed = _tuning.key_args(q, k, pk)
    plan = [
        Launch(
            bwd_preprocess_kernel,
            (b * h * triton.cdiv(n, PRE_BLOCK),),
            (out, dout, delta, *out.stride(), *dout.stride(), h, n),
            {
                "D0": meta["D0"],
                "D1": meta["D1"],
                "BLOCK_M": PRE_BLOCK,
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
        b, h, *sizes, group, qk_scale, scale, *keyed,
    )  # fmt: skip
    dkdv_meta = {**meta, "NUM_U": u_k.shape[0] if scores else 0, "SCORES": scores}

    def dkdv_grid(m):
        prompt_blocks = triton.cdiv(b, group) * h * triton.cdiv(p, m["BLOCK_N"])
        return (prompt_blocks + b * h * triton.cdiv(n_k, m["BLOCK_N"]),)

    plan.append(Launch(dkdv_tuned, dkdv_grid, dkdv_args, dkdv_meta, role="dkdv"))
    dq_args = (
        q, k, v, pk, pv, dout, lse, delta, idx, lens, dq,
        *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), *dout.stride(),
        *dq.stride(), h, *sizes, qk_scale, scale, *keyed,
    )  # fmt: skip

    def dq_grid(m):
        return (b * h * triton.cdiv(n, m["BLOCK_M"]),)

    plan.append(Launch(dq_tuned, dq_grid, dq_args, meta, role="dq"))
    return dq, dk, dv, dpk, dpv, terms, gate, plan


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
    # The score epilogue offsets vector s by s times T·H·P·d (u) and B·H·P (terms) in 32 bits.
    s = u_k.shape[0]
    if s > 1 and (s - 1) * max(t * h * p * d, q.shape[0] * h * p) + h * p * d > INT32_MAX:
        raise ValueError(
            f"prompt_attention_bwd_scored (triton): u_k {tuple(u_k.shape)} for {q.shape[0]} "
            "sequences spans more than 2^31 elements, which the score epilogue indexes with "
            "32-bit offsets; score fewer sets, sequences or vectors per call"
        )


def backward_plan(
    dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v, per_set=True
):
    """Outputs and launch plan of the whole backward, as :func:`prompt_attention_bwd` (and the
    scored and per-sequence variants) run it: ``(dq, dk, dv, dpk, dpv, terms, gate, plan)``,
    the prompt gradients per set (``per_set``) or per sequence. Nothing is launched."""
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
    return dq, dk, dv, dpk, dpv, terms, gate, plan


def _backward(
    dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v, per_set
):
    dq, dk, dv, dpk, dpv, terms, gate, plan = backward_plan(
        dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v, per_set
    )
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
    dout : Tensor, shape (B, H, N_q, d), q.dtype
        Gradient of ``out``; any strides.
    q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale
        As in :func:`fastprompt.kernels.triton.prompt_attention_fwd` (q has N_q rows, k and v
        N_k).
    out : Tensor, shape (B, H, N_q, d)
        Forward output.
    lse : Tensor, shape (B, H, N_q), float32
        Forward log-sum-exp.

    Returns
    -------
    dq, dk, dv : Tensor, shapes of q, k, v, q.dtype
        Stored as (B, N, H, d) (``dq.transpose(1, 2)`` is contiguous): the op's layout.
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
