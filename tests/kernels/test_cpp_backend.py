"""The C++/CUDA extension backend (``csrc/``): what is particular to its kernels.

What every backend must do through the public op (shared / indexed / length-limited sets, strided
inputs, every gradient, the dtype rule, determinism, opcheck, compile) is the conformance suite,
``tests/ops/test_conformance.py``. Here: the contract functions on long key sets and empty cases,
bitwise reproducibility across processes, the score reduction, prompt packing, ``opcheck`` on
every low-level schema and ``torch.compile`` of the low-level ops. The CPU kernels run
everywhere a compiler is found (the module skips, saying why, only where the extension cannot be
built at all); ``gpu`` tests run the CUDA kernels when a device is present.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import assert_close, assert_close_vs_ref, make_prompts, make_qkv

from fastprompt.kernels import cpp
from fastprompt.kernels.cpp import _build
from fastprompt.ops.attention import prompt_attention_ref
from fastprompt.ops.gather import gather_prompts_ref
from fastprompt.ops.scores import prompt_scores_ref

NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module", autouse=True)
def extension():
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


class _Attention(torch.autograd.Function):
    """The contract functions under autograd, as the op will call them."""

    @staticmethod
    def forward(ctx, q, k, v, pk, pv, index, lengths, scale):
        out, lse = cpp.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, scale)
        ctx.save_for_backward(q, k, v, pk, pv, index, lengths, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, pk, pv, index, lengths, out, lse = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = cpp.prompt_attention_bwd(
            dout, q, k, v, pk, pv, index, lengths, out, lse, ctx.scale
        )
        return dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype), None, None, None


def _ext(q, k, v, pk, pv, index=None, lengths=None):
    return _Attention.apply(q, k, v, pk, pv, index, lengths, q.shape[-1] ** -0.5)


def _run(fn, tensors, dout, **kw):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*tensors, **kw)
    return (out, lse, *torch.autograd.grad(out, tensors, dout, allow_unused=True))


def _compare(got, ref, atol=2e-5, rtol=2e-5):
    for name, a, e in zip(NAMES, got, ref):
        if e is None:  # P = 0: the reference's autograd reports no gradient for the prompts
            assert a.numel() == 0, name
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, name, atol=atol, rtol=rtol)


def test_long_key_sets_span_several_key_groups():
    """More than 512 keys and rows: the online softmax merges blocks; int32 index, int64 lengths."""
    b, h, n, d, t, p = 2, 1, 530, 16, 2, 200
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(t, h, p, d)
    index, lengths = torch.tensor([1, 0], dtype=torch.int32), torch.tensor([200, 120])
    dout = torch.randn(b, h, n, d)
    kw = dict(index=index, lengths=lengths)
    got = _run(_ext, (q, k, v, pk, pv), dout, **kw)
    ref = _run(
        lambda *a, index, lengths: prompt_attention_ref(*a, index, lengths),
        (q, k, v, pk, pv),
        dout,
        **kw,
    )
    _compare(got, ref, atol=5e-5, rtol=5e-5)


def test_own_key_count_and_empty_cases():
    """Nk != Nq; Nq = 0; no key at all (out 0, lse -inf, zero gradients)."""
    q, _, _ = make_qkv(2, 2, 9, 16)
    k, v, _ = make_qkv(2, 2, 4, 16, seed=3)
    pk, pv = make_prompts(1, 2, 3, 16)
    dout = torch.randn(2, 2, 9, 16)
    got = _run(_ext, (q, k, v, pk, pv), dout)
    _compare(got, _run(prompt_attention_ref, (q, k, v, pk, pv), dout))

    empty_q = q[:, :, :0]
    out, lse = cpp.prompt_attention_fwd(empty_q, k, v, pk, pv, None, None, 0.25)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)

    no_k, no_v = k[:, :, :0], v[:, :, :0]
    no_pk, no_pv = pk[:, :, :0], pv[:, :, :0]
    out, lse = cpp.prompt_attention_fwd(q, no_k, no_v, no_pk, no_pv, None, None, 0.25)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    grads = cpp.prompt_attention_bwd(dout, q, no_k, no_v, no_pk, no_pv, None, None, out, lse, 0.25)
    assert all(bool((g == 0).all()) for g in grads)
    lengths = torch.tensor([0])
    out, lse = cpp.prompt_attention_fwd(q, no_k, no_v, pk, pv, None, lengths, 0.25)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


_DIGEST = """
import hashlib, sys, torch
sys.path.insert(0, "tests")
from helpers import make_prompts, make_qkv
from fastprompt.kernels import cpp
q, k, v = make_qkv(4, 3, 67, 64, dtype=DTYPE, non_contiguous=True)
pk, pv = make_prompts(2, 3, 50, 64, dtype=DTYPE)
index = torch.tensor([1, 0, 1, 1])
dout = torch.randn(4, 3, 67, 64, generator=torch.Generator().manual_seed(3)).to(DTYPE)
out, lse = cpp.prompt_attention_fwd(q, k, v, pk, pv, index, None, 0.125)
grads = cpp.prompt_attention_bwd(dout, q, k, v, pk, pv, index, None, out, lse, 0.125)
h = hashlib.sha256()
for t in (out, lse, *grads):
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_results_are_bitwise_reproducible_across_processes(dtype):
    """Run to run, not only call to call: fresh processes give the same bytes."""
    import subprocess
    import sys
    from pathlib import Path

    code = _DIGEST.replace("DTYPE", dtype)
    root = Path(__file__).resolve().parents[2]
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(digests) == 1, digests


