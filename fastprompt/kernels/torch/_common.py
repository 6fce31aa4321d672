"""Pieces shared by the two backends on PyTorch's kernels (``torch`` and ``cascade``).

Prompt sets as a fused kernel takes them (masked slots zeroed and scored ``-inf``), the
deterministic per-set reduction of prompt gradients, and the Prompt Condensation score terms
computed from a fused backward. Nothing here synchronises with the device: index and length
values never come to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PromptKeys",
    "backward_lse",
    "broadcastable_bias",
    "empty_out",
    "finish_scored",
    "gate_column",
    "pad_like_gate",
    "prompt_keys",
    "reduce_over_sets",
    "score_terms",
    "sets_of",
]


def broadcastable_bias(key_bias: Tensor | None, batch: int) -> Tensor | None:
    """``key_bias`` as PyTorch's kernels take it: a periodic one (G sets of rows for B sequences,
    1 < G < B, sequence b reading row b mod G; a windowed backbone's bias per window) repeated to
    B rows; any other as it is (it broadcasts)."""
    if key_bias is None or key_bias.dim() < 4 or key_bias.shape[0] in (1, batch):
        return key_bias
    return key_bias.repeat(batch // key_bias.shape[0], 1, 1, 1)


def empty_out(q: Tensor) -> Tensor:
    """(B, H, N, d) stored as (B, N, H, d): heads merge into (B, N, H·d) without a copy."""
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d)).transpose(1, 2)


def sets_of(prompt_index: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """The set of every sequence (B,), int64: set 0 for all without an index."""
    if prompt_index is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return prompt_index.long()


class PromptKeys:
    """Prompt keys/values as one attention part takes them.

    Attributes
    ----------
    k, v : Tensor, shape (1 or B, H, P, d)
        One shared set, or one set per sequence; slots past a set's length hold zeros.
    bias : Tensor or None, shape (1 or B, 1, 1, P)
        ``-inf`` on slots past a set's length, 0 elsewhere; None without lengths.
    has_keys : Tensor or None, bool, shape () or (B,)
        Whether the (sequence's) set has any valid slot; None without lengths.
    sets : Tensor, shape (B,), int64, or None
        The set of each sequence in the per-sequence layout (None when shared).
    """

    def __init__(self, k, v, bias, has_keys, sets):
        self.k, self.v, self.bias, self.has_keys, self.sets = k, v, bias, has_keys, sets


def prompt_keys(
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    batch: int,
    per_sequence: bool,
) -> PromptKeys:
    """The prompt part's keys: set 0 once (``per_sequence=False``, only without an index) or each
    sequence's set gathered in batch order."""
    device = prompt_k.device
    if per_sequence or prompt_index is not None:
        sets = sets_of(prompt_index, batch, device)
        k, v = prompt_k.index_select(0, sets), prompt_v.index_select(0, sets)
        lengths = None if prompt_lengths is None else prompt_lengths.long().index_select(0, sets)
    else:
        sets = None
        k, v = prompt_k[:1], prompt_v[:1]
        lengths = None if prompt_lengths is None else prompt_lengths.long()[:1]
    if lengths is None:
        return PromptKeys(k, v, None, None, sets)
    valid = torch.arange(k.shape[2], device=device)[None, :] < lengths[:, None]
    keep = valid[:, None, :, None]
    zero = torch.zeros((), dtype=k.dtype, device=device)
    k, v = torch.where(keep, k, zero), torch.where(keep, v, zero)
    acc = torch.promote_types(k.dtype, torch.float32)
    bias = torch.zeros(valid.shape, dtype=acc, device=device).masked_fill_(~valid, float("-inf"))
    has_keys = lengths > 0
    if sets is None:
        has_keys = has_keys[0]
    return PromptKeys(k, v, bias[:, None, None, :], has_keys, sets)


def backward_lse(lse: Tensor) -> Tensor:
    """``lse`` for a fused backward: a query without any key (``-inf``) gets ``+inf``, so that
    ``exp(s - lse)`` is 0 there instead of NaN and the row contributes nothing."""
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def reduce_over_sets(per_seq: Tensor, prompt_index: Tensor | None, num_sets: int) -> Tensor:
    """Sum per-sequence prompt gradients (B, H, P, d) into their sets (T, H, P, d), fp32.

    Deterministic on every device and without a host sync: the sequences of a set are summed in
    batch order by a segment reduction (no atomics as in ``index_add_`` on floats, no TF32 as in
    a one-hot matmul); the set sizes are counted on the device.
    """
    acc = torch.float64 if per_seq.dtype == torch.float64 else torch.float32
    per_seq = per_seq.to(acc)
    if prompt_index is None:
        out = per_seq.new_zeros((num_sets, *per_seq.shape[1:]))
        out[0] = per_seq.sum(0)
        return out
    index = prompt_index.long()
    order = torch.argsort(index, stable=True)
    counts = torch.zeros(num_sets, dtype=torch.long, device=index.device)
    counts.index_add_(0, index, torch.ones_like(index))  # integer sums: exact in any order
    flat = per_seq.flatten(1).index_select(0, order).contiguous()
    summed = torch.segment_reduce(flat, "sum", lengths=counts, axis=0, unsafe=True)
    return summed.view(num_sets, *per_seq.shape[1:])


# Zero columns appended to the head dim for the gate column: flash and efficient want a multiple
# of 8; column d carries the ones.
_GATE_PAD = 8


def gate_column(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with ``_GATE_PAD`` columns appended: q's first one holds 1, the rest 0.

    Scores are unchanged (``q' · k' = q · k + 1 · 0``), and the backward's extra key-gradient
    column is ``dK'[i, d] = scale · Σ_n dS[n, i] · 1``: Prompt Condensation's gate, out of the fused
    backward, with no score matrix materialised.
    """

    def pad(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, _GATE_PAD))

    q_aug = pad(q)
    q_aug[..., q.shape[-1]] = 1.0
    return q_aug, pad(k), pad(v)


def pad_like_gate(t: Tensor) -> Tensor:
    """``t`` with the zero columns of :func:`gate_column` (for ``out`` and ``dout``)."""
    return torch.nn.functional.pad(t, (0, _GATE_PAD))


def score_terms(
    dprompt_k: Tensor, dprompt_v: Tensor, u_k: Tensor, u_v: Tensor, sets: Tensor
) -> Tensor:
    """``terms[s, b, i] = Σ_{h,d} dK_b[h,i] u_k[s, t_b, h, i] + dV_b[h,i] u_v[s, t_b, h, i]``.

    Parameters
    ----------
    dprompt_k, dprompt_v : Tensor, shape (B, H, P, d)
        Per-sequence prompt gradients.
    u_k, u_v : Tensor, shape (S, T, H, P, d)
    sets : Tensor, shape (B,), int64

    Returns
    -------
    Tensor, shape (S, B, P), float32 (float64 for float64 gradients)
    """
    acc = torch.float64 if dprompt_k.dtype == torch.float64 else torch.float32
    dk, dv = dprompt_k.to(acc), dprompt_v.to(acc)
    uk = u_k.to(acc).index_select(1, sets)
    uv = u_v.to(acc).index_select(1, sets)
    return torch.einsum("sbhpd,bhpd->sbp", uk, dk) + torch.einsum("sbhpd,bhpd->sbp", uv, dv)


def finish_scored(dq, dk, dv, dprompt_k, dprompt_v, gate, prompt_index, num_sets, u_k, u_v):
    """A scored backward's result from per-sequence prompt gradients (B, H, P, d): ``(dq, dk, dv,
    dprompt_k, dprompt_v, terms, gate)`` with the prompt gradients summed per set."""
    sets = sets_of(prompt_index, dprompt_k.shape[0], dprompt_k.device)
    terms = score_terms(dprompt_k, dprompt_v, u_k, u_v, sets)
    dprompt_k = reduce_over_sets(dprompt_k, prompt_index, num_sets)
    dprompt_v = reduce_over_sets(dprompt_v, prompt_index, num_sets)
    return dq, dk, dv, dprompt_k, dprompt_v, terms, gate
