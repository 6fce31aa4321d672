"""The public op and whole models on the ``cpp`` backend (the C++ extension's CPU kernels).

The kernels themselves are tested against the references in ``tests/kernels/``; here the op's
registration, autograd and dispatch are exercised with ``backend="cpp"``, and whole models
against the naive VPT and the ``torch`` backend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, images, make_prompts, make_qkv, tiny_vit

import fastprompt
from fastprompt.backends import get
from fastprompt.ops import attention as op_module
from fastprompt.ops import prompt_attention, prompt_attention_ref

_WHY = get("cpp").availability("cpu")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpp backend: {_WHY}")
NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v")


@pytest.mark.parametrize("indexed", [False, True])
def test_op_on_cpp_matches_reference(indexed):
    q, k, v = make_qkv(3, 2, 19, 32, non_contiguous=True)
    t = 3 if indexed else 1
    pk, pv = make_prompts(t, 2, 7, 32)
    index = torch.tensor([2, 0, 2]) if indexed else None
    lengths = torch.tensor([7, 0, 3]) if indexed else None
    dout = torch.randn(3, 2, 19, 32)
    results = []
    for fn, kw in ((prompt_attention, {"backend": "cpp"}), (prompt_attention_ref, {})):
        tensors = [x.detach().clone().requires_grad_() for x in (q, k, v, pk, pv)]
        out, lse = fn(*tensors, index, lengths, **kw)
        results.append((out, lse, *torch.autograd.grad(out, tensors, dout)))
    for name, a, e in zip(NAMES, *results):
        assert_close(a, e, name, atol=1e-4, rtol=1e-4)


def test_opcheck_on_the_cpp_backend():
    q, k, v = make_qkv(2, 2, 5, 16)
    pk, pv = make_prompts(2, 2, 3, 16)
    index, lengths = torch.tensor([1, 0]), torch.tensor([3, 2])
    fwd = (q, k, v, pk, pv, index, lengths, 0.25, "cpp")
    torch.library.opcheck(op_module._prompt_attention_op, fwd)
    out, lse = op_module._prompt_attention_op(*fwd)
    bwd = (torch.randn_like(q), q, k, v, pk, pv, index, lengths, out, lse, 0.25, "cpp")
    torch.library.opcheck(op_module._prompt_attention_backward_op, bwd)


def test_vpt_on_cpp_matches_naive_vpt():
    from helpers import assert_matches_naive

    prompted = fastprompt.vpt(tiny_vit(), 5, dropout=0.2, backend="cpp").train()
    assert_matches_naive(prompted, images(3))


@pytest.mark.parametrize("method", ["taylor", "taylor_normed", "gate"])
def test_scoring_on_cpp_matches_torch(method):
    x, y = images(3), torch.tensor([1, 3, 0])
    scores = {}
    for backend in ("cpp", "torch"):
        torch.manual_seed(0)
        prompted = fastprompt.vpt(tiny_vit(), 5, backend=backend)
        scores[backend] = fastprompt.score_prompts(prompted, [(x, y)], method, progress=False)
    scale = scores["torch"].abs().max()
    assert_close(scores["cpp"] / scale, scores["torch"] / scale, method, atol=1e-5, rtol=1e-4)
