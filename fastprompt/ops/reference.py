"""The fp32 references of the prompt-attention ops: plain PyTorch, the test oracles.

This module imports only torch (an import-linter contract in ``pyproject.toml`` keeps it so): it
shares no code with any backend, so a backend is checked against an independent computation
(``docs/design.md``, section 5).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["prompt_attention_ref", "prompt_scores_ref"]


def _check_values(op: str, name: str, t: Tensor | None, lo: int, hi: int) -> None:
    """Host-side range check: a bad index or length is a clear error, never an IndexError."""
    if t is None or t.numel() == 0:
        return
    got_lo, got_hi = int(t.min()), int(t.max())
    if got_lo < lo or got_hi > hi:
        raise ValueError(
            f"{op}: {name} values must lie in [{lo}, {hi}], got values in [{got_lo}, {got_hi}]"
        )


def _sets_of(prompt_index: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """The set index of every sequence (B,), int64."""
    if prompt_index is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return prompt_index.long()


def _slot_is_valid(
    sets: Tensor, num_prompts: int, prompt_lengths: Tensor | None, device: torch.device
) -> Tensor:
    """(B, P) bool: the prompt slots each sequence attends to."""
    if prompt_lengths is None:
        return torch.ones(sets.shape[0], num_prompts, dtype=torch.bool, device=device)
    lengths = prompt_lengths.to(device).long()[sets]
    return torch.arange(num_prompts, device=device)[None, :] < lengths[:, None]


def prompt_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None = None,
    prompt_lengths: Tensor | None = None,
    scale: float | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference prompt attention in fp32 math (float64 stays float64); the test oracle.

    Every sequence gets its own materialised keys ``[K_p; K]`` and the full score matrix; prompt
    slots past a set's length are dropped (zeroed and scored ``-inf``), so whatever they hold
    cannot reach the result.

    Parameters
    ----------
    q : Tensor, shape (B, H, N, d)
    k, v : Tensor, shape (B, H, N_k, d)
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
    prompt_index : Tensor of int, shape (B,), optional
        Values in [0, T); None means set 0 for every sequence.
    prompt_lengths : Tensor of int, shape (T,), optional
        Values in [0, P]; None means all P.
    scale : float, optional
        Default ``d ** -0.5``.
    key_bias : Tensor, optional
        Additive bias on the image keys, broadcastable to (B, H, N, N_k), or (G, ...) with G
        dividing B, sequence i reading row i mod G; prompt keys get none.

    Returns
    -------
    out : Tensor, shape (B, H, N, d), dtype of q
        Zero for a query without any key.
    lse : Tensor, shape (B, H, N), float32 (float64 for float64 inputs)
        ``-inf`` for a query without any key.

    Raises
    ------
    ValueError
        If a ``prompt_index`` or ``prompt_lengths`` value is out of range.
    """
    op = "prompt_attention_ref"
    t, _, p, _ = prompt_k.shape
    _check_values(op, "prompt_index", prompt_index, 0, t - 1)
    _check_values(op, "prompt_lengths", prompt_lengths, 0, p)
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b = q.shape[0]
    sets = _sets_of(prompt_index, b, q.device)
    valid = _slot_is_valid(sets, p, prompt_lengths, q.device)
    keep = valid[:, None, :, None]
    zero = torch.zeros((), dtype=acc, device=q.device)
    pk = torch.where(keep, prompt_k.to(acc)[sets], zero)
    pv = torch.where(keep, prompt_v.to(acc)[sets], zero)
    keys = torch.cat([pk, k.to(acc)], dim=2)
    values = torch.cat([pv, v.to(acc)], dim=2)
    scores = (q.to(acc) @ keys.transpose(-1, -2)) * scale
    prompt_scores, image_scores = scores.split([p, k.shape[2]], dim=-1)
    prompt_scores = prompt_scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    if key_bias is not None:
        bias = key_bias.to(acc)
        if bias.dim() == 4 and bias.shape[0] not in (1, b):  # periodic: sequence i, row i mod G
            image_scores = image_scores.unflatten(0, (-1, bias.shape[0])) + bias
            image_scores = image_scores.flatten(0, 1)
        else:
            image_scores = image_scores + bias
    scores = torch.cat([prompt_scores, image_scores], dim=-1)
    # A query without any key (every score -inf) gives out 0, lse -inf and no gradient: its
    # scores are zeroed before anything differentiates them (exp(-inf - -inf) is NaN, and its
    # gradient would reach every key of the sequence).
    keyless = torch.isneginf(scores).all(-1, keepdim=True)
    scores = scores.masked_fill(keyless, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    # nan_to_num: an infinite scale has no finite softmax (out 0, lse +inf, as the kernels).
    out = torch.exp(scores - lse).nan_to_num(0.0).masked_fill(keyless, 0.0) @ values
    lse = lse.masked_fill(keyless, float("-inf")).squeeze(-1)
    return out.to(q.dtype), lse.to(acc if acc == torch.float64 else torch.float32)


def prompt_scores_ref(
    q: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    lse: Tensor,
    delta: Tensor,
    dprompt_k: Tensor,
    dprompt_v: Tensor,
    u_k: Tensor,
    u_v: Tensor,
    scale: float,
    prompt_index: Tensor | None = None,
    prompt_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference Prompt Condensation score terms from per-sequence prompt gradients, fp32.

    ``terms[s, b, i] = Σ_{h,d} dK[b,h,i] · u_k[s,t_b,h,i] + dV[b,h,i] · u_v[s,t_b,h,i]`` (dK, dV:
    ``dprompt_k``, ``dprompt_v``) and ``gate[b, i] = Σ_{h,n} dS[b,h,n,i]``, the gradient of the
    loss with respect to a log-gate on prompt key i (``docs/design.md``, section 3).

    Parameters
    ----------
    q : Tensor, shape (B, H, N, d)
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
    lse : Tensor, shape (B, H, N)
        Forward log-sum-exp.
    delta : Tensor, shape (B, H, N)
        ``Σ_d dout · out`` per query.
    dprompt_k, dprompt_v : Tensor, shape (B, H, P, d)
        Per-sequence gradients of the loss with respect to the sequence's prompt keys/values.
    u_k, u_v : Tensor, shape (S, T, H, P, d)
        S per-prompt vectors to dot with the gradients (S may be 0).
    scale : float
    prompt_index, prompt_lengths
        As in :func:`prompt_attention_ref`.

    Returns
    -------
    terms : Tensor, shape (S, B, P), float32 (float64 for float64 inputs)
    gate : Tensor, shape (B, P), float32 (float64 for float64 inputs)
    """
    op = "prompt_scores_ref"
    t, _, p, _ = prompt_k.shape
    _check_values(op, "prompt_index", prompt_index, 0, t - 1)
    _check_values(op, "prompt_lengths", prompt_lengths, 0, p)
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    b = q.shape[0]
    sets = _sets_of(prompt_index, b, q.device)
    valid = _slot_is_valid(sets, p, prompt_lengths, q.device)
    keep = valid[:, None, :, None]
    zero = torch.zeros((), dtype=f, device=q.device)
    pk = torch.where(keep, prompt_k.to(f)[sets], zero)
    pv = torch.where(keep, prompt_v.to(f)[sets], zero)
    probs = torch.exp((q.to(f) @ pk.transpose(-1, -2)) * scale - lse.to(f).unsqueeze(-1))
    probs = probs.masked_fill(~valid[:, None, None, :], 0.0)
    dpv = dprompt_v.to(f)
    gate = (pv * dpv).sum(-1).sum(1) - torch.einsum("bhnp,bhn->bp", probs, delta.to(f))
    uk, uv = u_k.to(f)[:, sets], u_v.to(f)[:, sets]
    terms = torch.einsum("bhpd,sbhpd->sbp", dprompt_k.to(f), uk)
    terms = terms + torch.einsum("bhpd,sbhpd->sbp", dpv, uv)
    return terms, gate
