"""What the C++ extension's tests share: the two paths under test and their autograd wrapper.

``kernels`` are the backend's own contract functions (on the CPU, the CPU kernels; on CUDA, the
cascade); ``cascade`` are the cascade's schemas, the CUDA path's orchestration, which runs on CPU
tensors over PyTorch's CPU flash kernel.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import assert_close

from fastprompt.kernels import cpp
from fastprompt.kernels.cpp import _build
from fastprompt.ops.attention import prompt_attention_ref

NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def require_extension() -> None:
    """Skip (saying why) where the extension cannot be built; fail where it should build."""
    missing = [
        what
        for what, ok in (
            ("a C++ compiler", _build.find_cxx() is not None),
            ("ninja", shutil.which("ninja") is not None),
            ("the csrc/ sources", _build.source_root() is not None),
        )
        if not ok
    ]
    if missing:
        pytest.skip(f"the extension cannot be built here: no {', '.join(missing)}")
    why = cpp.availability()
    assert why is None, why  # a compiler is there, so a failed build is a bug, not a skip


PATHS = ("kernels", "cascade")


class CppPath:
    """The contract functions of one path: the backend's own (``kernels``; on CUDA that is the
    cascade) or the cascade's schemas (``cascade``, the CUDA path's orchestration on any device)."""

    def __init__(self, name: str):
        self.name = name
        prefix = "prompt_attention" if name == "kernels" else "cascade_attention"
        self._fwd = getattr(torch.ops.fastprompt_ext, f"{prefix}_fwd")
        self._bwd = getattr(torch.ops.fastprompt_ext, f"{prefix}_bwd")

    def fwd(self, q, k, v, pk, pv, index, lengths, scale, key_bias=None):
        return self._fwd(q, k, v, pk, pv, index, lengths, float(scale), key_bias)

    def bwd(self, dout, q, k, v, pk, pv, index, lengths, out, lse, scale, key_bias=None):
        args = (dout, q, k, v, pk, pv, index, lengths, out, lse, float(scale))
        return tuple(self._bwd(*args, None, None, key_bias)[:5])

    def scored(
        self, dout, q, k, v, pk, pv, index, lengths, out, lse, scale, u_k, u_v, key_bias=None
    ):
        args = (dout, q, k, v, pk, pv, index, lengths, out, lse, float(scale))
        return tuple(self._bwd(*args, u_k, u_v, key_bias))


class PathAttention(torch.autograd.Function):
    """A path's contract functions under autograd, as the op will call them."""

    @staticmethod
    def forward(ctx, q, k, v, pk, pv, index, lengths, scale, path, key_bias):
        out, lse = path.fwd(q, k, v, pk, pv, index, lengths, scale, key_bias)
        ctx.save_for_backward(q, k, v, pk, pv, index, lengths, out, lse, key_bias)
        ctx.scale, ctx.path = scale, path
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, pk, pv, index, lengths, out, lse, key_bias = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = ctx.path.bwd(
            dout, q, k, v, pk, pv, index, lengths, out, lse, ctx.scale, key_bias
        )
        return dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype), None, None, None, None, None


def ext(q, k, v, pk, pv, index=None, lengths=None, path="kernels", key_bias=None):
    scale = q.shape[-1] ** -0.5
    return PathAttention.apply(q, k, v, pk, pv, index, lengths, scale, CppPath(path), key_bias)


def run(fn, tensors, dout, **kw):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*tensors, **kw)
    return (out, lse, *torch.autograd.grad(out, tensors, dout, allow_unused=True))


def compare(got, ref, atol=2e-5, rtol=2e-5):
    for name, a, e in zip(NAMES, got, ref):
        if e is None:  # P = 0: the reference's autograd reports no gradient for the prompts
            assert a.numel() == 0, name
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, name, atol=atol, rtol=rtol)


def against_reference(path, tensors, dout, index=None, lengths=None, key_bias=None):
    """(path's results, the fp32 reference's): out, lse and every gradient."""
    got = run(lambda *a: ext(*a, index, lengths, path=path, key_bias=key_bias), tensors, dout)
    ref = run(lambda *a: prompt_attention_ref(*a, index, lengths, key_bias=key_bias), tensors, dout)
    return got, ref
