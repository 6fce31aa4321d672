"""PyTorch's own fused attention kernels behind one interface: forward ``(out, lse)`` and backward.

``torch.nn.functional.scaled_dot_product_attention`` returns no log-sum-exp and cannot be handed
the ``out``/``lse`` of a different computation in its backward; the kernels behind it can. Both
prompt-attention backends built on PyTorch (``torch``: concatenated keys; ``cascade``: the prompt
and image parts merged by log-sum-exp, ``docs/design.md`` section 6) call them through this module:

======== ==================================================== ===================================
kernel   aten ops                                             taken for
======== ==================================================== ===================================
flash    ``_scaled_dot_product_flash_attention(_backward)``   CUDA fp16/bf16, no bias, sm_80+,
                                                              head dim a multiple of 8, <= 256
cudnn    ``_scaled_dot_product_cudnn_attention(_backward)``   the same when flash is disabled or
                                                              not built (head dim <= 128)
efficient ``_scaled_dot_product_efficient_attention(_bwd)``   CUDA fp32, and fp16/bf16 with a
                                                              bias (bf16: sm_80+)
cpu_flash ``_scaled_dot_product_flash_attention_for_cpu``     every CPU dtype, bias as attn_mask
math     plain matmuls (the scores are materialised)          anything else (fp64 on CUDA, odd
                                                              head dims, other devices)
======== ==================================================== ===================================

The choice is the pure function :func:`select`, so a test pins it for every (device, dtype); the
CUDA kernels obey PyTorch's own switches (``torch.nn.attention.sdpa_kernel``). Every kernel is
handed the ``out`` and ``lse`` its backward should use, in the layout it expects (flash: (B, H, N);
efficient: padded to a multiple of 32 rows; cuDNN: (B, H, N, 1); the shapes are read from PyTorch's
own meta functions, so they follow the installed version). With dropout 0 the random-state
arguments are never read; empty tensors stand in for them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastprompt._warnings import warn_at_caller
from fastprompt.kernels.torch._common import broadcastable_bias

__all__ = ["KERNELS", "attend", "attend_backward", "kernel_for", "select"]

KERNELS = ("flash", "cudnn", "efficient", "cpu_flash", "math")

# aten entry points per kernel: (forward, backward). Looked up through `op` so tests can stand in
# CPU emulations for the CUDA ones.
ATEN = {
    "flash": (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
    ),
    "cudnn": (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_cudnn_attention_backward",
    ),
    "efficient": (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
    ),
    "cpu_flash": (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
}

_HALF = (torch.float16, torch.bfloat16)
# The memory-efficient kernel wants every stride of its bias but the last a multiple of this.
_BIAS_ALIGNMENT = 16


def op(name: str) -> Callable:
    """The aten operator ``name`` (an indirection tests replace)."""
    return getattr(torch.ops.aten, name)


def select(
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    has_bias: bool,
    capability: tuple[int, int] = (0, 0),
    enabled: frozenset[str] = frozenset(),
) -> str:
    """The kernel for one attention part: a pure function of what it is given.

    Parameters
    ----------
    device_type : str
        ``"cpu"``, ``"cuda"``, ...
    dtype : torch.dtype
    head_dim : int
    has_bias : bool
        Whether the part adds a bias to its scores (masked prompt slots, Swin's key bias).
    capability : tuple of int
        CUDA compute capability (ignored elsewhere).
    enabled : frozenset of str
        The CUDA kernels built into this torch and switched on (see :func:`kernel_for`).

    Returns
    -------
    str
        One of :data:`KERNELS`.
    """
    if device_type == "cpu":
        return "cpu_flash"
    if device_type != "cuda":
        return "math"
    half = dtype in _HALF
    aligned = head_dim % 8 == 0
    if half and not has_bias and aligned and capability >= (8, 0):
        if "flash" in enabled and head_dim <= 256:
            return "flash"
        if "cudnn" in enabled and head_dim <= 128:
            return "cudnn"
    if "efficient" in enabled and capability >= (5, 0):
        if half and aligned and (dtype == torch.float16 or capability >= (8, 0)):
            return "efficient"
        if dtype == torch.float32 and head_dim % 4 == 0:
            return "efficient"
    return "math"


def _switch(name: str) -> bool:
    # Each switch is a plain function of torch.backends.cuda in every torch this package supports
    # (>= 2.6); a build without the kernel reports it disabled or unavailable.
    return bool(getattr(torch.backends.cuda, name)())


def enabled_cuda_kernels() -> frozenset[str]:
    """The CUDA kernels this torch was built with and that are switched on right now."""
    on = set()
    if _switch("flash_sdp_enabled") and _switch("is_flash_attention_available"):
        on.add("flash")
    if _switch("mem_efficient_sdp_enabled"):
        on.add("efficient")
    if _switch("cudnn_sdp_enabled") and torch.backends.cudnn.is_available():
        on.add("cudnn")
    return frozenset(on)


_SAID: set[tuple[str, str]] = set()


def kernel_for(q: Tensor, has_bias: bool) -> str:
    """:func:`select` for ``q``'s device, dtype and head dim; says once when it falls to math."""
    device = q.device
    if device.type != "cuda":
        return select(device.type, q.dtype, q.shape[-1], has_bias)
    kernel = select(
        "cuda",
        q.dtype,
        q.shape[-1],
        has_bias,
        torch.cuda.get_device_capability(device),
        enabled_cuda_kernels(),
    )
    if kernel == "math":
        key = (str(q.dtype), f"{q.shape[-1]}-{has_bias}")
        if key not in _SAID:
            _SAID.add(key)
            warn_at_caller(
                f"fastprompt: no fused PyTorch attention kernel takes {q.dtype} with head dim "
                f"{q.shape[-1]}{' and a bias' if has_bias else ''} on this GPU (or they are "
                "switched off); these calls materialise their scores",
                RuntimeWarning,
            )
    return kernel


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def _last_dim_dense(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


_LSE_SHAPES: dict[tuple, torch.Size] = {}


def _raw_lse_shape(kernel: str, q: Tensor, k: Tensor, v: Tensor) -> torch.Size:
    """The shape of the lse ``kernel``'s forward returns, from PyTorch's meta function."""
    key = (kernel, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape))
    if key not in _LSE_SHAPES:
        meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in (q, k, v)]
        fwd = getattr(torch.ops.aten, ATEN[kernel][0])
        if kernel == "flash":
            raw = fwd(*meta, 0.0, False, False)[1]
        else:
            raw = fwd(*meta, None, True, 0.0, False)[1]
        if len(_LSE_SHAPES) > 1024:
            _LSE_SHAPES.clear()
        _LSE_SHAPES[key] = raw.shape
    return _LSE_SHAPES[key]


