"""Prompt Condensation's per-(sequence, prompt) score terms, fused into the attention backward.

Prompt Condensation scores every prompt with a first-order term per sample. All of them need only
what the attention backward already has per sequence, before it sums over the batch
(``docs/design.md`` §3):

- ``terms[s, b, i] = Σ_{h,d} ∂L_b/∂k_{p,i} · u_k[s, i] + ∂L_b/∂v_{p,i} · u_v[s, i]``: a dot of the
  per-sample prompt K/V gradients with a per-prompt vector (the paper's Taylor score with
  ``u = J_kv(p) p``, the normalised one with ``u = J_kv(h) (h − β)``);
- ``gate[b, i] = Σ_{h, n} dS[b, h, n, i]``: the gradient of the loss with respect to a log-gate on
  prompt key i, i.e. the first-order effect of removing the prompt from attention.

:func:`scored_prompt_attention` is prompt attention whose backward (the registered op
``fastprompt::prompt_attention_backward_scored``, with a fake and the layout guards of the plain
backward) also emits these terms, so a whole dataset is scored with one backward per batch and no
per-sample gradient of a prompt is ever materialised. :func:`prompt_scores` is the reference
computation of the terms from given per-sequence gradients (:func:`prompt_scores_ref`); no backend
has a kernel of its own for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastprompt import backends
from fastprompt.ops.attention import (
    _lse_dtype,
    _not_computed,
    _prompt_attention_op,
    choose_for,
    feature_args,
    gradient_fakes,
    guard_gradients,
)
from fastprompt.ops.checks import check_inputs, check_scale
from fastprompt.ops.reference import prompt_scores_ref

__all__ = [
    "ScoredPromptAttention",
    "prompt_scores",
    "prompt_scores_ref",
    "scored_prompt_attention",
]

#: The score terms from per-sequence prompt gradients, computed by the reference
#: (:func:`prompt_scores_ref`: same arguments and results). Backends compute them fused into their
#: attention backward instead (:func:`scored_prompt_attention`).
prompt_scores = prompt_scores_ref


@torch.library.custom_op("fastprompt::prompt_attention_backward_scored", mutates_args=())
def _scored_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    key_bias: Tensor | None,
    out: Tensor,
    lse: Tensor,
    u_k: Tensor,
    u_v: Tensor,
    scale: float,
    backend: str,
    image_grads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # image_grads defaults to True for backwards compiled before it existed (see the plain
    # backward op in ops/attention.py).
    declared = backends.get(backend)
    skip = {} if image_grads or not declared.prompt_grads_only else {"image_grads": False}
    dq, dk, dv, dpk, dpv, terms, gate = declared.module().prompt_attention_bwd_scored(
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
        **feature_args(key_bias),
        **skip,
    )
    if not image_grads:
        dq, dk, dv = _not_computed(q)
    scores = (terms.to(_lse_dtype(q)), gate.to(_lse_dtype(q)))
    inputs = (dout, q, k, v, prompt_k, prompt_v, out, key_bias, u_k, u_v)
    return guard_gradients((dq, dk, dv, dpk, dpv, *scores), inputs, prompt_k, prompt_v)


@_scored_backward_op.register_fake
def _(
    dout,
    q,
    k,
    v,
    prompt_k,
    prompt_v,
    prompt_index,
    prompt_lengths,
    key_bias,
    out,
    lse,
    u_k,
    u_v,
    scale,
    backend,
    image_grads=True,
):
    b, p = q.shape[0], prompt_k.shape[2]
    f = _lse_dtype(q)
    terms = q.new_empty((u_k.shape[0], b, p), dtype=f)
    grads = gradient_fakes(q, k, v, prompt_k, prompt_v)
    if not image_grads:
        grads = (*_not_computed(q), *grads[3:])
    return (*grads, terms, q.new_empty((b, p), dtype=f))


ScoreSink = Callable[[Tensor, Tensor], None]


class ScoredPromptAttention(torch.autograd.Function):
    """Prompt attention whose backward also hands per-(sample, prompt) terms to ``sink``.

    ``forward(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, u_k, u_v,
    scale, backend, sink)`` returns ``(out, lse)`` like :func:`fastprompt.ops.prompt_attention`;
    its backward runs the registered scored backward op and calls ``sink(terms (S, B, P),
    gate (B, P))`` once. (An autograd.Function, not ``register_autograd``, because the sink is a
    Python callable, which an op cannot take.)
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
        key_bias,
        u_k,
        u_v,
        scale,
        backend,
        sink,
    ):
        out, lse = _prompt_attention_op(
            q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, scale, backend
        )
        ctx.save_for_backward(
            q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, out, lse, u_k, u_v
        )
        ctx.scale, ctx.backend, ctx.sink = scale, backend, sink
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        *saved, u_k, u_v = ctx.saved_tensors
        # As the plain op's backward: a frozen backbone's first block needs prompt gradients only.
        image_grads = any(ctx.needs_input_grad[:3])
        dq, dk, dv, dpk, dpv, terms, gate = _scored_backward_op(
            dout, *saved, u_k, u_v, ctx.scale, ctx.backend, image_grads
        )
        ctx.sink(terms, gate)
        if not image_grads:
            dq = dk = dv = None
        return (dq, dk, dv, dpk, dpv, *([None] * 8))


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
    *,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`fastprompt.ops.prompt_attention` whose backward reports score terms to ``sink``.

    Parameters
    ----------
    q : Tensor, shape (B, H, N, d)
    k, v : Tensor, shape (B, H, N_k, d)
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
    u_k, u_v : Tensor, shape (S, T, H, P, d)
        Per-prompt vectors for the S dot-product terms, any float dtype.
    sink : callable
        Called in backward with ``terms`` (S, B, P) and ``gate`` (B, P), float32 (float64 for
        float64 inputs).
    prompt_index : Tensor, shape (B,), optional
    scale : float, optional
    backend : str, optional
        Strict when given; otherwise the best backend that implements the ``scores`` feature.
    prompt_lengths : Tensor, shape (T,), optional
        Valid prompts per set; the terms of slots past a set's length are 0.
    key_bias : Tensor, optional
        As in :func:`fastprompt.ops.prompt_attention` (not differentiable).

    Returns
    -------
    out : Tensor, shape (B, H, N, d)
    lse : Tensor, shape (B, H, N)
    """
    op = "scored_prompt_attention"
    check_inputs(op, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias)
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
    name = choose_for(
        op, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, backend, "scores"
    )
    return ScoredPromptAttention.apply(
        q,
        k,
        v,
        prompt_k,
        prompt_v,
        prompt_index,
        prompt_lengths,
        key_bias,
        u_k,
        u_v,
        check_scale(q, scale),
        name,
        sink,
    )
