"""``prompt_attention``: image queries attend to a prompt set's keys/values, then their own.

One op, one file: the fp32 reference, the ``torch`` backend, the registered ``torch.library`` ops
with fakes, autograd, backend choice and the public :func:`prompt_attention`.

Contract (DESIGN.md): ``out = softmax(scale · q [K_p; K]ᵀ) [V_p; V]`` where ``K_p`` is the prompt
set ``prompt_index[b]`` of ``prompt_k``, cut to ``prompt_lengths[set]`` keys. ``lse`` is the
natural-log log-sum-exp of each query's scores, fp32. Backward returns d prompt_k/v summed over
the sequences that share a set, reduced in fp32 in a fixed order (deterministic).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastprompt.ops._dispatch import Backend, choose

__all__ = ["BACKENDS", "prompt_attention", "prompt_attention_ref"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _triton_availability() -> str | None:
    from fastprompt.kernels.triton import availability

    return availability()


BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="triton",
        devices=("cuda", "cpu"),
        auto_devices=("cuda",),
        dtypes=_FLOATS,
        head_dims=(16, 32, 64, 80, 96, 128),
        availability=_triton_availability,
    ),
    Backend(
        name="torch",
        devices=("cpu", "cuda", "mps", "xpu"),
        auto_devices=("cpu", "cuda", "mps", "xpu"),
        dtypes=(*_FLOATS, torch.float64),
    ),
)


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
    ``q.dtype``.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys, values = _with_prompts(
        q, k.to(acc), v.to(acc), prompt_k.to(acc), prompt_v.to(acc), prompt_index
    )
    s = (q.to(acc) @ keys.transpose(-1, -2)) * scale
    bias = _key_bias(q, prompt_k.shape[2], k.shape[2], prompt_index, prompt_lengths, acc)
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ values
    return out.to(q.dtype), lse.to(acc if acc == torch.float64 else torch.float32)


def _with_prompts(
    q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, prompt_index: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-sequence ``[K_p; K]`` and ``[V_p; V]`` (materialised; the reference's way)."""
    b = q.shape[0]
    if prompt_index is None:
        pk, pv = pk[:1].expand(b, -1, -1, -1), pv[:1].expand(b, -1, -1, -1)
    else:
        pk, pv = pk.index_select(0, prompt_index), pv.index_select(0, prompt_index)
    return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def _key_bias(
    q: Tensor,
    num_prompts: int,
    num_keys: int,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    dtype: torch.dtype,
) -> Tensor | None:
    """Additive key bias (B, 1, 1, P + N): −inf on prompt keys past their set's length."""
    if prompt_lengths is None:
        return None
    lengths = prompt_lengths.to(q.device)
    lengths = lengths[:1].expand(q.shape[0]) if prompt_index is None else lengths[prompt_index]
    pos = torch.arange(num_prompts + num_keys, device=q.device)
    masked = (pos.unsqueeze(0) >= lengths.unsqueeze(1)) & (pos.unsqueeze(0) < num_prompts)
    bias = torch.zeros(masked.shape, dtype=dtype, device=q.device)
    return bias.masked_fill_(masked, float("-inf"))[:, None, None, :]


def _reduce_over_sets(per_seq: Tensor, prompt_index: Tensor | None, num_sets: int) -> Tensor:
    """Sum per-sequence prompt gradients (B, H, P, d) into their sets (T, H, P, d), in fp32.

    A one-hot matmul (not ``index_add_``, which uses atomics on CUDA) keeps the sum deterministic.
    """
    per_seq = per_seq.float() if per_seq.dtype != torch.float64 else per_seq
    if prompt_index is None:
        out = per_seq.new_zeros((num_sets, *per_seq.shape[1:]))
        out[0] = per_seq.sum(0)
        return out
    onehot = torch.nn.functional.one_hot(prompt_index.long(), num_sets).to(per_seq.dtype)
    return (onehot.t() @ per_seq.flatten(1)).view(num_sets, *per_seq.shape[1:])


