"""Triton prompt attention against the fp32 reference.

Without CUDA these run under TRITON_INTERPRET=1 (set by conftest.py) on small shapes; ``gpu`` tests
check fp16/bf16 accuracy against PyTorch's own same-dtype error, larger shapes and determinism.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_close_vs_ref, make_prompts, make_qkv

from fastprompt.ops import prompt_attention, prompt_attention_ref

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v")


def _run(fn, tensors, dout, **kw):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*tensors, **kw)
    return (out, lse, *torch.autograd.grad(out, tensors, dout))


def _check(b, h, n, d, t, p, index=None, lengths=None, dtype=torch.float32):
    q, k, v = make_qkv(b, h, n, d, dtype=dtype, non_contiguous=True, device=DEVICE)
    pk, pv = make_prompts(t, h, p, d, dtype=dtype, device=DEVICE)
    dout = torch.randn(b, h, n, d, device=DEVICE, dtype=dtype)
    kw = dict(prompt_index=index, prompt_lengths=lengths)
    got = _run(prompt_attention, (q, k, v, pk, pv), dout, backend="triton", **kw)
    ref = _run(prompt_attention_ref, (q, k, v, pk, pv), dout, **kw)
    return got, ref


def _pytorch_same_dtype(q, k, v, pk, pv, prompt_index=None):
    """PyTorch's own computation in the input dtype: cat + SDPA (and logsumexp for lse)."""
    index = (
        torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        if prompt_index is None
        else prompt_index
    )
    keys, values = torch.cat([pk[index], k], 2), torch.cat([pv[index], v], 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
    lse = torch.logsumexp((q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1)
    return out, lse


# (B, H, N, d, T, P): odd N, P in {0, 1, 7, 33}, head dims 32 and 64.
SHAPES = [(2, 2, 37, 32, 1, 0), (1, 2, 37, 32, 1, 1), (2, 1, 21, 64, 1, 7), (1, 1, 50, 32, 1, 33)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}d{}T{}P{}".format(*s))
def test_shared_set_matches_reference(shape):
    got, ref = _check(*shape)
    for name, a, e in zip(NAMES, got, ref):
        assert_close(a, e, name, atol=1e-4, rtol=1e-4)


def test_indexed_sets_with_lengths_match_reference():
    index = torch.tensor([2, 0, 2], device=DEVICE)
    lengths = torch.tensor([7, 0, 3], device=DEVICE)
    got, ref = _check(3, 1, 19, 32, 3, 7, index=index, lengths=lengths)
    for name, a, e in zip(NAMES, got, ref):
        assert_close(a, e, name, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_half_precision_error_within_twice_pytorchs(dtype, d):
    b, h, n, t, p = 4, 6, 197, 2, 50
    q, k, v = make_qkv(b, h, n, d, dtype=torch.float32, non_contiguous=True, device="cuda")
    pk, pv = make_prompts(t, h, p, d, device="cuda")
    dout = torch.randn(b, h, n, d, device="cuda")
    index = torch.tensor([0, 1, 1, 0], device="cuda")
    ref = _run(prompt_attention_ref, (q, k, v, pk, pv), dout, prompt_index=index)
    low = [x.to(dtype) for x in (q, k, v, pk, pv)]
    got = _run(prompt_attention, low, dout.to(dtype), prompt_index=index, backend="triton")
    same = _run(_pytorch_same_dtype, low, dout.to(dtype), prompt_index=index)
    for i, name in enumerate(NAMES):
        assert_close_vs_ref(got[i], ref[i], same[i], name, factor=2.0 if i < 2 else 3.0)


@pytest.mark.gpu
def test_backward_is_deterministic_on_gpu():
    q, k, v = make_qkv(8, 12, 197, 64, device="cuda", dtype=torch.bfloat16)
    pk, pv = make_prompts(3, 12, 200, 64, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, 3, (8,), device="cuda")
    dout = torch.randn_like(q)
    first = _run(prompt_attention, (q, k, v, pk, pv), dout, prompt_index=index, backend="triton")
    second = _run(prompt_attention, (q, k, v, pk, pv), dout, prompt_index=index, backend="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_dispatch_picks_triton_on_cuda():
    from fastprompt import backends

    call = backends.Call(torch.device("cuda"), torch.float16, 64)
    assert backends.choose("prompt_attention", call).name == "triton"


def test_vpt_on_the_triton_backend_matches_naive_vpt():
    from helpers import images, tiny_vit

    import fastprompt

    prompted = fastprompt.vpt(tiny_vit(embed_dim=128, num_heads=4), 5, backend="triton").train()
    naive = fastprompt.vpt(tiny_vit(embed_dim=128, num_heads=4), 5, impl="naive").train()
    naive.load_state_dict(prompted.state_dict())
    x = images(2)
    a, b = prompted(x), naive(x)
    ga = torch.autograd.grad(a.sum(), prompted.deep_prompt_embeddings)[0]
    gb = torch.autograd.grad(b.sum(), naive.deep_prompt_embeddings)[0]
    assert_close(a, b, "logits", atol=1e-4, rtol=1e-4)
    assert_close(ga, gb, "grad deep prompts", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("indexed", [False, True])
def test_score_epilogue_matches_reference_scores(indexed):
    from fastprompt.ops.scores import scored_prompt_attention

    b, h, n, d, p = 3, 2, 21, 32, 7
    t = 2 if indexed else 1
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True, device=DEVICE)
    pk, pv = make_prompts(t, h, p, d, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    u_k, u_v = (torch.randn(2, t, h, p, d, generator=g).to(DEVICE) for _ in range(2))
    index = torch.tensor([1, 0, 1], device=DEVICE) if indexed else None
    dout = torch.randn(b, h, n, d, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        got = {}
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, pk, pv)]
        out, _ = scored_prompt_attention(
            *inputs,
            u_k,
            u_v,
            lambda terms, gate, got=got: got.update(terms=terms, gate=gate),
            prompt_index=index,
            backend=backend,
        )
        grads = torch.autograd.grad(out, inputs, dout)
        results[backend] = (got["terms"], got["gate"], *grads)
    names = ("terms", "gate", "dq", "dk", "dv", "dprompt_k", "dprompt_v")
    for name, a, e in zip(names, results["triton"], results["torch"]):
        assert_close(a, e, name, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["taylor_normed", "gate"])
def test_scoring_a_model_on_triton_matches_torch(method):
    from helpers import images, tiny_vit

    import fastprompt

    x, y = images(2), torch.tensor([1, 3])
    scores = {}
    for backend in ("triton", "torch"):
        prompted = fastprompt.vpt(tiny_vit(embed_dim=128, num_heads=4), 5, backend=backend)
        scores[backend] = fastprompt.score_prompts(prompted, [(x, y)], method, progress=False)
    scale = scores["torch"].abs().max()
    assert_close(scores["triton"] / scale, scores["torch"] / scale, method, atol=1e-4, rtol=1e-3)


def test_opcheck_on_the_triton_backend():
    from fastprompt.ops import attention as op_module

    q, k, v = make_qkv(2, 1, 5, 16, device=DEVICE)
    pk, pv = make_prompts(2, 1, 3, 16, device=DEVICE)
    index = torch.tensor([1, 0], device=DEVICE)
    lengths = torch.tensor([3, 2], device=DEVICE)
    fwd_args = (q, k, v, pk, pv, index, lengths, 0.25, "triton")
    torch.library.opcheck(op_module._prompt_attention_op, fwd_args)
    out, lse = op_module._prompt_attention_op(*fwd_args)
    bwd_args = (torch.randn_like(q), q, k, v, pk, pv, index, lengths, out, lse, 0.25, "triton")
    torch.library.opcheck(op_module._prompt_attention_backward_op, bwd_args)