def _lse_from_raw(raw: Tensor, n: int) -> Tensor:
    """(B, H, N) view of a kernel's lse: (B, H, N, 1) or padded (B, H, M >= N)."""
    return raw[..., 0] if raw.dim() == 4 else raw[..., :n]


def _lse_to_raw(lse: Tensor, shape: torch.Size) -> Tensor:
    """``lse`` (B, H, N) in a kernel's layout ``shape`` (the inverse of :func:`_lse_from_raw`)."""
    lse = lse.float()
    if len(shape) == 4:
        return lse.unsqueeze(-1).contiguous()
    if shape[-1] == lse.shape[-1]:
        return lse.contiguous()
    raw = lse.new_zeros(shape)
    raw[..., : lse.shape[-1]] = lse
    return raw


def bias_in(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """``bias`` cast to ``dtype``, through fp32 as the reference adds it, its finite values
    clamped to a 16-bit dtype's range.

    A plain cast turns a large finite mask value (``torch.finfo(torch.float32).min``, common in
    attention masks) into -inf in fp16 or bf16; a row it masks entirely would then have no key,
    where the fp32 computation keeps it (docs/design.md, section 5). Infinities stay infinite.
    """
    if dtype not in (torch.float16, torch.bfloat16) or bias.dtype == dtype:
        return bias.to(dtype)
    wide = bias.to(torch.float32)
    top = torch.finfo(dtype).max
    return torch.where(wide.isinf(), wide, wide.clamp(-top, top)).to(dtype)


def _efficient_bias(bias: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """``bias`` in q's dtype, broadcast to (B, H, N, N_k) without copying where it broadcasts, its
    base padded so that every stride but the last is a multiple of the kernel's alignment (as
    ``scaled_dot_product_attention`` prepares it); a periodic one (G rows, 1 < G < B) repeated
    straight into that padded buffer."""
    bias = bias_in(bias, q.dtype)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    # A bias broadcast over the keys is read with unit stride along them: widen it first.
    bias = bias.expand(*bias.shape[:-1], k.shape[2])
    b, h, m, _ = q.shape
    g = bias.shape[0]
    period = g not in (1, b)
    aligned = (
        not period
        and bias.stride(-1) == 1
        and all(
            s % _BIAS_ALIGNMENT == 0 for s, n in zip(bias.stride()[:-1], bias.shape[:-1]) if n > 1
        )
    )
    if not aligned:
        n = bias.shape[-1]
        width = -(-n // _BIAS_ALIGNMENT) * _BIAS_ALIGNMENT
        rows = b if period else g
        body = bias.new_zeros((rows, *bias.shape[1:-1], width))[..., :n]
        if g:  # once, or rows // g times for a period
            body.unflatten(0, (rows // g, g)).copy_(bias.unsqueeze(0))
        bias = body
    return bias.expand(b, h, m, k.shape[2])


def _cpu_mask(bias: Tensor | None, q: Tensor) -> Tensor | None:
    if bias is None:
        return None
    bias = broadcastable_bias(bias, q.shape[0])
    while bias.dim() < 4:  # the CPU kernel takes 2-D or 4-D masks, broadcast in any dim
        bias = bias.unsqueeze(0)
    # fp32 keeps the bias exact for 16-bit inputs (the CPU kernel accepts it).
    return _unit_stride_keys(bias.to(torch.promote_types(q.dtype, torch.float32)))


def _unit_stride_keys(mask: Tensor) -> Tensor:
    """``mask`` read with unit stride along the keys: torch 2.6's CPU kernel reads it so whatever
    its stride (a transposed mask gave wrong results). Its other broadcast dims stay broadcast."""
    if mask.shape[-1] <= 1 or mask.stride(-1) == 1:
        return mask
    base = mask[tuple(slice(0, 1) if s == 0 else slice(None) for s in mask.stride()[:-1])]
    return base.contiguous().expand(mask.shape)


def _seed(q: Tensor) -> Tensor:
    return torch.empty((), dtype=torch.long, device=q.device)


# ----------------------------------------------------------------------------------------------
# Forward and backward
# ----------------------------------------------------------------------------------------------


# CUDA launches at most 65,535 blocks along a grid's y and z, where PyTorch's fused kernels put
# the sequences (flash, and the memory-efficient kernel in older torch versions): a call with
# more sequences (a windowed backbone at a large batch: 64 windows per image) is made in parts
# of at most this many, on every device, so that the CPU tests run the same loop.
MAX_SEQUENCES = 65_535


def _parts(batch: int, bias: Tensor | None) -> list[tuple[int, int]]:
    """``[start, stop)`` of each call's sequences: whole periods of a periodic bias."""
    step = MAX_SEQUENCES
    g = bias.shape[0] if bias is not None and bias.dim() == 4 else 1
    if 1 < g < batch and g <= step:
        step = step // g * g
    return [(start, min(start + step, batch)) for start in range(0, batch, step)]


def _bias_rows(bias: Tensor | None, start: int, stop: int, batch: int) -> Tensor | None:
    """The rows of ``bias`` that sequences ``start`` to ``stop`` read."""
    if bias is None or bias.dim() < 4 or bias.shape[0] == 1:
        return bias
    g = bias.shape[0]
    if g == batch:
        return bias[start:stop]
    if start % g == 0 and (stop - start) % g == 0:
        return bias  # whole periods: the same period
    rows = torch.arange(start, stop, device=bias.device) % g
    return bias.index_select(0, rows)


def attend(
    kernel: str, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` over ``k``/``v`` on ``kernel``.

    Parameters
    ----------
    kernel : str
        One of :data:`KERNELS` (flash and cuDNN take no bias).
    q : Tensor, shape (B, H, N, d)
    k, v : Tensor, shape (B, H, N_k, d)
        N >= 1, N_k >= 1.
    bias : Tensor or None
        Broadcastable to (B, H, N, N_k), or with a first dimension G dividing B (sequence b
        reads row b mod G).
    scale : float

    Returns
    -------
    out : Tensor, shape (B, H, N, d), dtype of q
    lse : Tensor, shape (B, H, N), float32 (float64 for float64 inputs)
    """
    b = q.shape[0]
    if b <= MAX_SEQUENCES:
        return _attend(kernel, q, k, v, bias, scale)
    outs, lses = zip(
        *(
            _attend(kernel, q[i:j], k[i:j], v[i:j], _bias_rows(bias, i, j, b), scale)
            for i, j in _parts(b, bias)
        )
    )
    return torch.cat(outs), torch.cat(lses)


def _attend(kernel, q, k, v, bias, scale):
    if kernel == "math":
        return _math_fwd(q, k, v, bias, scale)
    q, k, v = (_last_dim_dense(t) for t in (q, k, v))
    fwd = op(ATEN[kernel][0])
    if kernel == "cpu_flash":
        return fwd(q, k, v, 0.0, False, attn_mask=_cpu_mask(bias, q), scale=scale)
    if kernel == "flash":
        res = fwd(q, k, v, 0.0, False, False, scale=scale)
    elif kernel == "cudnn":
        q, k, v = (t.contiguous() for t in (q, k, v))
        res = fwd(q, k, v, None, True, 0.0, False, False, scale=scale)
    else:
        attn_bias = None if bias is None else _efficient_bias(bias, q, k)
        res = fwd(q, k, v, attn_bias, True, 0.0, False, scale=scale)
    return res[0], _lse_from_raw(res[1], q.shape[2])


def attend_backward(
    kernel: str,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one attention part given the ``out`` and ``lse`` to use.

    The kernels compute the probabilities as ``exp(s - lse)`` and ``Δ = rowsum(dout · out)`` from
    what they are handed: with a merged ``out``/``lse`` (cascade attention) the result is this
    part's exact share of the gradients. A row whose ``lse`` is ``+inf`` contributes nothing.

    Parameters
    ----------
    kernel : str
    dout, out : Tensor, shape (B, H, N, d)
    q : Tensor, shape (B, H, N, d)
    k, v : Tensor, shape (B, H, N_k, d)
    bias : Tensor or None
        The forward's bias.
    lse : Tensor, shape (B, H, N)
    scale : float

    Returns
    -------
    dq, dk, dv : Tensor
        Shapes of q, k, v; dtype of q; any strides.
    """
    b = q.shape[0]
    if b <= MAX_SEQUENCES:
        return _backward(kernel, dout, q, k, v, bias, out, lse, scale)
    grads = [
        _backward(
            kernel,
            dout[i:j],
            q[i:j],
            k[i:j],
            v[i:j],
            _bias_rows(bias, i, j, b),
            out[i:j],
            lse[i:j],
            scale,
        )
        for i, j in _parts(b, bias)
    ]
    return tuple(torch.cat(g) for g in zip(*grads))


def _backward(kernel, dout, q, k, v, bias, out, lse, scale):
    if kernel == "math":
        return _math_bwd(dout, q, k, v, bias, out, lse, scale)
    q, k, v, out, dout = (_last_dim_dense(t) for t in (q, k, v, out, dout))
    bwd = op(ATEN[kernel][1])
    n, n_k = q.shape[2], k.shape[2]
    if kernel == "cpu_flash":
        return bwd(dout, q, k, v, out, lse, 0.0, False, attn_mask=_cpu_mask(bias, q), scale=scale)
    if kernel == "flash":
        raw = _lse_to_raw(lse, _raw_lse_shape(kernel, q, k, v))
        seed = _seed(q)
        return bwd(dout, q, k, v, out, raw, None, None, n, n_k, 0.0, False, seed, seed, scale=scale)
    if kernel == "cudnn":
        q, k, v, out, dout = (t.contiguous() for t in (q, k, v, out, dout))
        raw = _lse_to_raw(lse, _raw_lse_shape(kernel, q, k, v))
        seed = _seed(q)
        grads = bwd(
            dout, q, k, v, out, raw, seed, seed, None, None, None, n, n_k, 0.0, False, scale=scale
        )
        return grads[0], grads[1], grads[2]
    attn_bias = None if bias is None else _efficient_bias(bias, q, k)
    raw = _lse_to_raw(lse, _raw_lse_shape(kernel, q, k, v))
    seed = _seed(q)
    mask = [True, True, True, False]
    grads = bwd(dout, q, k, v, attn_bias, out, raw, seed, seed, 0.0, mask, False, scale=scale)
    return grads[0], grads[1], grads[2]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _math_fwd(q, k, v, bias, scale):
    acc = _acc(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + broadcastable_bias(bias, q.shape[0]).to(acc)
    lse = torch.logsumexp(s, dim=-1)
    # exp(s - lse) is NaN, not 0, for a row whose keys are all masked (lse = -inf).
    out = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0) @ v.to(acc)
    return out.to(q.dtype), lse


def _math_bwd(dout, q, k, v, bias, out, lse, scale):
    acc = _acc(q.dtype)
    qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + broadcastable_bias(bias, q.shape[0]).to(acc)
    probs = torch.exp(s - lse.to(acc).unsqueeze(-1)).nan_to_num(0.0)
    dv = probs.transpose(-1, -2) @ dof
    ds = probs * (dof @ vf.transpose(-1, -2) - (dof * out.to(acc)).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