# ----------------------------------------------------------------------------------------------
# torch backend: cat + PyTorch's fused CPU attention (which also returns lse); math elsewhere.
# ----------------------------------------------------------------------------------------------


def _cpu_flash(q: Tensor) -> bool:
    return q.device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )


def _torch_fwd(q, k, v, pk, pv, prompt_index, prompt_lengths, scale):
    if _cpu_flash(q):
        keys, values = (k, v) if pk.shape[2] == 0 else _with_prompts(q, k, v, pk, pv, prompt_index)
        bias = _key_bias(q, pk.shape[2], k.shape[2], prompt_index, prompt_lengths, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, keys, values, attn_mask=bias, scale=scale
        )
        return out, lse
    return prompt_attention_ref(q, k, v, pk, pv, prompt_index, prompt_lengths, scale)


def _torch_bwd_per_seq(dout, q, k, v, pk, pv, prompt_index, prompt_lengths, out, lse, scale):
    """dq, dk, dv and the *per-sequence* prompt gradients (B, H, P, d), before any reduction."""
    num_prompts = pk.shape[2]
    keys, values = (k, v) if num_prompts == 0 else _with_prompts(q, k, v, pk, pv, prompt_index)
    if _cpu_flash(q):
        bias = _key_bias(q, num_prompts, k.shape[2], prompt_index, prompt_lengths, q.dtype)
        dq, dkeys, dvalues = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, keys, values, out, lse, 0.0, False, attn_mask=bias, scale=scale
        )
    else:
        acc = torch.promote_types(q.dtype, torch.float32)
        bias = _key_bias(q, num_prompts, k.shape[2], prompt_index, prompt_lengths, acc)
        qf, kf, vf, dof = q.to(acc), keys.to(acc), values.to(acc), dout.to(acc)
        s = (qf @ kf.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        p = torch.exp(s - lse.to(acc).unsqueeze(-1))
        dvalues = p.transpose(-1, -2) @ dof
        dp = dof @ vf.transpose(-1, -2)
        ds = p * (dp - (dof * out.to(acc)).sum(-1, keepdim=True))
        dq = (ds @ kf) * scale
        dkeys = (ds.transpose(-1, -2) @ qf) * scale
        dq, dkeys, dvalues = dq.to(q.dtype), dkeys.to(q.dtype), dvalues.to(q.dtype)
    return (
        dq,
        dkeys[:, :, num_prompts:],
        dvalues[:, :, num_prompts:],
        dkeys[:, :, :num_prompts],
        dvalues[:, :, :num_prompts],
    )


def _kernels(backend: str):
    """(forward, backward) of a backend; backward returns *per-sequence* prompt gradients."""
    if backend == "torch":
        return _torch_fwd, _torch_bwd_per_seq
    if backend == "triton":
        from fastprompt.kernels.triton import prompt_attention as tk

        return tk.prompt_attention_fwd_triton, tk.prompt_attention_bwd_triton
    raise ValueError(f"unknown backend {backend!r}")


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
    fwd, _ = _kernels(backend)
    out, lse = fwd(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale)
    if out.transpose(1, 2).is_contiguous():
        return out, lse.contiguous()
    layout = _empty_out(q)
    layout.copy_(out)
    return layout, lse.contiguous()


def _empty_out(q: Tensor) -> Tensor:
    """(B, H, N, d) output stored as (B, N, H, d): heads merge into (B, N, H·d) without a copy."""
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d)).transpose(1, 2)


