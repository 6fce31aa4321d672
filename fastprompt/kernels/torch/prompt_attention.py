"""The ``torch`` backend of prompt attention: concatenated prompt K/V + PyTorch's attention.

On CPU it calls PyTorch's fused attention (``_scaled_dot_product_flash_attention_for_cpu``, the
kernel behind ``scaled_dot_product_attention``, which also returns the lse the contract needs);
elsewhere, and for the shapes that kernel cannot take (no query, no key at all), plain fp32 math.
It is also the composite that the other pieces of the package build on: the masking of prompt
slots, the deterministic per-set reduction and the reference's concatenation live here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "key_bias",
    "prompt_attention_bwd",
    "prompt_attention_bwd_scored",
    "prompt_attention_fwd",
    "reduce_over_sets",
    "with_prompts",
]


def _valid_prompt_slots(
    batch: int,
    num_prompts: int,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """(B, P) bool: which prompt slots each sequence attends to; None when all of them."""
    if prompt_lengths is None:
        return None
    lengths = prompt_lengths.to(device)
    lengths = lengths[:1].expand(batch) if prompt_index is None else lengths[prompt_index]
    return torch.arange(num_prompts, device=device).unsqueeze(0) < lengths.unsqueeze(1)


def with_prompts(
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sequence ``[K_p; K]`` and ``[V_p; V]``, materialised (B, H, P + N, d).

    Prompt slots past a set's length are zeroed, so whatever they hold (even NaN) cannot reach the
    output through a 0 · NaN product; :func:`key_bias` masks their scores.
    """
    b = k.shape[0]
    if prompt_index is None:
        pk, pv = prompt_k[:1].expand(b, -1, -1, -1), prompt_v[:1].expand(b, -1, -1, -1)
    else:
        pk, pv = prompt_k.index_select(0, prompt_index), prompt_v.index_select(0, prompt_index)
    valid = _valid_prompt_slots(b, pk.shape[2], prompt_index, prompt_lengths, k.device)
    if valid is not None:
        keep = valid[:, None, :, None]
        pk = torch.where(keep, pk, torch.zeros((), dtype=pk.dtype, device=pk.device))
        pv = torch.where(keep, pv, torch.zeros((), dtype=pv.dtype, device=pv.device))
    return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def key_bias(
    batch: int,
    num_prompts: int,
    num_keys: int,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """Additive key bias (B, 1, 1, P + N): −inf on prompt keys past their set's length."""
    valid = _valid_prompt_slots(batch, num_prompts, prompt_index, prompt_lengths, device)
    if valid is None:
        return None
    masked = torch.cat([~valid, valid.new_zeros(batch, num_keys)], dim=1)
    bias = torch.zeros(masked.shape, dtype=dtype, device=device)
    return bias.masked_fill_(masked, float("-inf"))[:, None, None, :]


def reduce_over_sets(per_seq: Tensor, prompt_index: Tensor | None, num_sets: int) -> Tensor:
    """Sum per-sequence prompt gradients (B, H, P, d) into their sets (T, H, P, d), fp32.

    Deterministic on every device: the sequences of a set are summed in batch order by a segment
    reduction (no atomics as in ``index_add_`` on CUDA, no TF32 as in a one-hot matmul).
    """
    acc = torch.float64 if per_seq.dtype == torch.float64 else torch.float32
    per_seq = per_seq.to(acc)
    if prompt_index is None:
        out = per_seq.new_zeros((num_sets, *per_seq.shape[1:]))
        out[0] = per_seq.sum(0)
        return out
    index = prompt_index.long()
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=num_sets)
    flat = per_seq.flatten(1).index_select(0, order)
    summed = torch.segment_reduce(flat, "sum", lengths=counts, axis=0)
    return summed.view(num_sets, *per_seq.shape[1:])


