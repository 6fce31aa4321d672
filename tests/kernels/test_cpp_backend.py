"""The C++/CUDA extension backend (``csrc/``) against the fp32 references, along both its paths.

What every backend must do through the public op is the conformance suite
(``tests/ops/test_conformance.py``), which runs the ``cpp`` backend's CPU kernels. Here the
contract functions are checked along two paths (:mod:`cpp_paths`): ``kernels``, the backend's own
functions (the CPU kernels on the CPU), and ``cascade``, the CUDA path's orchestration over
PyTorch's fused attention run on PyTorch's CPU flash kernel with the CPU twins of its small
kernels — the only way that path runs without a GPU. Cases: odd N, P in {0, 1, 7, 50, 200},
shared / indexed / length-limited sets, a table without an index, strided inputs, every gradient,
the dtype rule for bf16/fp16, empty cases, an infinite scale, determinism. The module skips,
saying why, only where the extension cannot be built at all; ``gpu`` tests run the CUDA path.
"""

from __future__ import annotations

import pytest
import torch
from cpp_paths import (
    NAMES,
    PATHS,
    CppPath,
    against_reference,
    compare,
    ext,
    require_extension,
    run,
)
from helpers import assert_close, assert_close_vs_ref, make_prompts, make_qkv

from fastprompt.kernels import cpp
from fastprompt.ops.attention import prompt_attention_ref


@pytest.fixture(scope="module", autouse=True)
def extension():
    require_extension()


def test_the_kernels_path_is_the_modules_contract():
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(1, 2, 3, 8)
    out, lse = cpp.prompt_attention_fwd(q, k, v, pk, pv, None, None, 0.3)
    for a, e in zip((out, lse), CppPath("kernels").fwd(q, k, v, pk, pv, None, None, 0.3)):
        assert torch.equal(a, e)


# (B, H, Nq, d, T, P): odd N, every prompt count of the suite.
SHAPES = [
    (2, 2, 37, 32, 1, 0),
    (1, 2, 37, 32, 1, 1),
    (2, 1, 21, 64, 1, 7),
    (2, 2, 33, 64, 1, 50),
    (1, 2, 19, 64, 1, 200),
]
# (device, path): on CUDA the backend's own functions are the cascade.
PLACES = [
    ("cpu", "kernels"),
    ("cpu", "cascade"),
    pytest.param(("cuda", "kernels"), marks=pytest.mark.gpu, id="cuda"),
]


def _place_id(place):
    return "-".join(place)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}d{}T{}P{}".format(*s))
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("place", PLACES, ids=_place_id)
def test_shared_set_matches_reference(shape, non_contiguous, place):
    device, path = place
    b, h, n, d, t, p = shape
    q, k, v = make_qkv(b, h, n, d, non_contiguous=non_contiguous, device=device)
    pk, pv = make_prompts(t, h, p, d, device=device)
    dout = torch.randn(b, h, n, d, device=device)
    got = run(lambda *a: ext(*a, path=path), (q, k, v, pk, pv), dout)
    ref = run(prompt_attention_ref, (q, k, v, pk, pv), dout)
    compare(got, ref)
    assert got[0].transpose(1, 2).is_contiguous() and got[1].is_contiguous()


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("place", PLACES, ids=_place_id)
def test_indexed_sets_with_lengths_match_reference(with_lengths, place):
    device, path = place
    b, h, n, d, t, p = 5, 2, 29, 32, 3, 7
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True, device=device)
    pk, pv = make_prompts(t, h, p, d, device=device)
    index = torch.tensor([2, 0, 2, 1, 2], device=device)
    lengths = torch.tensor([7, 0, 3], device=device) if with_lengths else None
    dout = torch.randn(b, h, n, d, device=device)
    got, ref = against_reference(path, (q, k, v, pk, pv), dout, index, lengths)
    compare(got, ref)
    if with_lengths:  # keys past a set's length get exactly no gradient
        assert got[5][2, :, 3:].abs().max() == 0 and got[5][1].abs().max() == 0


