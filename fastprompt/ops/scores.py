"""``prompt_scores``: per-(sequence, prompt) importance terms from the prompt-attention backward.

Prompt Condensation scores every prompt with a first-order term per sample. All of them need only
what the attention backward already has per sequence, before it sums over the batch
(``docs/design.md`` §3):

- ``terms[s, b, i] = Σ_{h,d} ∂L_b/∂k_{p,i} · u_k[s, i] + ∂L_b/∂v_{p,i} · u_v[s, i]``: a dot of the
  per-sample prompt K/V gradients with a per-prompt vector (the paper's Taylor score with
  ``u = J_kv(p) p``, the normalised one with ``u = J_kv(h) (h − β)``);
- ``gate[b, i] = Σ_{h, n} dS[b, h, n, i]``: the gradient of the loss with respect to a log-gate on
  prompt key i, i.e. the first-order effect of removing the prompt from attention. With
  ``dS = P ∘ (dP − Δ)``: ``Σ_n dS[n, i] = v_i · dV_i − Σ_n P[n, i] Δ_n``.

:class:`ScoredPromptAttention` is prompt attention whose backward also emits these terms, so a
whole dataset is scored with one backward per batch and no per-sample gradient of a prompt is
ever materialised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastprompt import backends
from fastprompt.kernels.torch.prompt_attention import key_bias
from fastprompt.ops.attention import _prompt_attention_op, check_inputs, check_scale, choose_for

__all__ = [
    "ScoredPromptAttention",
    "prompt_scores",
    "prompt_scores_ref",
    "scored_prompt_attention",
]


def _per_sequence(table: Tensor, prompt_index: Tensor | None, b: int) -> Tensor:
    """(T, ...) → (B, ...) by set index (set 0 for all when None)."""
    return table[:1].expand(b, *table.shape[1:]) if prompt_index is None else table[prompt_index]


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
    """Reference scores in fp32 from per-sequence prompt gradients.

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
        As in :func:`fastprompt.ops.prompt_attention`.

    Returns
    -------
    terms : Tensor, shape (S, B, P), float32
    gate : Tensor, shape (B, P), float32
    """
    b = q.shape[0]
    p = prompt_k.shape[2]
    f = torch.float32 if q.dtype != torch.float64 else torch.float64
    pk = _per_sequence(prompt_k, prompt_index, b).to(f)
    pv = _per_sequence(prompt_v, prompt_index, b).to(f)
    probs = torch.exp((q.to(f) @ pk.transpose(-1, -2)) * scale - lse.to(f).unsqueeze(-1))
    bias = key_bias(b, p, 0, prompt_index, prompt_lengths, f, q.device)
    if bias is not None:
        probs = probs.masked_fill(torch.isinf(bias), 0.0)
    dpv = dprompt_v.to(f)
    gate = (pv * dpv).sum(-1).sum(1) - torch.einsum("bhnp,bhn->bp", probs, delta.to(f))
    uk = u_k.to(f)[:, prompt_index] if prompt_index is not None else u_k.to(f)[:, :1]
    uv = u_v.to(f)[:, prompt_index] if prompt_index is not None else u_v.to(f)[:, :1]
    terms = torch.einsum("bhpd,sbhpd->sbp", dprompt_k.to(f), uk.expand(-1, b, -1, -1, -1))
    terms = terms + torch.einsum("bhpd,sbhpd->sbp", dpv, uv.expand(-1, b, -1, -1, -1))
    return terms, gate


def prompt_scores(
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
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Score terms from per-sequence prompt gradients: :func:`prompt_scores_ref`'s arguments and
    results, on a backend's standalone kernel where it has one (``cpp``), else the reference.

    Most callers never need it: a backend that implements the ``scores`` feature computes these
    terms inside its attention backward (:func:`scored_prompt_attention`).

    Parameters
    ----------
    backend : str, optional
        Strict when given (and then it must have a standalone kernel); otherwise the backend
        :func:`fastprompt.ops.prompt_attention` would pick, if it has one.
    """
    name = choose_for("prompt_scores", q, prompt_index, prompt_lengths, backend, "scores")
    kernel = getattr(backends.get(name).module(), "prompt_scores", None)
    if kernel is None:
        if backend is not None and backend != "torch":
            raise NotImplementedError(
                f"prompt_scores: backend {backend!r} has no standalone score kernel"
            )
        kernel = prompt_scores_ref
    return kernel(
        q,
        prompt_k,
        prompt_v,
        lse,
        delta,
        dprompt_k,
        dprompt_v,
        u_k,
        u_v,
        scale,
        prompt_index,
        prompt_lengths,
    )


