"""The ``torch`` backend: each sequence's prompt set concatenated with its own keys, then one call
of PyTorch's fused attention (``_sdpa``: the CPU flash kernel on CPU; flash, cuDNN or
memory-efficient on CUDA; materialised scores only where none of them takes the call).

The concatenated keys/values are rebuilt in backward, never saved. Functions follow the kernel
contract of ``docs/design.md`` section 6.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastprompt.kernels.torch._common import (
    backward_lse,
    broadcastable_bias,
    empty_out,
    finish_scored,
    gate_column,
    pad_like_gate,
    prompt_keys,
    reduce_over_sets,
)
from fastprompt.kernels.torch._sdpa import attend, attend_backward, kernel_for

__all__ = ["prompt_attention_bwd", "prompt_attention_bwd_scored", "prompt_attention_fwd"]


def _concatenated(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias):
    """``[K_p; K]``, ``[V_p; V]`` per sequence, the bias over them (or None), and the queries
    without any key (broadcastable to (B, H, N); None: none)."""
    b, h, n, _ = q.shape
    p, n_k = prompt_k.shape[2], k.shape[2]
    key_bias = broadcastable_bias(key_bias, b)
    acc = torch.promote_types(q.dtype, torch.float32)
    # A query has no image key when there are none or the bias masks all of its own (-inf in the
    # dtype the reference adds it in); kernels differ on what they return for a query without
    # any key (the CPU flash kernel: lse 0), so such rows are set as the reference has them.
    no_image = None if key_bias is None else torch.isneginf(key_bias.to(acc)).all(-1)
    if p == 0:
        return k, v, key_bias, no_image if n_k else None
    keys = prompt_keys(prompt_k, prompt_v, prompt_index, prompt_lengths, b, per_sequence=True)
    kk, vv = torch.cat([keys.k, k], 2), torch.cat([keys.v, v], 2)
    keyless = None
    if keys.has_keys is not None:  # some sets are empty: their sequences' rows may have no key
        no_prompt = ~keys.has_keys[:, None, None]
        keyless = no_prompt if n_k == 0 else None if no_image is None else no_prompt & no_image
    if keys.bias is None and key_bias is None:
        return kk, vv, None, keyless
    prompt_bias = keys.bias if keys.bias is not None else q.new_zeros((1, 1, 1, p), dtype=acc)
    if key_bias is None:
        bias = torch.cat([prompt_bias.expand(b, 1, 1, p), prompt_bias.new_zeros(b, 1, 1, n_k)], -1)
    else:
        bias = torch.cat(
            [prompt_bias.expand(b, h, n, p), key_bias.to(acc).expand(b, h, n, n_k)], -1
        )
    return kk, vv, bias, keyless


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def prompt_attention_fwd(
    q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, key_bias=None
):
    """Forward: ``(out, lse)`` (``docs/design.md`` section 6)."""
    b, h, n, _ = q.shape
    kk, vv, bias, keyless = _concatenated(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias
    )
    if b * h * n == 0 or kk.shape[2] == 0:
        out = empty_out(q)
        out.zero_()
        return out, torch.full((b, h, n), float("-inf"), dtype=_lse_dtype(q), device=q.device)
    out, lse = attend(kernel_for(q, bias is not None), q, kk, vv, bias, scale)
    if keyless is not None:
        lse = lse.masked_fill(keyless, float("-inf"))
        out = out.masked_fill(keyless[..., None], 0.0)
    return out, lse


def _backward(
    dout,
    q,
    k,
    v,
    prompt_k,
    prompt_v,
    prompt_index,
    prompt_lengths,
    out,
    lse,
    scale,
    key_bias,
    with_gate,
):
    """dq, dk, dv, the per-sequence prompt gradients (B, H, P, d) and, ``with_gate``, the gate."""
    b, h, n, d = q.shape
    p = prompt_k.shape[2]
    kk, vv, bias, _ = _concatenated(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias
    )
    if b * h * n == 0 or kk.shape[2] == 0:
        dq = torch.zeros_like(q)
        dkk, dvv = torch.zeros_like(kk), torch.zeros_like(vv)
        gate = q.new_zeros((b, p), dtype=_lse_dtype(q))
    elif with_gate:
        qa, ka, va = gate_column(q, kk, vv)
        dq, dkk, dvv = attend_backward(
            kernel_for(qa, bias is not None),
            pad_like_gate(dout),
            qa,
            ka,
            va,
            bias,
            pad_like_gate(out),
            backward_lse(lse),
            scale,
        )
        gate = dkk[:, :, :p, d].to(_lse_dtype(q)).sum(1) / scale
        dq, dkk, dvv = dq[..., :d], dkk[..., :d], dvv[..., :d]
    else:
        dq, dkk, dvv = attend_backward(
            kernel_for(q, bias is not None), dout, q, kk, vv, bias, out, backward_lse(lse), scale
        )
        gate = None
    if p == 0:
        dpk = dpv = prompt_k.new_zeros((b, *prompt_k.shape[1:]))
        return dq, dkk, dvv, dpk, dpv, gate
    return dq, dkk[:, :, p:], dvv[:, :, p:], dkk[:, :, :p], dvv[:, :, :p], gate


def prompt_attention_bwd(
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, key_bias=None
):
    """Backward: ``(dq, dk, dv, dprompt_k, dprompt_v)``, prompt gradients per set in fp32."""
    dq, dk, dv, dpk, dpv, _ = _backward(
        dout,
        q,
        k,
        v,
        prompt_k,
        prompt_v,
        prompt_index,
        prompt_lengths,
        out,
        lse,
        scale,
        key_bias,
        with_gate=False,
    )
    t = prompt_k.shape[0]
    return (
        dq,
        dk,
        dv,
        reduce_over_sets(dpk, prompt_index, t),
        reduce_over_sets(dpv, prompt_index, t),
    )


def prompt_attention_bwd_scored(
    dout,
    q,
    k,
    v,
    prompt_k,
    prompt_v,
    prompt_index,
    prompt_lengths,
    out,
    lse,
    scale,
    u_k,
    u_v,
    key_bias=None,
):
    """Backward plus Prompt Condensation's ``terms`` (S, B, P) and ``gate`` (B, P), from the
    per-sequence prompt gradients before they are summed per set."""
    grads = _backward(
        dout,
        q,
        k,
        v,
        prompt_k,
        prompt_v,
        prompt_index,
        prompt_lengths,
        out,
        lse,
        scale,
        key_bias,
        with_gate=True,
    )
    return finish_scored(*grads, prompt_index, prompt_k.shape[0], u_k, u_v)
