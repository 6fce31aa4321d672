"""prompt_attention (torch backend) against its fp32 reference and against plain SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, make_prompts, make_qkv

from fastprompt.ops import attention as op_module
from fastprompt.ops import prompt_attention, prompt_attention_ref

# (B, H, N, d, T, P): odd N, P over {0, 1, 7, 50}.
SHAPES = [
    (2, 3, 197, 32, 1, 0),
    (2, 3, 197, 32, 1, 1),
    (3, 2, 13, 64, 1, 7),
    (2, 2, 197, 64, 1, 50),
    (1, 2, 5, 16, 1, 7),
]


def _grads(fn, tensors, dout):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*tensors)
    return (out, lse, *torch.autograd.grad(out, tensors, dout))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}d{}T{}P{}".format(*s))
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contig", "strided"])
def test_shared_set_matches_reference(shape, non_contiguous):
    b, h, n, d, t, p = shape
    q, k, v = make_qkv(b, h, n, d, non_contiguous=non_contiguous)
    pk, pv = make_prompts(t, h, p, d)
    dout = torch.randn(b, h, n, d)
    got = _grads(lambda *a: prompt_attention(*a, backend="torch"), (q, k, v, pk, pv), dout)
    ref = _grads(prompt_attention_ref, (q, k, v, pk, pv), dout)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v"), got, ref):
        assert_close(a, e, name)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_indexed_sets_with_lengths_match_reference(with_lengths):
    b, h, n, d, t, p = 5, 2, 197, 32, 3, 7
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(t, h, p, d)
    index = torch.tensor([2, 0, 2, 1, 2])
    lengths = torch.tensor([7, 0, 3]) if with_lengths else None
    dout = torch.randn(b, h, n, d)
    got = _grads(lambda *a: prompt_attention(*a, index, lengths), (q, k, v, pk, pv), dout)
    ref = _grads(lambda *a: prompt_attention_ref(*a, index, lengths), (q, k, v, pk, pv), dout)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v"), got, ref):
        assert_close(a, e, name)
    if with_lengths:
        # Keys past a set's length get no gradient.
        assert got[5][2, :, 3:].abs().max() == 0 and got[5][1].abs().max() == 0


def test_reference_equals_sdpa_on_concatenated_keys():
    """The reference is what VPT computes: SDPA over [prompts; image] keys."""
    q, k, v = make_qkv(2, 3, 11, 16)
    pk, pv = make_prompts(1, 3, 4, 16)
    out, lse = prompt_attention_ref(q, k, v, pk, pv)
    keys = torch.cat([pk.expand(2, -1, -1, -1), k], 2)
    values = torch.cat([pv.expand(2, -1, -1, -1), v], 2)
    assert_close(out, F.scaled_dot_product_attention(q, keys, values), "out")
    scores = q @ keys.transpose(-1, -2) / 4.0
    assert_close(lse, torch.logsumexp(scores, -1), "lse")


def test_zero_prompts_is_plain_attention():
    q, k, v = make_qkv(2, 2, 9, 16)
    pk, pv = make_prompts(1, 2, 0, 16)
    out, _ = prompt_attention(q, k, v, pk, pv)
    assert_close(out, F.scaled_dot_product_attention(q, k, v), "out")


def test_output_layout_merges_heads_without_copy():
    q, k, v = make_qkv(2, 3, 7, 16)
    pk, pv = make_prompts(1, 3, 2, 16)
    out, lse = prompt_attention(q, k, v, pk, pv)
    assert out.transpose(1, 2).is_contiguous() and lse.dtype == torch.float32


def test_gradcheck_float64():
    q, k, v = make_qkv(2, 2, 5, 8, dtype=torch.float64)
    pk, pv = make_prompts(2, 2, 3, 8, dtype=torch.float64)
    index, lengths = torch.tensor([1, 0]), torch.tensor([3, 2])
    inputs = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    assert torch.autograd.gradcheck(lambda *a: prompt_attention(*a, index, lengths)[0], inputs)


def test_backward_is_deterministic():
    q, k, v = make_qkv(4, 2, 31, 16)
    pk, pv = make_prompts(2, 2, 5, 16)
    index = torch.tensor([0, 1, 1, 0])
    dout = torch.randn(4, 2, 31, 16)
    first = _grads(lambda *a: prompt_attention(*a, index), (q, k, v, pk, pv), dout)
    second = _grads(lambda *a: prompt_attention(*a, index), (q, k, v, pk, pv), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_opcheck():
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(2, 2, 3, 8)
    args = (q, k, v, pk, pv, torch.tensor([1, 0]), torch.tensor([3, 1]), 0.3, "torch")
    torch.library.opcheck(op_module._prompt_attention_op, args)


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = make_qkv(2, 2, 9, 16)
    pk, pv = make_prompts(1, 2, 3, 16)
    inputs = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    compiled = torch.compile(lambda *a: prompt_attention(*a)[0], fullgraph=True, backend="eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_out = prompt_attention(*inputs)[0]
    ref_grads = torch.autograd.grad(ref_out.sum(), inputs)
    assert_close(out, ref_out, "out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, "grad")


def test_does_not_save_concatenated_keys():
    """Autograd keeps image q/k/v, the prompt set once, out and lse, nothing of size B·(P+N)."""
    b, h, n, d, p = 4, 2, 9, 16, 50
    q, k, v = (t.requires_grad_() for t in make_qkv(b, h, n, d))
    pk, pv = (t.requires_grad_() for t in make_prompts(1, h, p, d))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        prompt_attention(q, k, v, pk, pv)
    assert saved, "nothing saved for backward"
    assert all(t.shape[2:3] != (p + n,) for t in saved if t.dim() == 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_index=torch.tensor([0, 5])), "prompt_index values"),
        (dict(prompt_index=torch.tensor([0.0, 1.0])), "prompt_index must be an int"),
        (dict(prompt_lengths=torch.tensor([9])), "prompt_lengths values"),
        (dict(backend="nope"), "does not exist"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(1, 2, 3, 8)
    with pytest.raises(ValueError, match=match):
        prompt_attention(q, k, v, pk, pv, **kwargs)


def test_shape_and_dtype_mismatch_raise():
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(1, 2, 3, 16)
    with pytest.raises(ValueError, match="prompt_k must be"):
        prompt_attention(q, k, v, pk, pv)
    pk, pv = make_prompts(1, 2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="must match"):
        prompt_attention(q, k, v, pk, pv)


# -- an oracle that shares no code with the op: per-sequence SDPA with an explicit boolean mask ----


def _sdpa_oracle(q, k, v, pk, pv, index, lengths):
    outs = []
    for b in range(q.shape[0]):
        t = 0 if index is None else int(index[b])
        n_valid = pk.shape[2] if lengths is None else int(lengths[t])
        keys = torch.cat([pk[t, :, :n_valid], k[b]], 1).double()
        values = torch.cat([pv[t, :, :n_valid], v[b]], 1).double()
        mask = torch.ones(q.shape[2], keys.shape[1], dtype=torch.bool)
        outs.append(F.scaled_dot_product_attention(q[b].double(), keys, values, attn_mask=mask))
    return torch.stack(outs)


@pytest.mark.parametrize("case", ["shared", "indexed", "indexed+lengths", "shared+lengths"])
def test_index_and_lengths_against_an_independent_oracle(case):
    b, h, n, d, t, p = 4, 2, 11, 16, 3, 5
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(t, h, p, d)
    index = torch.tensor([2, 0, 1, 2]) if "indexed" in case else None
    lengths = torch.tensor([5, 0, 2]) if "lengths" in case else None
    expected = _sdpa_oracle(q, k, v, pk, pv, index, lengths)
    got, _ = prompt_attention(q, k, v, pk, pv, index, lengths)
    assert_close(got.double(), expected, "out", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "n, p", [(0, 3), (0, 0), (5, 0)], ids=["no-queries", "nothing", "no-prompts"]
)
@pytest.mark.parametrize("with_keys", [True, False], ids=["keys", "no-image-keys"])
def test_empty_shapes_do_not_crash(n, p, with_keys):
    q = torch.randn(2, 2, n, 8, requires_grad=True)
    kv_len = n if with_keys else 0
    k = torch.randn(2, 2, kv_len, 8, requires_grad=True)
    v = torch.randn(2, 2, kv_len, 8, requires_grad=True)
    pk, pv = (t.requires_grad_() for t in make_prompts(1, 2, p, 8))
    out, lse = prompt_attention(q, k, v, pk, pv)
    ref_out, _ = prompt_attention_ref(q, k, v, pk, pv)
    assert out.shape == (2, 2, n, 8) and lse.shape == (2, 2, n)
    assert_close(out, ref_out, "out")
    if n and kv_len + p == 0:  # a query without any key: zero output, lse -inf
        assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    grads = torch.autograd.grad(out.sum(), [q, k, v, pk, pv])
    assert all(torch.isfinite(g).all() for g in grads)


def _runnable_backends():
    from fastprompt import backends

    return [b.name for b in backends.BACKENDS if b.availability("cpu") is None]


@pytest.mark.parametrize("backend", _runnable_backends())
def test_masked_prompt_slots_never_influence_anything(backend):
    q, k, v = make_qkv(3, 2, 7, 16)
    pk, pv = make_prompts(2, 2, 4, 16)
    lengths, index = torch.tensor([2, 3]), torch.tensor([1, 0, 1])
    poisoned_k, poisoned_v = pk.clone(), pv.clone()
    poisoned_k[0, :, 2:], poisoned_v[0, :, 2:] = float("nan"), float("inf")
    poisoned_k[1, :, 3:], poisoned_v[1, :, 3:] = float("nan"), float("nan")
    dout = torch.randn(3, 2, 7, 16)
    got = _grads(
        lambda *a: prompt_attention(*a, index, lengths, backend=backend),
        (q, k, v, poisoned_k, poisoned_v),
        dout,
    )
    ref = _grads(lambda *a: prompt_attention_ref(*a, index, lengths), (q, k, v, pk, pv), dout)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v"), got, ref):
        assert_close(a, e, name)


def test_prompt_index_given_as_a_list_gets_a_clear_error():
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(2, 2, 3, 8)
    with pytest.raises(
        TypeError, match="prompt_index must be an int tensor of shape \\(2,\\) or None, got list"
    ):
        prompt_attention(q, k, v, pk, pv, [0, 1])


def test_opcheck_backward_op():
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(2, 2, 3, 8)
    index, lengths = torch.tensor([1, 0]), torch.tensor([3, 1])
    out, lse = prompt_attention(q, k, v, pk, pv, index, lengths)
    args = (torch.randn_like(q), q, k, v, pk, pv, index, lengths, out, lse, 0.3, "torch")
    torch.library.opcheck(op_module._prompt_attention_backward_op, args)


def test_backend_prompt_gradients_are_per_set_fp32_and_reduced_in_batch_order():
    """The contract: per-set sums of per-sequence fp32 gradients, bitwise reproducible."""
    from fastprompt.kernels.torch.prompt_attention import reduce_over_sets

    per_seq = torch.randn(6, 2, 3, 4, dtype=torch.float32)
    index = torch.tensor([2, 0, 2, 2, 0, 1])
    got = reduce_over_sets(per_seq, index, 4)
    expected = torch.stack([per_seq[index == t].sum(0) for t in range(4)])
    assert got.dtype == torch.float32 and torch.equal(got[3], torch.zeros(2, 3, 4))
    assert_close(got, expected, "per-set sums")
    assert torch.equal(got, reduce_over_sets(per_seq, index, 4))