@pytest.mark.parametrize("path", PATHS)
def test_a_shared_set_cut_by_its_length_and_poisoned_past_it(path):
    """T = 1 with a length (the cascade's long forward call with a key bias); NaN/inf unread."""
    b, h, n, d = 3, 2, 13, 16
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(1, h, 6, d)
    pk[:, :, 4:], pv[:, :, 4:] = float("nan"), float("inf")
    lengths = torch.tensor([4])
    dout = torch.randn(b, h, n, d)
    got, ref = against_reference(path, (q, k, v, pk, pv), dout, None, lengths)
    compare(got, ref)


@pytest.mark.parametrize("path", PATHS)
def test_a_table_of_sets_without_an_index_uses_set_0(path):
    b, h, n, d = 3, 2, 11, 16
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(3, h, 6, d)
    dout = torch.randn(b, h, n, d)
    for lengths in (None, torch.tensor([4, 6, 0])):
        got, ref = against_reference(path, (q, k, v, pk, pv), dout, None, lengths)
        compare(got, ref)
        assert got[5][1:].abs().max() == 0  # only set 0 is used


@pytest.mark.parametrize("path", PATHS)
def test_long_key_sets_span_several_key_groups(path):
    """More than 512 keys and rows: the online softmax merges blocks; int32 index, int64 lengths."""
    b, h, n, d, t, p = 2, 1, 530, 16, 2, 200
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(t, h, p, d)
    index, lengths = torch.tensor([1, 0], dtype=torch.int32), torch.tensor([200, 120])
    dout = torch.randn(b, h, n, d)
    got, ref = against_reference(path, (q, k, v, pk, pv), dout, index, lengths)
    compare(got, ref, atol=5e-5, rtol=5e-5)


# Broadcast forms of key_bias: Swin's table over windows (1, H, N, N_k), one per window and head
# (B, H, N, N_k; Swin's shift mask), a 2-D (N, N_k) read transposed (a key stride other than 1),
# and a per-sequence row (B, 1, 1, N_k).
BIAS_FORMS = ["table", "full", "2d-strided", "per-sequence"]


def _key_bias(form, b, h, n, n_k, device="cpu"):
    g = torch.Generator().manual_seed(11)
    if form == "2d-strided":
        return torch.randn(n_k, n, generator=g).to(device).t()
    size = {"table": (1, h, n, n_k), "full": (b, h, n, n_k), "per-sequence": (b, 1, 1, n_k)}[form]
    return torch.randn(size, generator=g).to(device)


@pytest.mark.parametrize("form", BIAS_FORMS)
@pytest.mark.parametrize("place", PLACES, ids=_place_id)
def test_key_bias_on_the_image_keys_matches_reference(form, place):
    """Indexed sets with lengths (one empty), N_k != N: the bias reaches the image keys only."""
    device, path = place
    b, h, n, n_k, d, t, p = 4, 2, 13, 11, 16, 3, 5
    q, _, _ = make_qkv(b, h, n, d, non_contiguous=True, device=device)
    k, v, _ = make_qkv(b, h, n_k, d, seed=3, device=device)
    pk, pv = make_prompts(t, h, p, d, device=device)
    index = torch.tensor([2, 0, 2, 1], device=device)
    lengths = torch.tensor([5, 0, 3], device=device)
    bias = _key_bias(form, b, h, n, n_k, device)
    dout = torch.randn(b, h, n, d, device=device)
    got, ref = against_reference(path, (q, k, v, pk, pv), dout, index, lengths, bias)
    compare(got, ref)


