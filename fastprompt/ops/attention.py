"""``prompt_attention``: image queries attend to a prompt set's keys/values, then their own.

One op, one file: the fp32 reference, the registered ``torch.library`` ops with fakes, autograd,
backend choice and the public :func:`prompt_attention`. The backends' kernels live in
``fastprompt/kernels/<backend>/`` and follow the contract in :mod:`fastprompt.backends`.

Contract (``docs/design.md`` §5): ``out = softmax(scale · q [K_p; K]ᵀ) [V_p; V]`` where
``K_p`` is the prompt set ``prompt_index[b]`` of ``prompt_k``, cut to ``prompt_lengths[set]``
keys. ``lse`` is the natural-log log-sum-exp of each query's scores, fp32. Backward returns
d prompt_k/v summed over the sequences that share a set, reduced in fp32 in a fixed order
(deterministic).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from fastprompt import backends
from fastprompt.kernels.torch.prompt_attention import key_bias, with_prompts

__all__ = ["check_inputs", "choose_for", "prompt_attention", "prompt_attention_ref"]


# ----------------------------------------------------------------------------------------------
# Reference: plain PyTorch, fp32 (or wider) math, differentiable by ordinary autograd.
# ----------------------------------------------------------------------------------------------


def prompt_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None = None,
    prompt_lengths: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference prompt attention in fp32 math (float64 stays float64); the test oracle.

    Parameters and returns are those of :func:`prompt_attention`; ``out`` is cast back to
    ``q.dtype``. A query with no key at all gets ``out = 0`` and ``lse = -inf``.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys, values = with_prompts(
        k.to(acc), v.to(acc), prompt_k.to(acc), prompt_v.to(acc), prompt_index, prompt_lengths
    )
    s = (q.to(acc) @ keys.transpose(-1, -2)) * scale
    bias = key_bias(
        q.shape[0], prompt_k.shape[2], k.shape[2], prompt_index, prompt_lengths, acc, q.device
    )
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0) @ values
    return out.to(q.dtype), lse.to(acc if acc == torch.float64 else torch.float32)


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library), fakes and autograd.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastprompt::prompt_attention", mutates_args=())
def _prompt_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    kernels = backends.get(backend).module()
    out, lse = kernels.prompt_attention_fwd(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale
    )
    return heads_last(out), lse.contiguous()


def empty_out(q: Tensor) -> Tensor:
    """(B, H, N, d) output stored as (B, N, H, d): heads merge into (B, N, H·d) without a copy."""
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d)).transpose(1, 2)


def heads_last(t: Tensor) -> Tensor:
    """``t`` (B, H, N, d) in the (B, N, H, d) storage of :func:`empty_out` (a copy only if not)."""
    if t.transpose(1, 2).is_contiguous():
        return t
    layout = empty_out(t)
    layout.copy_(t)
    return layout


@_prompt_attention_op.register_fake
def _(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return empty_out(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("fastprompt::prompt_attention_backward", mutates_args=())
def _prompt_attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernels = backends.get(backend).module()
    dq, dk, dv, dpk, dpv = kernels.prompt_attention_bwd(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
    )
    # Fixed layouts whatever the backend (the fake must predict them), and no output aliasing an
    # input or another output (slices of one buffer would).
    grads = [heads_last(g) for g in (dq, dk, dv)]
    grads += [dpk.to(prompt_k.dtype).contiguous(), dpv.to(prompt_v.dtype).contiguous()]
    taken = {t.untyped_storage().data_ptr() for t in (dout, q, k, v, prompt_k, prompt_v, out)}
    for i, g in enumerate(grads):
        if g.numel() and g.untyped_storage().data_ptr() in taken:
            grads[i] = g = g.clone()  # preserves the layout of a dense tensor
        taken.add(g.untyped_storage().data_ptr())
    return tuple(grads)


@_prompt_attention_backward_op.register_fake
def _(dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, backend):
    return (
        empty_out(q),
        empty_out(k),
        empty_out(v),
        prompt_k.new_empty(prompt_k.shape),
        prompt_v.new_empty(prompt_v.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, backend = inputs
    out, lse = output
    # Only the image q/k/v, the prompt sets (once, not per sequence), out and lse are kept: the
    # concatenated keys/values are rebuilt in backward, never saved.
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse = ctx.saved_tensors
    grads = _prompt_attention_backward_op(
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
        ctx.scale,
        ctx.backend,
    )
    return (*grads, None, None, None, None)


_prompt_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------------------


def prompt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None = None,
    prompt_lengths: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of image queries over a prompt set's keys/values followed by their own.

    Parameters
    ----------
    q, k, v : Tensor, shape (B, H, N, d)
        Image queries, keys and values, any strides, any N (including 0).
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
        A table of T prompt sets. T = 1 is the shared VPT-deep set: it is never expanded per
        sequence. P = 0 is allowed.
    prompt_index : Tensor of int, shape (B,), optional
        Which set each sequence attends to; None means set 0 for every sequence.
    prompt_lengths : Tensor of int, shape (T,), optional
        Valid keys of each set (condensed sets of different lengths); None means all P. Slots past
        a set's length never influence the result, whatever they hold.
    scale : float, optional
        Score scale; default ``d ** -0.5``.
    backend : str, optional
        One of :data:`fastprompt.backends.NAMES`; strict when given. Default:
        ``FASTPROMPT_BACKEND`` or the best backend that fits the inputs.

    Returns
    -------
    out : Tensor, shape (B, H, N, d), dtype of q
        Attention output, stored as (B, N, H, d) so that ``out.transpose(1, 2)`` is contiguous
        and merging heads is free. Zero for a query without any key.
    lse : Tensor, shape (B, H, N), float32 (float64 for float64 inputs)
        Natural-log log-sum-exp of each query's scaled scores (−inf without any key).
    """
    check_inputs("prompt_attention", q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths)
    name = choose_for("prompt_attention", q, prompt_index, prompt_lengths, backend)
    return _prompt_attention_op(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, check_scale(q, scale), name
    )


