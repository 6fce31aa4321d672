"""The C++/CUDA extension's fused Prompt Condensation scores, its schemas (``opcheck``,
``torch.compile``), its errors, and its CUDA path on a GPU.

Both paths (:mod:`cpp_paths`): the CPU kernels, and the cascade (the CUDA path's orchestration)
on CPU tensors. The cascade's scores come out of a prompt-part backward whose head dim is padded
by 8 (the gate is a column of dK); these tests are where that is checked against the reference.
"""

from __future__ import annotations

import pytest
import torch
from cpp_paths import NAMES, PATHS, CppPath, ext, require_extension, run
from helpers import assert_close, assert_close_vs_ref, make_prompts, make_qkv

from fastprompt.kernels import cpp
from fastprompt.ops.attention import prompt_attention_ref
from fastprompt.ops.scores import prompt_scores_ref


@pytest.fixture(scope="module", autouse=True)
def extension():
    require_extension()


def _reference_scores(q, k, v, pk, pv, index, lengths, u_k, u_v, dout, scale, key_bias=None):
    """Per-sequence prompt gradients by autograd on per-sequence copies, then prompt_scores_ref."""
    b = q.shape[0]
    seq = torch.zeros(b, dtype=torch.long) if index is None else index.long()
    pk_seq = pk[seq].clone().requires_grad_()
    pv_seq = pv[seq].clone().requires_grad_()
    lens_seq = None if lengths is None else lengths[seq]
    out, lse = prompt_attention_ref(
        q, k, v, pk_seq, pv_seq, torch.arange(b), lens_seq, scale, key_bias=key_bias
    )
    gk, gv = torch.autograd.grad(out, (pk_seq, pv_seq), dout)
    delta = (dout * out).sum(-1)
    return prompt_scores_ref(q, pk, pv, lse, delta, gk, gv, u_k, u_v, scale, index, lengths)


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_scored_backward_matches_reference(indexed, with_lengths, path):
    _check_scored(CppPath(path), indexed, with_lengths, key_bias=None)


@pytest.mark.parametrize("path", PATHS)
def test_scored_backward_with_a_key_bias_matches_reference(path):
    """Swin's condensation: the scores through windows whose image keys carry a bias."""
    bias = torch.randn(1, 2, 21, 21, generator=torch.Generator().manual_seed(2))
    _check_scored(CppPath(path), True, True, key_bias=bias)