# ----------------------------------------------------------------------------------------------
# Prompt Condensation scores
# ----------------------------------------------------------------------------------------------


def _reference_scores(q, k, v, pk, pv, index, lengths, u_k, u_v, dout, scale):
    """Per-sequence prompt gradients by autograd on per-sequence copies, then prompt_scores_ref."""
    b = q.shape[0]
    seq = torch.zeros(b, dtype=torch.long) if index is None else index.long()
    pk_seq = pk[seq].clone().requires_grad_()
    pv_seq = pv[seq].clone().requires_grad_()
    lens_seq = None if lengths is None else lengths[seq]
    out, lse = prompt_attention_ref(q, k, v, pk_seq, pv_seq, torch.arange(b), lens_seq, scale)
    gk, gv = torch.autograd.grad(out, (pk_seq, pv_seq), dout)
    delta = (dout * out).sum(-1)
    terms, gate = prompt_scores_ref(q, pk, pv, lse, delta, gk, gv, u_k, u_v, scale, index, lengths)
    return terms, gate, (lse, delta, gk, gv)


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_scored_backward_and_standalone_scores_match_reference(indexed, with_lengths):
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
    terms, gate, (lse, delta, gk, gv) = _reference_scores(
        q, k, v, pk, pv, index, lengths, u_k, u_v, dout, scale
    )
    out, lse_c = cpp.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, scale)
    res = cpp.prompt_attention_bwd_scored(
        dout, q, k, v, pk, pv, index, lengths, out, lse_c, scale, u_k, u_v
    )
    assert len(res) == 7
    assert_close(res[5], terms, "terms (fused)", atol=1e-4, rtol=1e-4)
    assert_close(res[6], gate, "gate (fused)", atol=1e-4, rtol=1e-4)
    plain = cpp.prompt_attention_bwd(dout, q, k, v, pk, pv, index, lengths, out, lse_c, scale)
    for name, a, e in zip(NAMES[2:], res[:5], plain):
        assert torch.equal(a, e), name
    s_terms, s_gate = cpp.prompt_scores(
        q, pk, pv, lse, delta, gk, gv, u_k, u_v, scale, index, lengths
    )
    assert_close(s_terms, terms, "terms (standalone)", atol=1e-4, rtol=1e-4)
    assert_close(s_gate, gate, "gate (standalone)", atol=1e-4, rtol=1e-4)


