"""The Triton backend's kernel contract, called directly, against the fp32 reference.

Without CUDA these run in Triton's interpreter (tests/conftest.py) on tiny shapes; every path of
the kernels is reached: full and partial key/query blocks (the interpreter's tile is 32, some
tests force 16 and mixed tilings), P = 0, P not a multiple of the block, lengths, indexed sets,
T = B, the head-dim split (d = 48, 80), a negative scale, the score epilogue, bad indices, and
image key counts other than the query count (each in its own process: a bad read crashes it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, make_prompts, make_qkv

pytest.importorskip("triton")

from fastprompt.kernels import triton as tk
from fastprompt.kernels.triton import _tuning
from fastprompt.ops import prompt_attention_ref, prompt_scores_ref

# An interpreter that cannot run the kernels (Triton 3.2's with numpy >= 2.4): what to install.
if tk.availability() is not None:
    pytest.skip(tk.availability(), allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=2e-4, rtol=2e-4)


def _ref(q, k, v, pk, pv, index, lengths, scale, dout):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, pk, pv)]
    out, lse = prompt_attention_ref(*leaves, index, lengths, scale)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), lse, grads


def _inputs(b, h, n, d, t, p, index=None, lengths=None, dtype=torch.float32, seed=0, nk=None):
    """Inputs with n queries and nk image keys (default n), laid out as the model has them."""
    q, k, v = make_qkv(b, h, n, d, dtype=dtype, non_contiguous=True, device=DEVICE, seed=seed)
    if nk is not None:
        _, k, v = make_qkv(b, h, nk, d, dtype, non_contiguous=True, device=DEVICE, seed=seed + 3)
    pk, pv = make_prompts(t, h, p, d, dtype=dtype, device=DEVICE, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    dout = torch.randn(b, n, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    idx = None if index is None else torch.tensor(index, device=DEVICE)
    lens = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    return q, k, v, pk, pv, idx, lens, dout


def _check(b, h, n, d, t, p, index=None, lengths=None, scale=None, nk=None):
    q, k, v, pk, pv, idx, lens, dout = _inputs(b, h, n, d, t, p, index, lengths, nk=nk)
    scale = d**-0.5 if scale is None else scale
    out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, idx, lens, scale)
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous()
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    ref_out, ref_lse, ref_grads = _ref(q, k, v, pk, pv, idx, lens, scale, dout)
    assert_close(out, ref_out, "out", **TOL)
    assert_close(lse, ref_lse, "lse", **TOL)
    grads = tk.prompt_attention_bwd(dout, q, k, v, pk, pv, idx, lens, out, lse, scale)
    for name, got, exp in zip(("dq", "dk", "dv", "dprompt_k", "dprompt_v"), grads, ref_grads):
        assert got.shape == exp.shape, name
        assert_close(got, exp, name, **TOL)
    assert grads[3].dtype == torch.float32 and grads[4].dtype == torch.float32
    # dq, dk, dv come in the op's (B, N, H, d) storage: the op copies nothing
    for name, got in zip(("dq", "dk", "dv"), grads):
        assert got.transpose(1, 2).is_contiguous(), f"{name}: strides {got.stride()}"


# (B, H, N, d, T, P): with the interpreter's 32-row tiles, N = 32 and 64 are whole blocks only,
# N = 37 and 70 end on a partial block; P = 32 is whole, 7 and 45 partial, 0 none.
@pytest.mark.parametrize(
    "shape",
    [(2, 2, 37, 32, 1, 7), (1, 2, 32, 16, 1, 32), (1, 1, 70, 32, 1, 45), (2, 1, 64, 16, 1, 0)],
    ids=lambda s: "B{}H{}N{}d{}T{}P{}".format(*s),
)
def test_shared_set(shape):
    _check(*shape)


def test_indexed_sets_with_lengths_and_an_unused_set():
    # set 1 is used by no sequence (its gradient must be zero), set 2 has zero valid keys
    _check(4, 2, 21, 16, 4, 9, index=[3, 0, 2, 3], lengths=[9, 4, 0, 5])


def test_a_set_per_sequence():
    # T = B (per-image prompts, e.g. prompt dropout): a permutation, each set one sequence
    _check(3, 1, 19, 16, 3, 6, index=[2, 0, 1])


def test_no_index_with_several_sets_uses_set_zero():
    _check(2, 1, 17, 16, 3, 5)


@pytest.mark.parametrize("group", [2, 3])
def test_shared_set_with_sequence_groups(monkeypatch, group):
    """The unindexed shared set sums G sequences per program (5 sequences: a partial group)."""
    from fastprompt.kernels.triton import prompt_attention_backward as bw

    monkeypatch.setattr(bw, "_GROUP_OVERRIDE", group)
    _check(5, 2, 21, 16, 2, 9, lengths=[6, 9])


@pytest.mark.parametrize("d", [48, 80])
def test_head_dims_split_in_two_chunks(d):
    _check(1, 1, 19, d, 2, 7, index=[1], lengths=[3, 7])


def test_negative_scale():
    _check(1, 2, 21, 16, 1, 5, scale=-0.3)


@pytest.mark.parametrize(
    "cfg", [_tuning.Cfg(16, 16, 1, 1), _tuning.Cfg(16, 32, 1, 1), _tuning.Cfg(32, 16, 1, 1)]
)
def test_other_tilings(cfg):
    from fastprompt.kernels.triton.prompt_attention import _fwd_tuned
    from fastprompt.kernels.triton.prompt_attention_backward import TUNED

    kernels = {"fwd": _fwd_tuned, **TUNED}
    with _tuning.forced_configs(kernels, cfg):
        _check(2, 1, 40, 16, 2, 21, index=[1, 0], lengths=[16, 21])


def test_autotuning_key_holds_the_architecture(monkeypatch):
    """Triton's autotuner keys its cache by the KEY arguments and dtypes, not by device: a config
    tuned (and pruned for shared memory and spills) on one kind of GPU must not be reused on
    another in the same process."""
    from fastprompt.kernels.triton.prompt_attention import fwd_plan
    from fastprompt.kernels.triton.prompt_attention_backward import bwd_plan

    monkeypatch.setattr(_tuning, "arch_of", lambda t: 86)
    q, k, v, pk, pv, _, _, dout = _inputs(2, 1, 5, 16, 1, 3)
    out, lse, fwd = fwd_plan(q, k, v, pk, pv, None, None, 0.25)
    *_, bwd = bwd_plan(dout, q, k, v, pk, pv, None, None, out, lse, 0.25, None, None)
    tuned = [launch for launch in fwd + bwd if launch.role in _tuning.CONFIGS]
    assert {launch.role for launch in tuned} == set(_tuning.CONFIGS)
    assert "ARCH" in _tuning.KEY
    for launch in tuned:
        args = dict(zip(launch.kernel.fn.arg_names, launch.args))
        assert set(_tuning.KEY) <= {*args, *launch.kwargs}, launch.role
        assert args["ARCH"] == 86, launch.role


def test_per_set_reduction_is_the_fixed_order_fp32_sum():
    """Bitwise: set t's gradient is the left-to-right fp32 sum of its sequences' gradients."""
    from fastprompt.kernels.triton.prompt_attention_backward import (
        prompt_attention_bwd_per_sequence,
    )

    q, k, v, pk, pv, idx, _, dout = _inputs(5, 1, 9, 16, 2, 4, index=[1, 0, 1, 1, 0])
    scale = 0.25
    out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, idx, None, scale)
    per_seq = prompt_attention_bwd_per_sequence(dout, q, k, v, pk, pv, idx, None, out, lse, scale)
    per_set = tk.prompt_attention_bwd(dout, q, k, v, pk, pv, idx, None, out, lse, scale)
    for seq, got in ((per_seq[3], per_set[3]), (per_seq[4], per_set[4])):
        for t in range(2):
            members = [b for b in range(5) if int(idx[b]) == t]
            expected = seq[members[0]].clone()
            for b in members[1:]:
                expected = expected + seq[b]
            assert torch.equal(got[t], expected)


def _check_scored(b, h, n, d, t, p, index, lengths, nk=None):
    q, k, v, pk, pv, idx, lens, dout = _inputs(b, h, n, d, t, p, index, lengths, nk=nk)
    g = torch.Generator().manual_seed(9)
    u_k, u_v = (torch.randn(2, t, h, p, d, generator=g).to(DEVICE) for _ in range(2))
    scale = d**-0.5
    out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, idx, lens, scale)
    got = tk.prompt_attention_bwd_scored(
        dout, q, k, v, pk, pv, idx, lens, out, lse, scale, u_k, u_v
    )
    # per-sequence reference gradients: each sequence gets its own copy of its set
    pk_seq, pv_seq = pk[idx].clone(), pv[idx].clone()
    seq_index = torch.arange(b, device=DEVICE)
    *_, ref_grads = _ref(q, k, v, pk_seq, pv_seq, seq_index, lens[idx], scale, dout)
    delta = (dout.float() * out.float()).sum(-1)
    terms, gate = prompt_scores_ref(
        q, pk, pv, lse, delta, ref_grads[3], ref_grads[4], u_k, u_v, scale, idx, lens
    )
    assert_close(got[5], terms, "terms", **TOL)
    assert_close(got[6], gate, "gate", **TOL)
    plain = tk.prompt_attention_bwd(dout, q, k, v, pk, pv, idx, lens, out, lse, scale)
    for name, a, e in zip(("dq", "dk", "dv", "dprompt_k", "dprompt_v"), got[:5], plain):
        assert torch.equal(a, e), name


def test_scored_backward_matches_reference_scores():
    _check_scored(3, 2, 21, 16, 2, 7, [1, 0, 1], [5, 7])


HERE = Path(__file__).resolve().parent


def _in_subprocess(call: str) -> None:
    """Run ``call`` with this module imported as ``m`` in a fresh process: a kernel that reads or
    writes out of bounds kills that process (the interpreter segfaults), not the test run."""
    path = os.pathsep.join(str(p) for p in (HERE.parents[1], HERE.parent, HERE))
    env = {**os.environ, "PYTHONPATH": path}
    # untuned, as in the test run (tests/conftest.py): no autotuning in the child on a GPU
    untuned = "from fastprompt.kernels.triton import _tuning; _tuning.deterministic = lambda: True"
    code = f"{untuned}; import test_triton_contract as m; {call}"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, (
        f"{call} exited with {proc.returncode} (negative: killed by that signal)\n"
        + proc.stderr[-3000:]
    )


# Image keys other than queries (N_k != N_q), (B, H, N_q, N_k, d, T, P): fewer keys than queries
# (the kernels once read N_q keys: past k's rows, SIGSEGV), more (they dropped keys: wrong by a
# relative 8), none, and partial and multiple blocks on both sides with indexed sets and lengths.
KEY_COUNTS = {
    "fewer_keys": "m._check(2, 2, 16, 32, 1, 5, nk=9)",
    "more_keys": "m._check(2, 2, 9, 32, 1, 3, nk=21)",
    "indexed_lengths_no_keys_no_queries": (
        "m._check(3, 1, 37, 16, 2, 7, index=[1, 0, 1], lengths=[5, 7], nk=70); "
        "m._check(2, 1, 19, 16, 1, 5, nk=0); m._check(2, 1, 0, 16, 1, 5, nk=7)"
    ),
    "scored": "m._check_scored(3, 2, 40, 16, 2, 7, [1, 0, 1], [5, 7], nk=11)",
}


@pytest.mark.parametrize("case", sorted(KEY_COUNTS))
def test_image_key_count_other_than_query_count(case):
    _in_subprocess(KEY_COUNTS[case])


def test_bad_index_poisons_the_sequence_and_reads_nothing_out_of_range():
    q, k, v, pk, pv, _, lens, dout = _inputs(3, 1, 9, 16, 2, 4, lengths=[4, 9])
    idx = torch.tensor([0, 5, 1], device=DEVICE)  # 5 is out of range; set 1's length 9 > P
    out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, idx, lens, 0.25)
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    assert torch.isnan(out[2]).all()
    dq, dk, *_ = tk.prompt_attention_bwd(
        dout, q, k, v, pk, pv, idx, lens, out.nan_to_num(), lse.nan_to_num(), 0.25
    )
    assert torch.isnan(dq[1]).all() and torch.isnan(dk[1]).all() and torch.isfinite(dq[0]).all()


def test_deterministic_mode_takes_the_fixed_config():
    q, k, v, pk, pv, _, _, dout = _inputs(2, 1, 20, 16, 1, 5)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, None, None, 0.25)
        grads = tk.prompt_attention_bwd(dout, q, k, v, pk, pv, None, None, out, lse, 0.25)
    finally:
        torch.use_deterministic_algorithms(before)
    ref_out, _, ref_grads = _ref(q, k, v, pk, pv, None, None, 0.25, dout)
    assert_close(out, ref_out, "out", **TOL)
    assert_close(grads[3], ref_grads[3], "dprompt_k", **TOL)


def test_empty_shapes():
    q, k, v, pk, pv, *_ = _inputs(2, 1, 0, 16, 1, 3)
    out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, None, None, 0.25)
    assert out.shape == (2, 1, 0, 16) and lse.shape == (2, 1, 0)
    dout = torch.empty_like(out)
    grads = tk.prompt_attention_bwd(dout, q, k, v, pk, pv, None, None, out, lse, 0.25)
    assert grads[3].shape == (1, 1, 3, 16) and not grads[3].any()


def test_unsupported_head_dim_is_named():
    q, k, v, pk, pv, *_ = _inputs(1, 1, 4, 16, 1, 2)
    q, k, v = (torch.zeros(1, 1, 4, 24, device=DEVICE) for _ in range(3))
    pk = pv = torch.zeros(1, 1, 2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 24"):
        tk.prompt_attention_fwd(q, k, v, pk, pv, None, None, 0.2)


def test_scored_backward_rejects_misshaped_vectors():
    q, k, v, pk, pv, _, _, dout = _inputs(1, 1, 5, 16, 1, 3)
    out, lse = tk.prompt_attention_fwd(q, k, v, pk, pv, None, None, 0.25)
    u = torch.zeros(2, 1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="u_k must be"):
        tk.prompt_attention_bwd_scored(dout, q, k, v, pk, pv, None, None, out, lse, 0.25, u, u)


_INTERPRETER_BF16 = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584);"
    " the gpu tests cover bf16",
)


@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=_INTERPRETER_BF16)]
)
def test_half_precision_under_twice_pytorchs_error(dtype):
    """The kernel in the input dtype vs PyTorch's own same-dtype cat + attention."""
    from helpers import assert_close_vs_ref

    b, h, n, d, t, p = 2, 1, 21, 16, 2, 7
    q, k, v, pk, pv, idx, _, dout = _inputs(b, h, n, d, t, p, index=[1, 0])
    scale = d**-0.5
    ref_out, _, ref_grads = _ref(q, k, v, pk, pv, idx, None, scale, dout)
    low = [x.to(dtype) for x in (q, k, v, pk, pv, dout)]
    out, lse = tk.prompt_attention_fwd(*low[:5], idx, None, scale)
    grads = tk.prompt_attention_bwd(low[5], *low[:5], idx, None, out, lse, scale)
    keys = [torch.cat([low[3][idx], low[1]], 2), torch.cat([low[4][idx], low[2]], 2)]
    same = [x.detach().requires_grad_() for x in (low[0], *keys)]
    s = (same[0] @ same[1].transpose(-1, -2)) * scale
    same_out = torch.softmax(s.float(), -1).to(dtype) @ same[2]
    same_grads = torch.autograd.grad(same_out, same, low[5])
    assert_close_vs_ref(out, ref_out, same_out, "out")
    assert_close_vs_ref(grads[0], ref_grads[0], same_grads[0], "dq", factor=3.0)
    same_dk = same_grads[1][:, :, p:]
    assert_close_vs_ref(grads[1], ref_grads[1], same_dk, "dk", factor=3.0)
    same_dpk = torch.zeros_like(ref_grads[3]).index_add_(0, idx, same_grads[1][:, :, :p].float())
    assert_close_vs_ref(grads[3].to(dtype), ref_grads[3], same_dpk.to(dtype), "dprompt_k", 3.0)