@pytest.mark.parametrize("lowp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("place", PLACES, ids=_place_id)
def test_prompt_gradients_without_image_gradients(lowp, place):
    """image_grads=False: only the prompt keys' columns are scored (CPU kernels) or only the
    prompt part runs (cascade); the prompt gradients are those of the full backward. Indexed
    sets with lengths, a key bias, N_k != N, more than 512 keys."""
    device, path = place
    dtype = torch.bfloat16 if lowp else torch.float32
    b, h, n, n_k, d, t, p = 4, 2, 13, 530, 16, 3, 5
    q, _, _ = make_qkv(b, h, n, d, non_contiguous=True, device=device, dtype=dtype)
    k, v, _ = make_qkv(b, h, n_k, d, seed=3, device=device, dtype=dtype)
    pk, pv = make_prompts(t, h, p, d, device=device, dtype=dtype)
    index = torch.tensor([2, 0, 2, 1], device=device)
    lengths = torch.tensor([5, 0, 3], device=device)
    bias = _key_bias("full", b, h, n, n_k, device)
    dout = torch.randn(b, h, n, d, device=device).to(dtype)
    fns = CppPath(path)
    out, lse = fns.fwd(q, k, v, pk, pv, index, lengths, 0.25, bias)
    args = (dout, q, k, v, pk, pv, index, lengths, out, lse, 0.25, None, None, bias)
    full = fns._bwd(*args, True)
    alone = fns._bwd(*args, False)
    for name, a, e in zip(("dprompt_k", "dprompt_v"), alone[3:5], full[3:5]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("path", PATHS)
def test_a_key_bias_that_masks_every_image_key_of_a_row_leaves_the_prompts(path):
    """Swin's shift mask is -100; -inf on a whole row leaves that query only its prompt keys, and
    more than 512 keys make the CPU kernels' online softmax cross key groups."""
    b, h, n, d, p = 2, 2, 520, 16, 7
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(1, h, p, d)
    bias = torch.randn(b, 1, n, n)
    bias[:, :, 3] = float("-inf")
    bias[:, :, 5, ::2] = -100.0
    dout = torch.randn(b, h, n, d)
    got, ref = against_reference(path, (q, k, v, pk, pv), dout, None, None, bias)
    compare(got, ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("path", PATHS)
def test_a_key_bias_with_a_period_is_read_per_window(path):
    """(G, H, N, N_k) for B = 3G sequences: sequence b reads row b mod G (Swin's bias per window,
    windows stored image by image), with -100 and -inf masks as the shift mask gives."""
    b, h, n, d, p = 6, 2, 9, 16, 5
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(2, h, p, d)
    bias = torch.randn(2, h, n, n)
    bias[1, :, 2] = float("-inf")
    bias[0, :, 4, ::2] = -100.0
    index = torch.tensor([0, 1, 1, 0, 1, 0])
    dout = torch.randn(b, h, n, d)
    got, ref = against_reference(path, (q, k, v, pk, pv), dout, index, None, bias)
    compare(got, ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("indexed", [False, True], ids=["shared", "indexed"])
def test_more_sequences_than_a_cuda_grid_takes(indexed):
    """65,540 sequences (a Swin stage of 64 windows at batch 1,025 is 65,600): PyTorch's fused
    kernels are called in parts of at most 65,535, a period of the key bias and a shared set
    (stride 0 over the sequences) read right in each part."""
    b, h, n, d, p = 65_540, 1, 2, 8, 3
    q, k, v = make_qkv(b, h, n, d)
    pk, pv = make_prompts(2 if indexed else 1, h, p, d)
    index = torch.arange(b) % 2 if indexed else None
    lengths = torch.tensor([3, 1]) if indexed else torch.tensor([2])
    bias = torch.randn(4, h, n, n) if indexed else None
    dout = torch.randn(b, h, n, d)
    got, ref = against_reference("cascade", (q, k, v, pk, pv), dout, index, lengths, bias)
    compare(got[:5], ref[:5], atol=5e-5, rtol=5e-5)
    for name, a, e in zip(NAMES[5:], got[5:], ref[5:]):  # sums over 65,540 sequences
        assert_close(a / e.abs().max(), e / e.abs().max(), name, atol=2e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_a_key_bias_that_does_not_broadcast_is_refused(path):
    fns = CppPath(path)
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match=r"key_bias \[3, 2, 5, 5\] must broadcast to \(B=2"):
        fns.fwd(q, k, v, pk, pv, None, None, 0.3, torch.zeros(3, 2, 5, 5))
    with pytest.raises(RuntimeError, match="key_bias must be a floating-point tensor"):
        fns.fwd(q, k, v, pk, pv, None, None, 0.3, torch.zeros(5, 5, dtype=torch.long))


@pytest.mark.parametrize("path", PATHS)
def test_own_key_count_and_empty_cases(path):
    """Nk != Nq; Nq = 0; no key at all (out 0, lse -inf, zero gradients)."""
    fns = CppPath(path)
    q, _, _ = make_qkv(2, 2, 9, 16)
    k, v, _ = make_qkv(2, 2, 4, 16, seed=3)
    pk, pv = make_prompts(1, 2, 3, 16)
    dout = torch.randn(2, 2, 9, 16)
    got = run(lambda *a: ext(*a, path=path), (q, k, v, pk, pv), dout)
    compare(got, run(prompt_attention_ref, (q, k, v, pk, pv), dout))

    empty_q = q[:, :, :0]
    out, lse = fns.fwd(empty_q, k, v, pk, pv, None, None, 0.25)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)

    no_k, no_v = k[:, :, :0], v[:, :, :0]
    no_pk, no_pv = pk[:, :, :0], pv[:, :, :0]
    out, lse = fns.fwd(q, no_k, no_v, no_pk, no_pv, None, None, 0.25)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    grads = fns.bwd(dout, q, no_k, no_v, no_pk, no_pv, None, None, out, lse, 0.25)
    assert all(bool((g == 0).all()) for g in grads)
    lengths = torch.tensor([0])
    out, lse = fns.fwd(q, no_k, no_v, pk, pv, None, lengths, 0.25)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    grads = fns.bwd(dout, q, no_k, no_v, pk, pv, None, lengths, out, lse, 0.25)
    assert all(bool((g == 0).all()) for g in grads)


def test_an_infinite_scale_gives_the_references_finite_output():
    """scale = inf: the reference's out is 0 and lse +inf (no finite softmax exists); the CPU
    kernels gave NaN."""
    q, k, v = make_qkv(2, 2, 9, 16)
    pk, pv = make_prompts(2, 2, 5, 16)
    index = torch.tensor([1, 0])
    for scale in (float("inf"), float("-inf")):
        out, lse = cpp.prompt_attention_fwd(q, k, v, pk, pv, index, None, scale)
        ref_out, ref_lse = prompt_attention_ref(q, k, v, pk, pv, index, scale=scale)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        dout = torch.randn_like(q)
        grads = cpp.prompt_attention_bwd(dout, q, k, v, pk, pv, index, None, out, lse, scale)
        assert grads[2].abs().max() == 0 and grads[4].abs().max() == 0  # dv, dprompt_v: P = 0


def _pytorch_same_dtype(q, k, v, pk, pv, index):
    """PyTorch's own computation in the input dtype: cat + SDPA, and logsumexp for lse."""
    keys, values = torch.cat([pk[index], k], 2), torch.cat([pv[index], v], 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
    lse = torch.logsumexp((q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [7, 50, 200])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "indexed"])
@pytest.mark.parametrize("place", PLACES, ids=_place_id)
def test_half_precision_error_within_pytorchs(dtype, p, shared, place):
    """Error vs the fp32 reference <= 2x PyTorch's same-dtype error (3x for gradients)."""
    device, path = place
    b, h, n, d, t = 3, 2, 61, 64, 1 if shared else 2
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True, device=device)
    pk, pv = make_prompts(t, h, p, d, device=device)
    dout = torch.randn(b, h, n, d, device=device)
    index = torch.tensor([0, 0, 0] if shared else [0, 1, 1], device=device)
    low = [x.to(dtype) for x in (q, k, v, pk, pv)]
    ref = run(
        lambda *a: prompt_attention_ref(*a, index), [x.float() for x in low], dout.to(dtype).float()
    )
    got = run(lambda *a: ext(*a, None if shared else index, path=path), low, dout.to(dtype))
    same = run(lambda *a: _pytorch_same_dtype(*a, index), low, dout.to(dtype))
    for i, name in enumerate(NAMES):
        assert got[i].dtype == same[i].dtype or name in ("lse",), name
        assert_close_vs_ref(got[i], ref[i], same[i], name, factor=2.0 if i < 2 else 3.0)


@pytest.mark.parametrize("path", PATHS)
def test_backward_is_deterministic(path):
    q, k, v = make_qkv(6, 3, 41, 32)
    pk, pv = make_prompts(3, 3, 50, 32)
    index = torch.tensor([0, 2, 1, 1, 0, 2])
    dout = torch.randn(6, 3, 41, 32)
    first = run(lambda *a: ext(*a, index, path=path), (q, k, v, pk, pv), dout)
    second = run(lambda *a: ext(*a, index, path=path), (q, k, v, pk, pv), dout)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("path", PATHS)
def test_per_image_sets_sum_each_sets_own_sequences(path):
    """One set per sequence (T = B) and sets with several or no sequences: each set's gradient
    is the sum over its own sequences only (the reduction visits members, not all B)."""
    b, h, n, d = 9, 1, 5, 8
    q, k, v = make_qkv(b, h, n, d)
    for index in (torch.arange(b).flip(0), torch.tensor([3, 0, 3, 3, 5, 0, 8, 3, 0])):
        t = int(index.max()) + 2  # the last set has no sequence
        pk, pv = make_prompts(t, h, 4, d)
        dout = torch.randn(b, h, n, d)
        got = run(lambda *a, ix=index: ext(*a, ix, path=path), (q, k, v, pk, pv), dout)
        ref = run(lambda *a, ix=index: prompt_attention_ref(*a, ix), (q, k, v, pk, pv), dout)
        compare(got, ref)
        assert got[5][-1].abs().max() == 0


@pytest.mark.parametrize("path", PATHS)
def test_long_runs_of_sequences_with_one_set(path):
    """The CPU backward sums a set's prompt-key gradients in runs of consecutive sequences (at
    most 16 each): a shared set over 40 sequences, and indexed sets in runs longer and shorter
    than 16, interrupted and resumed, as a windowed model's windows arrive image by image."""
    b, h, n, d = 40, 2, 9, 8
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(3, h, 5, d)
    dout = torch.randn(b, h, n, d)
    runs = torch.tensor([0] * 18 + [2] * 3 + [0] * 17 + [1] * 2)
    for index in (None, runs, torch.arange(2).repeat_interleave(20)):
        got, ref = against_reference(path, (q, k, v, pk, pv), dout, index, None)
        compare(got, ref)


@pytest.mark.parametrize("p", [0, 1, 5])
@pytest.mark.parametrize("path", PATHS)
def test_runs_cut_by_sets_lengths_and_a_bias_period(path, p):
    """The run edges together: 39 sequences (runs of 16 do not divide them), set changes inside
    a run, a set whose length is 0, a key_bias period (3) that divides neither the run length
    nor the runs, P in {0, 1, 5}; and a batch of one sequence."""
    b, h, n, d = 39, 2, 6, 8
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(3, h, p, d)
    index = torch.tensor([0] * 17 + [1] + [0] * 5 + [2] * 16)
    lengths = torch.tensor([p, 0, min(p, 3)])
    bias = torch.randn(3, h, n, n)
    bias[1, :, 2, ::2] = -100.0
    dout = torch.randn(b, h, n, d)
    got, ref = against_reference(path, (q, k, v, pk, pv), dout, index, lengths, bias)
    compare(got, ref)
    one = [t[:1] for t in (q, k, v)] + [pk, pv]
    got, ref = against_reference(path, one, dout[:1], index[-1:], lengths, bias[:1])
    compare(got, ref)


def test_backward_does_not_depend_on_the_thread_count():
    """Runs of sequences are fixed by the input, not by how the work is split among threads."""
    q, k, v = make_qkv(37, 3, 23, 16, non_contiguous=True)
    pk, pv = make_prompts(2, 3, 7, 16)
    index = torch.tensor([0] * 20 + [1] * 17)
    dout = torch.randn(37, 3, 23, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(lambda *a: ext(*a, index), (q, k, v, pk, pv), dout)
        torch.set_num_threads(3)
        three = run(lambda *a: ext(*a, index), (q, k, v, pk, pv), dout)
    finally:
        torch.set_num_threads(threads)
    for name, a, c in zip(NAMES, one, three):
        assert torch.equal(a, c), name


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


def test_build_info_describes_the_build():
    info = cpp.build_info()
    assert info["loaded"] is True and info["compiler"]
    assert "cpu_isa=" in info["build"] and "gemm=" in info["build"]
    assert info["cache"] or info["how"].startswith("ahead")