def test_scores_without_vectors_give_only_the_gate():
    q, k, v = make_qkv(2, 2, 11, 16)
    pk, pv = make_prompts(1, 2, 4, 16)
    dout = torch.randn(2, 2, 11, 16)
    u0 = torch.zeros(0, 1, 2, 4, 16)
    _, gate, _ = _reference_scores(q, k, v, pk, pv, None, None, u0, u0, dout, 0.25)
    out, lse = cpp.prompt_attention_fwd(q, k, v, pk, pv, None, None, 0.25)
    res = cpp.prompt_attention_bwd_scored(dout, q, k, v, pk, pv, None, None, out, lse, 0.25, u0, u0)
    assert res[5].shape == (0, 2, 4)
    assert_close(res[6], gate, "gate", atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Prompt packing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_gather_prompts_matches_reference_values_and_backward(dtype, device):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(4, 7, 16, generator=g).to(device, dtype)
    keep = torch.rand(4, 7, generator=g) > 0.5
    keep[1] = False  # a layer that keeps nothing
    keep[2] = True  # and one that keeps everything
    packed, counts = cpp.gather_prompts(table, keep)
    ref_packed, ref_counts = gather_prompts_ref(table, keep.to(device))
    assert torch.equal(packed, ref_packed) and torch.equal(counts, ref_counts)
    assert counts.device.type == "cpu" and counts.dtype == torch.long

    leaf = table.detach().clone().requires_grad_()
    grad_packed = torch.randn(packed.shape, generator=g).to(device, dtype)
    ref_packed = gather_prompts_ref(leaf, keep.to(device))[0]
    ref_grad = torch.autograd.grad(ref_packed, leaf, grad_packed)[0]
    grad = cpp.gather_prompts_backward(grad_packed, keep)
    assert torch.equal(grad, ref_grad)
    assert grad[~keep.to(device)].abs().max() == 0


def test_gather_prompts_rejects_bad_masks():
    table = torch.randn(3, 5, 8)
    with pytest.raises(RuntimeError, match="keep must be"):
        cpp.gather_prompts(table, torch.ones(3, 5))
    with pytest.raises(RuntimeError, match=r"keep must be \(L, P\)"):
        cpp.gather_prompts(table, torch.ones(3, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, error messages
# ----------------------------------------------------------------------------------------------


def _small_args():
    q, k, v = make_qkv(2, 2, 5, 8, non_contiguous=True)
    pk, pv = make_prompts(2, 2, 3, 8)
    index, lengths = torch.tensor([1, 0]), torch.tensor([3, 1])
    return q, k, v, pk, pv, index, lengths


def test_opcheck_every_schema():
    ops = torch.ops.fastprompt_ext
    q, k, v, pk, pv, index, lengths = _small_args()
    out, lse = ops.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, 0.3)
    dout = torch.randn(2, 2, 5, 8)
    u = torch.randn(2, 2, 2, 3, 8)
    torch.library.opcheck(ops.prompt_attention_fwd, (q, k, v, pk, pv, index, lengths, 0.3))
    torch.library.opcheck(ops.prompt_attention_fwd, (q, k, v, pk[:1], pv[:1], None, None, 0.3))
    bwd_args = (dout, q, k, v, pk, pv, index, lengths, out, lse, 0.3)
    torch.library.opcheck(ops.prompt_attention_bwd, (*bwd_args, None, None))
    torch.library.opcheck(ops.prompt_attention_bwd, (*bwd_args, u, u))
    delta = (dout * out).sum(-1)
    per_seq = torch.randn(2, 2, 3, 8)
    torch.library.opcheck(
        ops.prompt_scores, (q, pk, pv, lse, delta, per_seq, per_seq, u, u, 0.3, index, lengths)
    )
    table = torch.randn(3, 4, 8)
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]).bool()
    # Data-dependent output size: schema and fake only (AOT dispatch needs a static shape).
    torch.library.opcheck(
        ops.gather_prompts, (table, keep), test_utils=("test_schema", "test_faketensor")
    )
    torch.library.opcheck(ops.gather_prompts_backward, (torch.randn(7, 8), keep))


