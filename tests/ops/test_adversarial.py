"""Adversarial layouts and values through the public op, on every backend that runs here.

The conformance suite (``test_conformance.py``) feeds each backend well-formed tensors; these
feed it what the op's contract also allows: strided index and length vectors, stride-0
(expanded) and overlapping inputs, a head dim that is not unit-stride, expanded upstream
gradients, every broadcast shape of the key bias, extreme scales. The gradients are taken
with respect to dense leaves from which the strided inputs are views, so that each backend sees
the strides themselves (a clone would make them dense).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from test_conformance import _needs, _pytorch_same_dtype, _runnable, _tol

from fastprompt import backends
from fastprompt.ops import prompt_attention, prompt_attention_ref

B, H, N, D, P = 2, 2, 9, 16, 5


@pytest.fixture(params=backends.NAMES)
def backend(request) -> backends.Backend:
    return backends.get(request.param)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _dense():
    """Leaves: q, k, v (B, H, N, d), a table of 3 prompt sets."""
    return [_randn(B, H, N, D, seed=i) for i in range(3)] + [
        _randn(3, H, P, D, seed=3 + i) for i in range(2)
    ]


def _outputs(fn, leaves, build, dout, **kw):
    mine = [x.detach().clone().requires_grad_() for x in leaves]
    out, lse = fn(*build(*mine), **kw)
    grads = torch.autograd.grad(out, mine, dout.to(out.dtype), allow_unused=True)
    return [out, lse, *(torch.zeros_like(x) if g is None else g for g, x in zip(grads, mine))]


def _compare(backend, leaves, build, dout, **kw):
    """Out, lse and the gradients of ``leaves`` through ``build`` on ``backend`` and in the
    reference."""
    got = _outputs(lambda *a, **k: prompt_attention(*a, backend=backend.name, **k), leaves,
                   build, dout, **kw)  # fmt: skip
    ref = _outputs(prompt_attention_ref, leaves, build, dout, **kw)
    for i, (a, e) in enumerate(zip(got, ref)):
        assert torch.equal(torch.isfinite(a), torch.isfinite(e)), f"output {i}: non-finite"
        assert_close(a.nan_to_num(0, 0, 0), e.nan_to_num(0, 0, 0), f"output {i}", **_tol(backend))


def test_strided_index_and_lengths(backend):
    """A column of a table as ``prompt_index`` and every other entry of a vector as
    ``prompt_lengths``: the Triton kernels read them as if contiguous (other sequences' sets)."""
    _runnable(backend, "cpu")
    _needs(backend, "prompt_index", "prompt_lengths")
    index = torch.tensor([[2, 0], [1, 1]])[:, 0]
    lengths = torch.tensor([0, 9, 5, 9, 3, 9])[::2]
    assert index.stride() == (2,) and lengths.stride() == (2,)

    def build(q, k, v, pk, pv):
        return q, k, v, pk, pv

    dout = _randn(B, H, N, D, seed=9)
    _compare(backend, _dense(), build, dout, prompt_index=index, prompt_lengths=lengths)


def _expanded(q, k, v, pk, pv):
    # q shared by the batch, k constant over keys, v over heads, a prompt set over heads
    return (
        q[:1].expand(B, -1, -1, -1),
        k[:, :, :1].expand(-1, -1, N, -1),
        v[:, :1].expand(-1, H, -1, -1),
        pk[:1, :1].expand(1, H, -1, -1),
        pv[:1],
    )


def _overlapping(q, k, v, pk, pv):
    # Rows 4 elements apart with d = 16: each row shares 12 values with the next; k is v.
    def rows(t):
        flat = t.reshape(-1)
        return flat.as_strided((B, H, N, D), (H * N * 4, N * 4, 4, 1))

    return rows(q), rows(k), rows(k), pk[:1], pv[:1]


def _feature_strided(q, k, v, pk, pv):
    # The head dim with a stride of N (or P): (.., d, N) storage read transposed.
    def t(x, n):
        return x.reshape(*x.shape[:2], D, n).transpose(-1, -2)

    return t(q, N), t(k, N), v, t(pk[:1], P), pv[:1]


@pytest.mark.parametrize(
    "layout, dout",
    [
        (_expanded, "expanded"),
        (_overlapping, "dense"),
        (_feature_strided, "feature-strided"),
    ],
    ids=["expanded", "overlapping", "feature-strided"],
)
def test_strided_expanded_and_overlapping_inputs(backend, layout, dout):
    _runnable(backend, "cpu")
    grad = {
        "expanded": torch.ones(1, 1, 1, 1).expand(B, H, N, D),  # what out.sum() hands back
        "dense": _randn(B, H, N, D, seed=9),
        "feature-strided": _randn(B, H, D, N, seed=9).transpose(-1, -2),
    }[dout]
    _compare(backend, _dense(), layout, grad)


@pytest.mark.parametrize(
    "shape",
    [(H, N, N), (N, N), (1, 1, 1, N), (B, H, N, 1), (N,), "period-transposed", "period-expanded"],
    ids=str,
)
def test_every_key_bias_broadcast(backend, shape):
    _runnable(backend, "cpu")
    _needs(backend, "key_bias")
    b = 4  # a period of 2 windows over 4 sequences
    if shape == "period-transposed":
        bias = _randn(2, H, N, N, seed=7).transpose(-1, -2)
    elif shape == "period-expanded":
        bias = _randn(2, 1, 1, N, seed=7).expand(2, H, N, N)
    else:
        bias = _randn(*shape, seed=7)
    leaves = [_randn(b, H, N, D, seed=i) for i in range(3)] + [_randn(1, H, P, D, seed=3)] * 2

    def build(*xs):
        return xs

    _compare(backend, leaves, build, _randn(b, H, N, D, seed=9), key_bias=bias)


@pytest.mark.parametrize("scale", [0.0, -0.5, 1e-30, 5.0])
def test_zero_negative_tiny_and_large_scales(backend, scale):
    """Scale 0 (uniform attention), a negative scale (the Triton forward's max flips to a min),
    one that underflows every score, and a large one: each backend's error against a float64
    computation at most twice PyTorch's own fp32 error (SDPA over the concatenated keys, or the
    fp32 reference's if larger), plus a floor. Far larger scales (scores in the hundreds and
    more) are not held to it: the fp32 log-sum-exp a flash-style backward reads back is then
    off by ~|s|·2^-24, and `torch` (PyTorch's own CPU flash kernel) and `triton` miss the rule
    by 10-40x at scale 40, all four backends by ~1e-3 absolute at 1000."""
    _runnable(backend, "cpu")

    def build(q, k, v, pk, pv):
        return q, k, v, pk[:1], pv[:1]

    def pytorch(q, k, v, pk, pv, scale):
        return _pytorch_same_dtype(q * (scale * D**0.5), k, v, pk, pv, torch.zeros(B, dtype=int))

    dout = _randn(B, H, N, D, seed=9)
    got = _outputs(lambda *a, **k: prompt_attention(*a, backend=backend.name, **k), _dense(),
                   build, dout, scale=scale)  # fmt: skip
    same = _outputs(pytorch, _dense(), build, dout, scale=scale)
    ref32 = _outputs(prompt_attention_ref, _dense(), build, dout, scale=scale)
    wide = [x.double() for x in _dense()]
    ref64 = _outputs(prompt_attention_ref, wide, build, dout.double(), scale=scale)
    for i, (a, s, r, e) in enumerate(zip(got, same, ref32, ref64)):
        err, *base = ((x.double() - e).abs().max().item() for x in (a, s, r))
        assert err <= 2 * max(base) + 1e-5 * (1 + e.abs().max().item()), (
            f"output {i}: {err}, {base}"
        )