def _check_scored(fns, indexed, with_lengths, key_bias):
    b, h, n, d, p = 3, 2, 21, 32, 7
    t = 2 if indexed else 1
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(t, h, p, d)
    g = torch.Generator().manual_seed(5)
    u_k, u_v = (torch.randn(2, t, h, p, d, generator=g) for _ in range(2))
    index = torch.tensor([1, 0, 1]) if indexed else None
    lengths = (torch.tensor([7, 4]) if indexed else torch.tensor([5])) if with_lengths else None
    dout = torch.randn(b, h, n, d)
    scale = d**-0.5
    terms, gate = _reference_scores(
        q, k, v, pk, pv, index, lengths, u_k, u_v, dout, scale, key_bias
    )
    out, lse = fns.fwd(q, k, v, pk, pv, index, lengths, scale, key_bias)
    res = fns.scored(dout, q, k, v, pk, pv, index, lengths, out, lse, scale, u_k, u_v, key_bias)
    assert len(res) == 7
    assert_close(res[5], terms, "terms", atol=1e-4, rtol=1e-4)
    assert_close(res[6], gate, "gate", atol=1e-4, rtol=1e-4)
    plain = fns.bwd(dout, q, k, v, pk, pv, index, lengths, out, lse, scale, key_bias)
    for name, a, e in zip(NAMES[2:], res[:5], plain):
        assert_close(a, e, name, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("path", PATHS)
def test_scores_without_vectors_give_only_the_gate(path):
    fns = CppPath(path)
    q, k, v = make_qkv(2, 2, 11, 16)
    pk, pv = make_prompts(1, 2, 4, 16)
    dout = torch.randn(2, 2, 11, 16)
    u0 = torch.zeros(0, 1, 2, 4, 16)
    _, gate = _reference_scores(q, k, v, pk, pv, None, None, u0, u0, dout, 0.25)
    out, lse = fns.fwd(q, k, v, pk, pv, None, None, 0.25)
    res = fns.scored(dout, q, k, v, pk, pv, None, None, out, lse, 0.25, u0, u0)
    assert res[5].shape == (0, 2, 4)
    assert_close(res[6], gate, "gate", atol=1e-4, rtol=1e-4)
    plain = CppPath(path)._bwd(dout, q, k, v, pk, pv, None, None, out, lse, 0.25, None, None)
    assert plain[5].shape == (0, 2, 4) and plain[6].abs().max() == 0  # not asked for: zero


@pytest.mark.parametrize("path", PATHS)
def test_scores_at_scale_zero(path):
    """scale = 0 (uniform attention): the cascade cannot divide the gate column by the scale and
    runs the padded part with q = 0 and scale 1 instead."""
    fns = CppPath(path)
    q, k, v = make_qkv(3, 2, 9, 16)
    pk, pv = make_prompts(2, 2, 5, 16)
    index = torch.tensor([1, 0, 1])
    u = torch.randn(1, 2, 2, 5, 16)
    dout = torch.randn(3, 2, 9, 16)
    terms, gate = _reference_scores(q, k, v, pk, pv, index, None, u, u, dout, 0.0)
    out, lse = fns.fwd(q, k, v, pk, pv, index, None, 0.0)
    res = fns.scored(dout, q, k, v, pk, pv, index, None, out, lse, 0.0, u, u)
    assert_close(res[5], terms, "terms", atol=1e-4, rtol=1e-4)
    assert_close(res[6], gate, "gate", atol=1e-4, rtol=1e-4)
    assert res[0].abs().max() == 0  # dq: no score depends on q


def _pytorch_same_dtype_scores(q, k, v, pk, pv, index, u, dout, scale):
    """PyTorch's own computation in the input dtype (cat + attention with its matmuls in that
    dtype, as flash-attention's rule means it), then the score formula on its gradients.

    Not :func:`_reference_scores` on low-precision inputs: the reference upcasts to fp32, so its
    error is one final rounding and no kernel in that dtype could come within 3x of it."""
    pk_seq, pv_seq = pk[index].clone().requires_grad_(), pv[index].clone().requires_grad_()
    keys, values = torch.cat([pk_seq, k], 2), torch.cat([pv_seq, v], 2)
    s = (q @ keys.transpose(-1, -2)) * scale
    out = torch.softmax(s.float(), -1).to(q.dtype) @ values
    gk, gv = torch.autograd.grad(out, (pk_seq, pv_seq), dout)
    lse = torch.logsumexp(s.float(), -1)
    delta = (dout.float() * out.float()).sum(-1)
    return prompt_scores_ref(q, pk, pv, lse, delta, gk, gv, u, u, scale, index, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_half_precision_scores_within_pytorchs_error(dtype, path):
    """The scores from low-precision inputs against the fp32 reference, within 3x the error of the
    same computation from PyTorch's same-dtype attention."""
    fns = CppPath(path)
    b, h, n, d, t, p = 3, 2, 33, 64, 2, 20
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(t, h, p, d)
    index = torch.tensor([1, 0, 1])
    g = torch.Generator().manual_seed(11)
    u = torch.randn(2, t, h, p, d, generator=g)
    dout = torch.randn(b, h, n, d, generator=g)
    low = [x.to(dtype) for x in (q, k, v, pk, pv, dout)]
    ref = _reference_scores(*[x.float() for x in low[:5]], index, None, u, u, low[5].float(), 0.125)
    q_, k_, v_, pk_, pv_, dout_ = low
    same = _pytorch_same_dtype_scores(q_, k_, v_, pk_, pv_, index, u, dout_, 0.125)
    out, lse = fns.fwd(q_, k_, v_, pk_, pv_, index, None, 0.125)
    res = fns.scored(dout_, q_, k_, v_, pk_, pv_, index, None, out, lse, 0.125, u, u)
    for name, got, e, base in zip(("terms", "gate"), res[5:], ref, same):
        assert_close_vs_ref(got, e, base, name, factor=3.0)


# ----------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, error messages
# ----------------------------------------------------------------------------------------------


def _small_args():
    q, k, v = make_qkv(2, 2, 5, 8, non_contiguous=True)
    pk, pv = make_prompts(2, 2, 3, 8)
    index, lengths = torch.tensor([1, 0]), torch.tensor([3, 1])
    return q, k, v, pk, pv, index, lengths


@pytest.mark.parametrize("prefix", ["prompt_attention", "cascade_attention"])
def test_opcheck_every_schema(prefix):
    fwd = getattr(torch.ops.fastprompt_ext, f"{prefix}_fwd")
    bwd = getattr(torch.ops.fastprompt_ext, f"{prefix}_bwd")
    q, k, v, pk, pv, index, lengths = _small_args()
    out, lse = fwd(q, k, v, pk, pv, index, lengths, 0.3)
    dout = torch.randn(2, 2, 5, 8)
    u = torch.randn(2, 2, 2, 3, 8)
    torch.library.opcheck(fwd, (q, k, v, pk, pv, index, lengths, 0.3))
    torch.library.opcheck(fwd, (q, k, v, pk[:1], pv[:1], None, None, 0.3))
    bwd_args = (dout, q, k, v, pk, pv, index, lengths, out, lse, 0.3)
    torch.library.opcheck(bwd, (*bwd_args, None, None))
    torch.library.opcheck(bwd, (*bwd_args, u, u))
    bias = torch.randn(1, 2, 5, 5)
    torch.library.opcheck(fwd, (q, k, v, pk, pv, index, lengths, 0.3, bias))
    torch.library.opcheck(bwd, (*bwd_args, u, u, bias))


def test_torch_compile_fullgraph_traces_the_ops():
    ops = torch.ops.fastprompt_ext
    q, k, v, pk, pv, index, lengths = _small_args()
    dout = torch.randn(2, 2, 5, 8)

    def step(q, k, v, pk, pv, index, lengths, dout):
        out, lse = ops.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, 0.3)
        grads = ops.cascade_attention_bwd(
            dout, q, k, v, pk, pv, index, lengths, out, lse, 0.3, None, None
        )
        return out * 2, lse, grads[0], grads[3]

    args = (q, k, v, pk, pv, index, lengths, dout)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for name, a, e in zip(("out", "lse", "dq", "dprompt_k"), compiled(*args), step(*args)):
        assert_close(a, e, name, atol=0, rtol=0)


def test_torch_compile_fullgraph_with_autograd():
    q, k, v, pk, pv, index, lengths = _small_args()
    inputs = [t.requires_grad_() for t in (q.detach(), k.detach(), v.detach(), pk, pv)]

    def fn(*a):
        return ext(*a, index, lengths)[0]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_grads = torch.autograd.grad(fn(*inputs).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, "grad", atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(index=torch.tensor([0, 5])), r"prompt_index values must lie in \[0, 2\)"),
        (dict(index=torch.tensor([0, -1])), r"prompt_index values must lie in \[0, 2\)"),
        (dict(index=torch.tensor([0.0, 1.0])), "prompt_index must be int32 or int64"),
        (dict(lengths=torch.tensor([9, 1])), r"prompt_lengths values must lie in \[0, 3\]"),
        (dict(lengths=torch.tensor([-1, 1])), r"prompt_lengths values must lie in \[0, 3\]"),
        (dict(pk=torch.randn(2, 2, 3, 4)), "differ"),
        (dict(q=torch.randn(2, 2, 5, 8, dtype=torch.float64)), "q must be float32, bfloat16"),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_bad_inputs_name_the_argument_and_leave_the_process_usable(change, match, path):
    fns = CppPath(path)
    q, k, v, pk, pv, index, lengths = _small_args()
    args = dict(q=q, k=k, v=v, pk=pk, pv=pv, index=index, lengths=lengths) | change
    order = ("q", "k", "v", "pk", "pv", "index", "lengths")
    with pytest.raises(RuntimeError, match=match):
        fns.fwd(*(args[n] for n in order), 0.3)
    out, _ = fns.fwd(q, k, v, pk, pv, index, lengths, 0.3)  # recoverable: the next call works
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# On a GPU: the CUDA path (the cascade over PyTorch's fused kernels)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_path_matches_triton_and_reference(dtype):
    """The CUDA path against the Triton backend (both against the fp32 reference)."""
    assert cpp.device_availability("cuda") is None, cpp.device_availability("cuda")
    from fastprompt.ops import prompt_attention

    b, h, n, d, t, p = 4, 6, 197, 64, 2, 50
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True, device="cuda")
    pk, pv = make_prompts(t, h, p, d, device="cuda")
    dout = torch.randn(b, h, n, d, device="cuda")
    index = torch.tensor([0, 1, 1, 0], device="cuda")
    low = [x.to(dtype) for x in (q, k, v, pk, pv)]
    ref = run(
        lambda *a: prompt_attention_ref(*a, index), [x.float() for x in low], dout.to(dtype).float()
    )
    got = run(lambda *a: ext(*a, index), low, dout.to(dtype))
    tri = run(lambda *a: prompt_attention(*a, index, backend="triton"), low, dout.to(dtype))
    for i, name in enumerate(NAMES):
        if dtype == torch.float32:
            assert_close(got[i], ref[i], name, atol=1e-4, rtol=1e-4)
        else:
            assert_close_vs_ref(got[i], ref[i], tri[i], name, factor=2.0 if i < 2 else 3.0)


