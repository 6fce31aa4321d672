"""Triton kernels on a real GPU (skipped without CUDA): what the interpreter cannot show.

fp16/bf16 accuracy per head dim against PyTorch's own same-dtype error, every config the
autotuner may pick compiled on this GPU without spills, the device guard, a B·H grid past
65,535, bitwise determinism (also across autotuner caches in deterministic mode), and fp32 with
TF32 allowed or not.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_close_vs_ref, make_prompts, make_qkv

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu

NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v")


def _tk():
    from fastprompt.kernels import triton as tk

    return tk


def _run(q, k, v, pk, pv, index, lengths, dout, scale):
    tk = _tk()
    out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, scale)
    grads = tk.prompt_attention_bwd(dout, q, k, v, pk, pv, index, lengths, out, lse, scale)
    return (out, lse, *grads)


def _ref(q, k, v, pk, pv, index, lengths, dout, scale, fn=None):
    from fastprompt.ops import prompt_attention_ref

    fn = fn or prompt_attention_ref
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, pk, pv)]
    out, lse = fn(*leaves, index, lengths, scale)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, leaves, dout))


def _same_dtype(q, k, v, pk, pv, index, lengths, scale):
    """PyTorch's own computation in the input dtype: cat + SDPA, masked past each set's length."""
    keys = torch.cat([pk[index], k], 2)
    values = torch.cat([pv[index], v], 2)
    mask = None
    if lengths is not None:
        pos = torch.arange(keys.shape[2], device=q.device)
        p = pk.shape[2]
        valid = (pos[None] >= p) | (pos[None] < lengths[index][:, None])
        mask = valid[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, mask, scale=scale)
    s = (q @ keys.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return out, torch.logsumexp(s, -1)


def _inputs(b, h, n, d, t, p, dtype, seed=0, device="cuda"):
    q, k, v = make_qkv(b, h, n, d, dtype=dtype, non_contiguous=True, device=device, seed=seed)
    pk, pv = make_prompts(t, h, p, d, dtype=dtype, device=device, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    dout = torch.randn(b, n, h, d, generator=g).to(device, dtype).transpose(1, 2)
    return q, k, v, pk, pv, dout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_half_precision_within_pytorchs_own_error(dtype, d):
    b, h, n, t, p = 4, 6, 197, 3, 50
    q, k, v, pk, pv, dout = _inputs(b, h, n, d, t, p, torch.float32)
    index = torch.tensor([0, 2, 2, 1], device="cuda")
    lengths = torch.tensor([50, 31, 7], device="cuda")
    scale = d**-0.5
    ref = _ref(q, k, v, pk, pv, index, lengths, dout, scale)
    low = [x.to(dtype) for x in (q, k, v, pk, pv, dout)]
    got = _run(*low[:5], index, lengths, low[5], scale)
    # PyTorch's same-dtype run; its prompt gradients come out per set (autograd of pk[index])
    same = _ref(*low[:5], index, lengths, low[5], scale, fn=_same_dtype)
    for i, name in enumerate(NAMES):
        a = got[i].to(dtype) if i >= 5 else got[i]
        e = same[i].to(dtype) if i >= 5 else same[i]
        assert_close_vs_ref(a, ref[i], e, name, factor=2.0 if i < 2 else 3.0)


def test_every_config_the_autotuner_may_pick_compiles_here_without_spills():
    """On this GPU and Triton version (the static report is another Triton's ptxas), through the
    precompile API: every build of the model's shape (indexed sets, lengths), bf16, every head
    dim, compiled in parallel worker processes and loaded here from Triton's disk cache. Run
    first on a new GPU: it also shows that the workers' builds are the ones launches look up
    (each loads in well under a second)."""
    from fastprompt.kernels.triton._precompile import Shape

    shape = Shape(batch=2, sets=2, indexed=True, lengths=True)
    report = _tk().precompile([torch.bfloat16], [32, 64, 80, 96, 128], [shape], jobs=None)
    print(report.summary())
    assert not report.failures, report.failures[:3]
    bad = [b for b in report.builds if b["spill_bytes"]]
    assert not bad, "\n".join(
        f"{b['role']} {b['config']} d={b['d']}: {b['spill_bytes']} B spilled" for b in bad
    )
    slow = [b for b in report.builds[1:] if b["load_s"] > 1.0]  # the first sets Triton up
    assert not slow, f"{len(slow)} builds compiled again on load (cache keys differ): {slow[0]}"


def test_tensors_on_another_device_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    args = _inputs(2, 2, 45, 64, 1, 10, torch.bfloat16)
    on0 = _run(*args[:5], None, None, args[5], 0.125)
    moved = [x.to("cuda:1") for x in args]
    with torch.cuda.device(0):
        on1 = _run(*moved[:5], None, None, moved[5], 0.125)
    for name, a, b in zip(NAMES, on0, on1):
        assert b.device == torch.device("cuda:1"), name
        assert torch.equal(a, b.to("cuda:0")), name


def test_more_than_65535_sequence_heads():
    b, h, n, d, p = 5462, 12, 8, 32, 3  # B·H = 65,544: past CUDA's cap on grid axes 1 and 2
    q, k, v, pk, pv, dout = _inputs(b, h, n, d, 1, p, torch.float16)
    got = _run(q, k, v, pk, pv, None, None, dout, 0.2)
    for i in (0, b // 2, b - 1):  # spot-check sequences against the reference
        sl = slice(i, i + 1)
        ref = _ref(q[sl], k[sl], v[sl], pk, pv, None, None, dout[sl], 0.2)
        for name, a, e in zip(NAMES[:5], got[:5], ref[:5]):
            assert_close(a[sl].float(), e.float(), name, atol=2e-2, rtol=2e-2)
    ref_all = _ref(q, k, v, pk, pv, None, None, dout, 0.2)
    for name, a, e in zip(NAMES[5:], got[5:], ref_all[5:]):
        err = (a - e.float()).abs().max().item()
        assert err <= 2e-2 * e.abs().max().item(), f"{name}: {err:.3e}"


def test_bitwise_deterministic_also_across_autotuner_caches(autotuning):
    from fastprompt.kernels.triton._precompile import Shape
    from fastprompt.kernels.triton.prompt_attention import _fwd_tuned
    from fastprompt.kernels.triton.prompt_attention_backward import TUNED

    q, k, v, pk, pv, dout = _inputs(8, 12, 197, 64, 3, 200, torch.bfloat16)
    index = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(0)).cuda()
    # the configs the tuner times, compiled in parallel first (about 20, else one by one)
    shape = Shape(batch=8, p=200, sets=3, indexed=True)
    assert not _tk().precompile([torch.bfloat16], [64], [shape]).failures
    first = _run(q, k, v, pk, pv, index, None, dout, 0.125)
    second = _run(q, k, v, pk, pv, index, None, dout, 0.125)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            for kernel in (_fwd_tuned, *TUNED.values()):
                kernel.cache.clear()  # a fresh process would have no tuning either
            runs.append(_run(q, k, v, pk, pv, index, None, dout, 0.125))
    finally:
        torch.use_deterministic_algorithms(before)
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_fp32_uses_tf32x3_unless_tf32_is_allowed(precision):
    """fp32 on tensor cores: 3xTF32 (about fp32 accuracy) by default, TF32 when allowed."""
    q, k, v, pk, pv, dout = _inputs(2, 4, 197, 64, 1, 50, torch.float32)
    ref = _ref(*(x.double() for x in (q, k, v, pk, pv)), None, None, dout.double(), 0.125)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = _run(q, k, v, pk, pv, None, None, dout, 0.125)
    finally:
        torch.set_float32_matmul_precision(saved)
    tol = 2e-5 if precision == "highest" else 5e-3
    for name, a, e in zip(NAMES, got, ref):
        scale = e.abs().max().item() or 1.0
        err = (a.double() - e).abs().max().item() / scale
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e} ({precision})"


def test_per_set_sum_is_fp32_even_with_tf32_enabled():
    from fastprompt.kernels.triton.prompt_attention_backward import (
        prompt_attention_bwd_per_sequence,
    )

    q, k, v, pk, pv, dout = _inputs(6, 4, 50, 64, 2, 20, torch.bfloat16)
    index = torch.tensor([1, 0, 1, 1, 0, 1], device="cuda")
    tk = _tk()
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, index, None, 0.125)
        seq = prompt_attention_bwd_per_sequence(dout, q, k, v, pk, pv, index, None, out, lse, 0.125)
        per_set = tk.prompt_attention_bwd(dout, q, k, v, pk, pv, index, None, out, lse, 0.125)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    for t in range(2):
        members = [b for b in range(6) if int(index[b]) == t]
        expected = seq[3][members[0]].clone()
        for b in members[1:]:
            expected = expected + seq[3][b]
        assert torch.equal(per_set[3][t], expected)