@_prompt_attention_op.register_fake
def _(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _empty_out(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


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
    _, bwd = _kernels(backend)
    dq, dk, dv, dpk, dpv = bwd(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
    )
    num_sets = prompt_k.shape[0]
    dpk = _reduce_over_sets(dpk, prompt_index, num_sets).to(prompt_k.dtype)
    dpv = _reduce_over_sets(dpv, prompt_index, num_sets).to(prompt_v.dtype)
    grads = (dq, dk, dv, dpk, dpv)
    # custom_op outputs may not alias inputs or each other; slices of one buffer would.
    return tuple(g.clone() if g._base is not None else g for g in grads)


@_prompt_attention_backward_op.register_fake
def _(dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, backend):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(prompt_k),
        torch.empty_like(prompt_v),
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
    dq, dk, dv, dpk, dpv = _prompt_attention_backward_op(
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
    return dq, dk, dv, dpk, dpv, None, None, None, None


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
        Image queries, keys and values, any strides, any N.
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
        A table of T prompt sets. T = 1 is the shared VPT-deep set: it is never expanded per
        sequence. P = 0 is allowed.
    prompt_index : Tensor of int, shape (B,), optional
        Which set each sequence attends to; None means set 0 for every sequence.
    prompt_lengths : Tensor of int, shape (T,), optional
        Valid keys of each set (condensed sets of different lengths); None means all P.
    scale : float, optional
        Score scale; default ``d ** -0.5``.
    backend : str, optional
        ``"torch"`` or ``"triton"``; strict when given. Default: ``FASTPROMPT_BACKEND`` or the
        best backend that fits the inputs.

    Returns
    -------
    out : Tensor, shape (B, H, N, d), dtype of q
        Attention output, stored as (B, N, H, d) so that ``out.transpose(1, 2)`` is contiguous
        and merging heads is free.
    lse : Tensor, shape (B, H, N), float32 (float64 for float64 inputs)
        Natural-log log-sum-exp of each query's scaled scores.
    """
    _check_inputs(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths)
    name = choose("prompt_attention", BACKENDS, q.device, q.dtype, q.shape[-1], backend)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if math.isnan(scale):
        raise ValueError("prompt_attention: scale is NaN")
    return _prompt_attention_op(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, name
    )


def _check_inputs(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"prompt_attention: {msg}")

    for name, t in (("q", q), ("k", k), ("v", v), ("prompt_k", prompt_k), ("prompt_v", prompt_v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"prompt_attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            fail(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            fail(
                f"{name} is {t.dtype} on {t.device}; q is {q.dtype} on {q.device}; they must match"
            )
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={b}, H={h}, N, d={d})")
    if prompt_k.shape != prompt_v.shape:
        fail(f"prompt_k {tuple(prompt_k.shape)} and prompt_v {tuple(prompt_v.shape)} differ")
    t, hp, p, dp = prompt_k.shape
    if t < 1 or hp != h or dp != d:
        fail(f"prompt_k must be (T>=1, H={h}, P, d={d}), got {tuple(prompt_k.shape)}")
    compiling = torch.compiler.is_compiling()
    if prompt_index is not None:
        if prompt_index.shape != (b,) or prompt_index.dtype not in (torch.int32, torch.int64):
            fail(
                f"prompt_index must be an int tensor of shape ({b},), got "
                f"{prompt_index.dtype} {tuple(prompt_index.shape)}"
            )
        if prompt_index.device != q.device:
            fail(f"prompt_index is on {prompt_index.device}, q on {q.device}")
        if not compiling and prompt_index.device.type == "cpu" and b > 0:
            lo, hi = int(prompt_index.min()), int(prompt_index.max())
            if lo < 0 or hi >= t:
                fail(f"prompt_index values must lie in [0, {t}), got [{lo}, {hi}]")
    if prompt_lengths is not None:
        if prompt_lengths.shape != (t,) or prompt_lengths.dtype not in (torch.int32, torch.int64):
            fail(
                f"prompt_lengths must be an int tensor of shape ({t},), got "
                f"{prompt_lengths.dtype} {tuple(prompt_lengths.shape)}"
            )
        if prompt_lengths.device != q.device:
            fail(f"prompt_lengths is on {prompt_lengths.device}, q on {q.device}")
        if not compiling and prompt_lengths.device.type == "cpu":
            lo, hi = int(prompt_lengths.min()), int(prompt_lengths.max())
            if lo < 0 or hi > p:
                fail(f"prompt_lengths values must lie in [0, {p}], got [{lo}, {hi}]")