def test_torch_compile_fullgraph_traces_the_ops():
    ops = torch.ops.fastprompt_ext
    q, k, v, pk, pv, index, lengths = _small_args()
    dout = torch.randn(2, 2, 5, 8)

    def step(q, k, v, pk, pv, index, lengths, dout):
        out, lse = ops.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, 0.3)
        grads = ops.prompt_attention_bwd(
            dout, q, k, v, pk, pv, index, lengths, out, lse, 0.3, None, None
        )
        return out * 2, lse, grads[0], grads[3]

    args = (q, k, v, pk, pv, index, lengths, dout)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for name, a, e in zip(("out", "lse", "dq", "dprompt_k"), compiled(*args), step(*args)):
        assert_close(a, e, name, atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(index=torch.tensor([0, 5])), r"prompt_index values must lie in \[0, 2\)"),
        (dict(index=torch.tensor([0.0, 1.0])), "prompt_index must be int32 or int64"),
        (dict(lengths=torch.tensor([9, 1])), r"prompt_lengths values must lie in \[0, 3\]"),
        (dict(pk=torch.randn(2, 2, 3, 4)), "differ"),
        (dict(q=torch.randn(2, 2, 5, 8, dtype=torch.float64)), "q must be float32, bfloat16"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    q, k, v, pk, pv, index, lengths = _small_args()
    args = dict(q=q, k=k, v=v, pk=pk, pv=pv, index=index, lengths=lengths) | change
    with pytest.raises(RuntimeError, match=match):
        cpp.prompt_attention_fwd(
            args["q"],
            args["k"],
            args["v"],
            args["pk"],
            args["pv"],
            args["index"],
            args["lengths"],
            0.3,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_triton(dtype):
    """The CUDA kernels against the Triton backend (both against the fp32 reference)."""
    assert cpp.device_availability("cuda") is None, cpp.device_availability("cuda")
    from fastprompt.ops import prompt_attention

    b, h, n, d, t, p = 4, 6, 197, 64, 2, 50
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True, device="cuda")
    pk, pv = make_prompts(t, h, p, d, device="cuda")
    dout = torch.randn(b, h, n, d, device="cuda")
    index = torch.tensor([0, 1, 1, 0], device="cuda")
    low = [x.to(dtype) for x in (q, k, v, pk, pv)]
    ref = _run(
        lambda *a: prompt_attention_ref(*a, index), [x.float() for x in low], dout.to(dtype).float()
    )
    got = _run(lambda *a: _ext(*a, index), low, dout.to(dtype))
    tri = _run(lambda *a: prompt_attention(*a, index, backend="triton"), low, dout.to(dtype))
    for i, name in enumerate(NAMES):
        if dtype == torch.float32:
            assert_close(got[i], tri[i], name, atol=1e-4, rtol=1e-4)
        else:
            assert_close_vs_ref(got[i], ref[i], tri[i], name, factor=2.0 if i < 2 else 3.0)


@pytest.mark.gpu
def test_cuda_backward_is_deterministic_and_scores_match_cpu():
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
    for name, x, y, z in zip(("out", "lse", *NAMES[2:], "terms", "gate"), first, second, on_cpu):
        assert torch.equal(x, y), name
        assert_close(x.cpu(), z, name, atol=1e-4, rtol=1e-4)


def test_build_info_describes_the_build():
    info = cpp.build_info()
    assert info["loaded"] is True and info["compiler"]
    assert "cpu_isa=" in info["build"] and "gemm=" in info["build"]
    assert info["cache"] or info["how"].startswith("ahead")
