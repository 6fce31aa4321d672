"""``prompt_attention``: image queries attend to a prompt set's keys/values, then their own.

The registered ``torch.library`` ops with their fakes, autograd, backend choice and the public
:func:`prompt_attention`; the input checks are :mod:`fastprompt.ops.checks`, the fp32 reference
:mod:`fastprompt.ops.reference`. The op's semantics are ``docs/design.md`` section 5, the kernel
contract the backends implement section 6.
"""

from __future__ import annotations

import operator

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from fastprompt import backends
from fastprompt._compat import tracing
from fastprompt.ops.checks import check_inputs, check_scale
from fastprompt.ops.reference import prompt_attention_ref

__all__ = [
    "check_inputs",
    "check_scale",
    "choose_for",
    "empty_out",
    "feature_args",
    "gradient_fakes",
    "guard_gradients",
    "heads_last",
    "prompt_attention",
    "prompt_attention_ref",
]


def feature_args(key_bias: Tensor | None) -> dict[str, Tensor]:
    """Keyword arguments of the optional features a call uses: a backend gets a feature's
    argument only if it declares the feature (``docs/design.md`` section 6)."""
    return {} if key_bias is None else {"key_bias": key_bias}


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
    key_bias: Tensor | None,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    kernels = backends.get(backend).module()
    out, lse = kernels.prompt_attention_fwd(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, **feature_args(key_bias)
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


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_prompt_attention_op.register_fake
def _(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, scale, backend):
    return empty_out(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def guard_gradients(grads, inputs: tuple[Tensor, ...], prompt_k: Tensor, prompt_v: Tensor):
    """Fixed layouts whatever the backend (the fakes predict them): dq, dk, dv stored (B, N, H, d),
    prompt gradients contiguous in the prompts' dtype, any further outputs (scores) contiguous
    fp32/fp64; and no output aliasing an input or another output (slices of one buffer would)."""
    dq, dk, dv, dpk, dpv, *rest = grads
    out = [heads_last(g) for g in (dq, dk, dv)]
    out += [dpk.to(prompt_k.dtype).contiguous(), dpv.to(prompt_v.dtype).contiguous()]
    out += [r.contiguous() for r in rest]
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    for i, g in enumerate(out):
        if not g.numel():
            out[i] = torch.empty_like(g)  # a fresh empty tensor: never the same object twice
        elif g.untyped_storage().data_ptr() in taken:
            out[i] = g = g.clone()  # preserves the layout of a dense tensor
        taken.add(g.untyped_storage().data_ptr())
    return tuple(out)


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
    key_bias: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    backend: str,
    image_grads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # image_grads has a default because torch.compile's caches key a graph by its ops' names,
    # not by the Python that defines their autograd: a backward compiled before the argument
    # existed still calls this op without it, and must get every gradient.
    declared = backends.get(backend)
    kernels = declared.module()
    skip = {} if image_grads or not declared.prompt_grads_only else {"image_grads": False}
    grads = kernels.prompt_attention_bwd(
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
        **feature_args(key_bias),
        **skip,
    )
    if not image_grads:
        grads = (*_not_computed(q), *grads[3:])
    inputs = (dout, q, k, v, prompt_k, prompt_v, out, key_bias)
    return guard_gradients(grads, inputs, prompt_k, prompt_v)


def _not_computed(q: Tensor) -> tuple[Tensor, ...]:
    """dq, dk, dv of a backward asked for prompt gradients only: empty, so the op's outputs are
    defined whichever backend ran (one that skips them leaves their memory unset)."""
    return tuple(q.new_empty((0, 0, 0, 0)) for _ in range(3))


def gradient_fakes(q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor):
    """What :func:`guard_gradients` returns for dq, dk, dv, dprompt_k, dprompt_v (the fakes)."""
    return (
        empty_out(q),
        empty_out(k),
        empty_out(v),
        prompt_k.new_empty(prompt_k.shape),
        prompt_v.new_empty(prompt_v.shape),
    )


@_prompt_attention_backward_op.register_fake
def _(dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, out, lse, *rest):
    grads = gradient_fakes(q, k, v, prompt_k, prompt_v)
    image_grads = rest[2] if len(rest) > 2 else True  # rest: scale, backend[, image_grads]
    return grads if image_grads else (*_not_computed(q), *grads[3:])


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, scale, backend = inputs
    out, lse = output
    # Only the image q/k/v, the prompt sets (once, not per sequence), out and lse are kept: the
    # concatenated keys/values are rebuilt in backward, never saved.
    ctx.save_for_backward(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, out, lse
    )
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    # A frozen backbone's first prompted block: its image q, k, v need no gradient, and a
    # backend that can skips them (dq, dk, dv are then unspecified and dropped here).
    image_grads = any(ctx.needs_input_grad[:3])
    dq, dk, dv, dpk, dpv = _prompt_attention_backward_op(
        dout, *saved[:10], ctx.scale, ctx.backend, image_grads
    )
    if not image_grads:
        dq = dk = dv = None
    # key_bias is not differentiable (check_inputs refuses one that requires grad).
    return (dq, dk, dv, dpk, dpv, None, None, None, None, None)


_prompt_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------------------


_TRANSFORMS = (
    "fastprompt.prompt_attention: PyTorch does not differentiate a custom op's registered "
    "autograd under torch.func transforms (grad, jvp, jacrev, ...), and the fused path "
    "runs on this op; differentiate with torch.autograd (loss.backward(), "
    "torch.autograd.grad; torch.func.functional_call works there), or build the model "
    "with impl='naive' for torch.func"
)


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
    *,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of image queries over a prompt set's keys/values followed by their own.

    ``out = softmax(scale · q [K_p; K]ᵀ + [0; key_bias]) [V_p; V]`` with ``K_p`` the set
    ``prompt_index[b]`` of ``prompt_k`` cut to ``prompt_lengths[set]`` keys (``docs/design.md``
    section 5).

    Parameters
    ----------
    q : Tensor, shape (B, H, N, d)
        Image queries, any strides, any N (including 0).
    k, v : Tensor, shape (B, H, N_k, d)
        Image keys and values, any strides; N_k may differ from N (including 0).
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
    key_bias : Tensor, optional
        Additive bias on the image keys' scores, broadcastable to (B, H, N, N_k), any float
        dtype (Swin's relative-position bias and shifted-window mask; ``-inf`` masks a key). Its
        first dimension may also be a divisor G of B: sequence b then reads row b mod G (a
        windowed backbone's bias per window, its windows stored image by image), never
        repeated in memory by the backends that read it through strides.
        Prompt keys get no bias. **Not differentiable**: no gradient flows to it, and one that
        requires grad is refused (the bias tables of a frozen backbone do not train). ``+inf``
        and NaN are not valid values (unchecked, to spare a pass over the bias per call): the
        backends then disagree (NaN or zero outputs and gradients).

    Returns
    -------
    out : Tensor, shape (B, H, N, d), dtype of q
        Attention output, stored as (B, N, H, d) so that ``out.transpose(1, 2)`` is contiguous
        and merging heads is free. Zero for a query without any key.
    lse : Tensor, shape (B, H, N), float32 (float64 for float64 inputs)
        Natural-log log-sum-exp of each query's scaled, biased scores (−inf without any key).
        Not differentiable, as the log-sum-exp of PyTorch's own attention kernels: a loss that
        reads it gets no gradient through it.
    """
    check_inputs(
        "prompt_attention", q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias
    )
    name = choose_for(
        "prompt_attention",
        q,
        k,
        v,
        prompt_k,
        prompt_v,
        prompt_index,
        prompt_lengths,
        key_bias,
        backend,
    )
    scale = check_scale(q, scale)
    if not tracing() and any(
        fwAD.unpack_dual(t).tangent is not None for t in (q, k, v, prompt_k, prompt_v)
    ):
        # Forward-mode AD (torch.func.jvp, jacfwd, forward_ad) would pass through the custom
        # op with its tangent dropped: wrong numbers, no error.
        raise RuntimeError(_TRANSFORMS)
    try:
        return _prompt_attention_op(
            q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias, scale, name
        )
    except RuntimeError as e:
        # torch.func.grad, jvp, jacrev... over a custom op's registered autograd: PyTorch says
        # only that an autograd.Function needs setup_context, which names nothing of ours.
        if "functorch transforms" not in str(e):
            raise
        raise RuntimeError(_TRANSFORMS) from e


def choose_for(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    key_bias: Tensor | None,
    requested: str | None,
    *extra: str,
) -> str:
    """The backend (name) for a call with these inputs, needing features ``extra`` too."""
    features = [
        name
        for name, used in (
            ("prompt_index", prompt_index is not None),
            ("prompt_lengths", prompt_lengths is not None),
            ("key_bias", key_bias is not None),
            ("key_count", k.shape[2] != q.shape[2]),
        )
        if used
    ]
    b, h, n, d = q.shape
    t, _, p, _ = prompt_k.shape
    if torch.compiler.is_compiling():
        # The batch (and a per-image set count) may be traced symbolically and cannot be a
        # constant of the choice: left out (measured dispatch stands in a size). The sizes that
        # key a measured choice are a model's constants: specialised.
        index = operator.index
        shape = (None, index(h), index(n), index(k.shape[2]), None, index(p))
    else:
        shape = (b, h, n, k.shape[2], t, p)
    training = torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v, prompt_k, prompt_v)
    )
    return backends.choose_name(
        op,
        str(q.device),
        q.dtype,
        operator.index(d),
        (*features, *extra),
        requested,
        shape,
        training,
    )
