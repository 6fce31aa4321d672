"""The input checks of the prompt-attention ops: shapes, dtypes and devices, the key bias, the
prompt index and lengths (without a host synchronisation), the scale. Every entry
(:func:`fastprompt.ops.prompt_attention`, the scored attention of :mod:`fastprompt.ops.scores`)
runs them before choosing a backend, so each backend can assume them (``docs/design.md``
section 5).
"""

from __future__ import annotations

import math
import numbers
import operator
import weakref

import torch
from torch import Tensor

from fastprompt._compat import tracing

__all__ = ["check_inputs", "check_scale"]


def check_scale(q: Tensor, scale: float | None) -> float:
    """``scale`` as a float (default ``d ** -0.5``); a non-finite one is refused (the backends'
    online softmaxes differ on it)."""
    if scale is None:
        # The head dim is a model's constant: specialised if torch.compile traces it symbolically.
        d = operator.index(q.shape[-1])
        if d == 0:
            raise ValueError(
                "prompt_attention: head dim 0 has no default scale (d ** -0.5); pass scale"
            )
        return float(d**-0.5)
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat)):
        raise TypeError(
            f"prompt_attention: scale must be a real number, got {type(scale).__name__}"
        )
    if tracing():
        # Under torch.compile(dynamic=True) a model's float is traced symbolically, with no value
        # to check (math.isfinite of it breaks the graph); eager calls check it.
        return scale
    if not math.isfinite(scale):
        raise ValueError(f"prompt_attention: scale must be finite, got {scale}")
    return float(scale)


def check_inputs(op, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, key_bias=None):
    """Raise a clear error for inputs the op cannot take; shared by every prompt-attention entry.

    Shapes are checked against what every backend assumes: k and v have their own row count N_k
    (the same for both), the batch, heads and head dim of q; the prompt table matches the heads
    and head dim. Index and length values are checked without a host sync: on the host for CPU
    tensors, by a device-side assertion (``torch._assert_async``) for others.
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
    b, h, n, d = q.shape
    if k.shape != v.shape:
        fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape (B, H, N_k, d)")
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        fail(
            f"k and v must be (B={b}, H={h}, N_k, d={d}) as q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if prompt_k.shape != prompt_v.shape:
        fail(f"prompt_k {tuple(prompt_k.shape)} and prompt_v {tuple(prompt_v.shape)} differ")
    t, hp, p, dp = prompt_k.shape
    if t < 1 or hp != h or dp != d:
        fail(f"prompt_k must be (T>=1, H={h}, P, d={d}), got {tuple(prompt_k.shape)}")
    _check_key_bias(op, key_bias, (b, h, n, k.shape[2]), q.device)
    _check_int_vector(op, "prompt_index", prompt_index, b, q.device, 0, t - 1, f"[0, {t})")
    _check_int_vector(op, "prompt_lengths", prompt_lengths, t, q.device, 0, p, f"[0, {p}]")


def _check_key_bias(op, key_bias, scores_shape, device) -> None:
    if key_bias is None:
        return
    if not isinstance(key_bias, Tensor):
        raise TypeError(f"{op}: key_bias must be a Tensor or None, got {type(key_bias).__name__}")
    if not key_bias.is_floating_point() or key_bias.device != device:
        raise ValueError(
            f"{op}: key_bias must be a floating-point tensor on {device}, got {key_bias.dtype} on "
            f"{key_bias.device}"
        )
    b, h, n, n_k = scores_shape
    four = key_bias.dim() == 4
    lead = key_bias.shape[0] if four else 1
    rows = key_bias.shape[1:] if four else key_bias.shape
    try:
        ok = key_bias.dim() <= 4 and torch.broadcast_shapes(rows, (h, n, n_k)) == (h, n, n_k)
    except RuntimeError:
        ok = False
    # Its first dimension broadcasts (1 or B) or repeats with a period G dividing B.
    ok = ok and (lead in (1, b) or (lead > 0 and b % lead == 0))
    if not ok:
        raise ValueError(
            f"{op}: key_bias {tuple(key_bias.shape)} must broadcast to (B={b}, H={h}, N={n}, "
            f"N_k={n_k}), its first dimension 1, B or a divisor of B"
        )
    if key_bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{op}: key_bias requires grad, but the op does not differentiate it (a frozen "
            "backbone's bias table); pass key_bias.detach()"
        )


# id(tensor) -> (weak reference, version, bounds) of CUDA index/length tensors already checked:
# a model reuses one per forward across its blocks, so the device-side check is launched once,
# not once per block. Writes that bypass the version counter (``.data``, DLPack) are not seen, so
# CPU tensors, which numpy may share (``torch.from_numpy``), are checked on every call: there
# the check is two reductions of a (B,) vector and no synchronisation. Inference tensors have no
# version counter: they are checked at every call too.
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
    if size == 0:
        return
    if torch.compiler.is_compiling():  # in the graph: reading the values back would break it
        torch._assert_async(
            ((t >= lo) & (t <= hi)).all(), f"{op}: {name} values must lie in {span}"
        )
        return
    if t.device.type == "cpu":
        got_lo, got_hi = int(t.min()), int(t.max())
        if got_lo < lo or got_hi > hi:
            raise ValueError(f"{op}: {name} values must lie in {span}, got [{got_lo}, {got_hi}]")
        return
    inference = t.is_inference()
    if inference or not _already_checked(t, lo, hi):
        # Two tiny reductions and a device-side assert: no host sync in the hot path; a bad value
        # stops the stream with this message instead of reading out of bounds.
        torch._assert_async(
            ((t >= lo) & (t <= hi)).all(), f"{op}: {name} values must lie in {span}"
        )
        if not inference:
            _mark_checked(t, lo, hi)