ScoreSink = Callable[[Tensor, Tensor], None]


class ScoredPromptAttention(torch.autograd.Function):
    """Prompt attention whose backward also hands per-(sample, prompt) terms to ``sink``.

    ``forward(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, u_k, u_v, scale,
    backend, sink)``
    returns ``(out, lse)`` like :func:`fastprompt.ops.prompt_attention`; its backward returns
    the same gradients and calls ``sink(terms (S, B, P), gate (B, P))`` once.
    """

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        prompt_k,
        prompt_v,
        prompt_index,
        prompt_lengths,
        u_k,
        u_v,
        scale,
        backend,
        sink,
    ):
        out, lse = _prompt_attention_op(
            q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, backend
        )
        ctx.save_for_backward(
            q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, u_k, u_v
        )
        ctx.scale, ctx.backend, ctx.sink = scale, backend, sink
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, pk, pv, index, lengths, out, lse, u_k, u_v = ctx.saved_tensors
        kernels = backends.get(ctx.backend).module()
        dq, dk, dv, dpk, dpv, terms, gate = kernels.prompt_attention_bwd_scored(
            dout, q, k, v, pk, pv, index, lengths, out, lse, ctx.scale, u_k, u_v
        )
        ctx.sink(terms, gate)
        grads = (dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype))
        return (*grads, None, None, None, None, None, None, None)


def scored_prompt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    u_k: Tensor,
    u_v: Tensor,
    sink: ScoreSink,
    prompt_index: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    prompt_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`fastprompt.ops.prompt_attention` whose backward reports score terms to ``sink``.

    Parameters
    ----------
    q, k, v : Tensor, shape (B, H, N, d)
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
    u_k, u_v : Tensor, shape (S, T, H, P, d)
        Per-prompt vectors for the S dot-product terms, any float dtype.
    sink : callable
        Called in backward with ``terms`` (S, B, P) and ``gate`` (B, P), float32.
    prompt_index : Tensor, shape (B,), optional
    scale : float, optional
    backend : str, optional
        Strict when given; otherwise the best backend that implements the ``scores`` feature.
    prompt_lengths : Tensor, shape (T,), optional
        Valid prompts per set; the terms of slots past a set's length are 0.

    Returns
    -------
    out : Tensor, shape (B, H, N, d)
    lse : Tensor, shape (B, H, N)
    """
    op = "scored_prompt_attention"
    check_inputs(op, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths)
    t, h, p, d = prompt_k.shape
    for name, u in (("u_k", u_k), ("u_v", u_v)):
        if not isinstance(u, Tensor) or u.dim() != 5 or tuple(u.shape[1:]) != (t, h, p, d):
            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"{op}: {name} must be (S, T={t}, H={h}, P={p}, d={d}), got {got}")
        if u.device != q.device or not u.is_floating_point():
            raise ValueError(
                f"{op}: {name} must be a floating-point tensor on {q.device}, got {u.dtype} on "
                f"{u.device}"
            )
    if u_k.shape != u_v.shape:
        raise ValueError(f"{op}: u_k {tuple(u_k.shape)} and u_v {tuple(u_v.shape)} differ")
    if not callable(sink):
        raise TypeError(f"{op}: sink must be callable, got {type(sink).__name__}")
    name = choose_for(op, q, prompt_index, prompt_lengths, backend, "scores")
    scale = check_scale(q, scale)
    return ScoredPromptAttention.apply(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, u_k, u_v, scale, name, sink
    )