def choose_for(
    op: str,
    q: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    requested: str | None,
    *extra: str,
) -> str:
    """The backend (name) for a call with these inputs, needing features ``extra`` too."""
    features = [
        name
        for name, t in (("prompt_index", prompt_index), ("prompt_lengths", prompt_lengths))
        if t is not None
    ]
    return backends.choose_name(
        op, str(q.device), q.dtype, int(q.shape[-1]), (*features, *extra), requested
    )


def check_scale(q: Tensor, scale: float | None) -> float:
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if math.isnan(scale):
        raise ValueError("prompt_attention: scale is NaN")
    return scale


def check_inputs(op, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths) -> None:
    """Raise a clear error for inputs the op cannot take; shared by every prompt-attention entry.

    Index and length values are checked without a host sync: on the host for CPU tensors, by a
    device-side assertion (``torch._assert_async``) for others.
    """

    def fail(msg: str) -> None:
        raise ValueError(f"{op}: {msg}")

    for name, t in (("q", q), ("k", k), ("v", v), ("prompt_k", prompt_k), ("prompt_v", prompt_v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            fail(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            fail(
                f"{name} is {t.dtype} on {t.device}; q is {q.dtype} on {q.device}; they must match"
            )
    if not q.is_floating_point():
        fail(f"q must be a floating-point tensor, got {q.dtype}")
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={b}, H={h}, N, d={d})")
    if prompt_k.shape != prompt_v.shape:
        fail(f"prompt_k {tuple(prompt_k.shape)} and prompt_v {tuple(prompt_v.shape)} differ")
    t, hp, p, dp = prompt_k.shape
    if t < 1 or hp != h or dp != d:
        fail(f"prompt_k must be (T>=1, H={h}, P, d={d}), got {tuple(prompt_k.shape)}")
    _check_int_vector(op, "prompt_index", prompt_index, b, q.device, 0, t - 1, f"[0, {t})")
    _check_int_vector(op, "prompt_lengths", prompt_lengths, t, q.device, 0, p, f"[0, {p}]")


# id(tensor) -> (weak reference, version, bounds) of index/length tensors already checked: a
# model reuses one per forward across its blocks, so the check runs once, not once per block.
_CHECKED: dict[int, tuple[weakref.ref, int, int, int]] = {}


def _already_checked(t: Tensor, lo: int, hi: int) -> bool:
    entry = _CHECKED.get(id(t))
    return entry is not None and entry[0]() is t and entry[1:] == (t._version, lo, hi)


def _mark_checked(t: Tensor, lo: int, hi: int) -> None:
    if len(_CHECKED) > 256:
        _CHECKED.clear()
    _CHECKED[id(t)] = (weakref.ref(t), t._version, lo, hi)


def _check_int_vector(op, name, t, size, device, lo, hi, span) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{op}: {name} must be an int tensor of shape ({size},) or None, got {type(t).__name__}"
        )
    if t.shape != (size,) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{op}: {name} must be an int tensor of shape ({size},), got {t.dtype} {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, q on {device}")
    if size == 0 or torch.compiler.is_compiling() or _already_checked(t, lo, hi):
        return
    if t.device.type == "cpu":
        got_lo, got_hi = int(t.min()), int(t.max())
        if got_lo < lo or got_hi > hi:
            raise ValueError(f"{op}: {name} values must lie in {span}, got [{got_lo}, {got_hi}]")
    else:
        # Two tiny reductions and a device-side assert: no host sync in the hot path; a bad value
        # stops the stream with this message instead of reading out of bounds.
        torch._assert_async(
            ((t >= lo) & (t <= hi)).all(), f"{op}: {name} values must lie in {span}"
        )
    _mark_checked(t, lo, hi)