@pytest.mark.gpu
def test_cuda_prompt_gradients_are_deterministic_and_scores_match_cpu():
    b, h, n, d, t, p = 6, 4, 97, 64, 3, 50
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(t, h, p, d)
    index, lengths = torch.tensor([0, 2, 1, 1, 0, 2]), torch.tensor([50, 20, 7])
    u = torch.randn(2, t, h, p, d)
    dout = torch.randn(b, h, n, d)
    args = (q, k, v, pk, pv, index, lengths)

    def scored(device):
        a = [x.to(device) for x in args]
        out, lse = cpp.prompt_attention_fwd(*a, 0.125)
        uk = u.to(device)
        grads = cpp.prompt_attention_bwd_scored(dout.to(device), *a, out, lse, 0.125, uk, uk)
        return (out, lse, *grads)

    first, second, on_cpu = scored("cuda"), scored("cuda"), scored("cpu")
    for i, name in enumerate(("out", "lse", *NAMES[2:], "terms", "gate")):
        if name in ("out", "lse", "dprompt_k", "dprompt_v", "terms", "gate"):
            assert torch.equal(first[i], second[i]), name
        assert_close(first[i].cpu(), on_cpu[i], name, atol=1e-4, rtol=1e-4)


_BAD_INDEX = """
import torch
from fastprompt.kernels import cpp
q, k, v = (torch.randn(2, 2, 5, 8, device="cuda") for _ in range(3))
pk, pv = (torch.randn(2, 2, 3, 8, device="cuda") for _ in range(2))
cpp.prompt_attention_fwd(q, k, v, pk, pv, torch.tensor([0, 7], device="cuda"), None, 0.3)
torch.cuda.synchronize()
print("NOT STOPPED")
"""


@pytest.mark.gpu
def test_cuda_bad_index_stops_the_stream_without_a_host_sync():
    """An out-of-range set index is asserted on the device (as the Python check does): no value
    is read back to the host, and the bad index is never used. The assertion ends the process's
    CUDA context, so the call runs in a process of its own."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _BAD_INDEX], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "NOT STOPPED" not in done.stdout
    assert "assert" in done.stderr.lower(), done.stderr[-2000:]


@pytest.mark.gpu
def test_cuda_batch_beyond_the_grid_z_limit():
    """B > 65,535 sequences (the old kernels put B on grid axis z and failed to launch)."""
    b, h, n, d = 70_000, 1, 3, 8
    q, k, v = make_qkv(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    pk, pv = make_prompts(b, h, 2, d, device="cuda", dtype=torch.bfloat16)
    index = torch.arange(b, device="cuda")
    out, lse = cpp.prompt_attention_fwd(q, k, v, pk, pv, index, None, 0.3)
    ref_out, ref_lse = prompt_attention_ref(q, k, v, pk, pv, index, scale=0.3)
    assert_close(out.float(), ref_out.float(), "out", atol=2e-2, rtol=2e-2)
    assert_close(lse, ref_lse, "lse", atol=2e-2, rtol=2e-2)