def _fused_cpu(q: Tensor, num_keys: int) -> bool:
    # PyTorch's CPU flash kernel divides by the sequence lengths: no query or no key at all
    # would kill the process (SIGFPE), so those shapes take the math path.
    return (
        q.device.type == "cpu"
        and q.shape[0] * q.shape[1] * q.shape[2] > 0
        and num_keys > 0
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _math_fwd(q, keys, values, bias, scale):
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ keys.to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    lse = torch.logsumexp(s, dim=-1)
    # exp(s − lse) is 0, not NaN, for a query without keys: lse = −inf makes s − lse NaN there.
    probs = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = probs @ values.to(acc)
    return out.to(q.dtype), lse.to(torch.float64 if acc == torch.float64 else torch.float32)


def prompt_attention_fwd(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale):
    """Forward: ``(out, lse)`` as the contract in :mod:`fastprompt.backends` says."""
    b, p = q.shape[0], prompt_k.shape[2]
    if p == 0:
        keys, values = k, v
    else:
        keys, values = with_prompts(k, v, prompt_k, prompt_v, prompt_index, prompt_lengths)
    if _fused_cpu(q, keys.shape[2]):
        bias = key_bias(b, p, k.shape[2], prompt_index, prompt_lengths, q.dtype, q.device)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, keys, values, attn_mask=bias, scale=scale
        )
        return out, lse
    acc = torch.promote_types(q.dtype, torch.float32)
    bias = key_bias(b, p, k.shape[2], prompt_index, prompt_lengths, acc, q.device)
    return _math_fwd(q, keys, values, bias, scale)


def _bwd_per_seq(dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale):
    """dq, dk, dv and the *per-sequence* prompt gradients (B, H, P, d), before any reduction."""
    b, p = q.shape[0], prompt_k.shape[2]
    if p == 0:
        keys, values = k, v
    else:
        keys, values = with_prompts(k, v, prompt_k, prompt_v, prompt_index, prompt_lengths)
    if _fused_cpu(q, keys.shape[2]):
        bias = key_bias(b, p, k.shape[2], prompt_index, prompt_lengths, q.dtype, q.device)
        dq, dkeys, dvalues = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, keys, values, out, lse, 0.0, False, attn_mask=bias, scale=scale
        )
    else:
        acc = torch.promote_types(q.dtype, torch.float32)
        bias = key_bias(b, p, k.shape[2], prompt_index, prompt_lengths, acc, q.device)
        qf, kf, vf, dof = q.to(acc), keys.to(acc), values.to(acc), dout.to(acc)
        s = (qf @ kf.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        probs = torch.exp(s - lse.to(acc).unsqueeze(-1)).nan_to_num(0.0)
        dvalues = probs.transpose(-1, -2) @ dof
        dp = dof @ vf.transpose(-1, -2)
        ds = probs * (dp - (dof * out.to(acc)).sum(-1, keepdim=True))
        dq = (ds @ kf) * scale
        dkeys = (ds.transpose(-1, -2) @ qf) * scale
        dq, dkeys, dvalues = dq.to(q.dtype), dkeys.to(q.dtype), dvalues.to(q.dtype)
    dpk, dpv = dkeys[:, :, :p], dvalues[:, :, :p]
    valid = _valid_prompt_slots(b, p, prompt_index, prompt_lengths, q.device)
    if valid is not None:
        # Masked slots had zero keys/values, so no NaN came in; their gradients are exactly 0.
        keep = valid[:, None, :, None]
        dpk, dpv = dpk * keep, dpv * keep
    return dq, dkeys[:, :, p:], dvalues[:, :, p:], dpk, dpv


def prompt_attention_bwd(
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
):
    """Backward: ``(dq, dk, dv, dprompt_k, dprompt_v)``, prompt gradients per set in fp32."""
    dq, dk, dv, dpk, dpv = _bwd_per_seq(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
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
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v
):
    """Backward plus Prompt Condensation's ``terms`` (S, B, P) and ``gate`` (B, P).

    This backend is the reference composite, so its scores are the reference's, computed from the
    per-sequence prompt gradients before they are summed per set.
    """
    from fastprompt.ops.scores import prompt_scores_ref

    dq, dk, dv, dpk, dpv = _bwd_per_seq(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
    )
    delta = (dout.float() * out.float()).sum(-1)
    terms, gate = prompt_scores_ref(
        q, prompt_k, prompt_v, lse, delta, dpk, dpv, u_k, u_v, scale, prompt_index, prompt_lengths
    )
    t = prompt_k.shape[0]
    dpk, dpv = reduce_over_sets(dpk, prompt_index, t), reduce_over_sets(dpv, prompt_index, t)
    return dq, dk, dv, dpk, dpv, terms, gate
