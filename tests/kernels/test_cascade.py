"""Cascade attention over PyTorch's kernels, and the kernel adapters both PyTorch backends share.

The decomposition (prompt part + image part, merged by log-sum-exp; each part's backward handed
the merged out and lse) against the fp32 reference, forward and backward, on the CPU flash kernel;
then which PyTorch kernel each (device, dtype) takes, and the CUDA adapters run on the CPU with
their aten ops replaced by emulations that keep the real schemas and output layouts (taken from
PyTorch's own meta functions), so the code a GPU runs is the code these tests cover.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, make_prompts, make_qkv

from fastprompt.kernels import cascade
from fastprompt.kernels.cascade import _merge
from fastprompt.kernels.cascade import prompt_attention as cascade_impl
from fastprompt.kernels.torch import _common, _sdpa
from fastprompt.kernels.torch import prompt_attention as concat
from fastprompt.ops.reference import prompt_attention_ref, prompt_scores_ref

NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v")
F32 = torch.float32


def _reference(q, k, v, pk, pv, index, lengths, scale, dout, key_bias=None):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, pk, pv)]
    out, lse = prompt_attention_ref(*leaves, index, lengths, scale, key_bias=key_bias)
    grads = torch.autograd.grad(out, leaves, dout.float(), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return (out, lse, *grads)


def _kernels(module, q, k, v, pk, pv, index, lengths, scale, dout, key_bias=None, **bwd_kw):
    kw = {} if key_bias is None else {"key_bias": key_bias}
    out, lse = module.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, scale, **kw)
    grads = module.prompt_attention_bwd(
        dout, q, k, v, pk, pv, index, lengths, out, lse, scale, **kw, **bwd_kw
    )
    return (out, lse, *grads)


def _compare(got, ref, **tol):
    for name, a, e in zip(NAMES, got, ref):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert_close(a.float(), e.float(), name, **tol)


# (B, H, N, N_k, d, T, P, index, lengths)
CASES = {
    "shared": (3, 2, 11, 11, 16, 1, 7, None, None),
    "shared-lengths": (3, 2, 11, 11, 16, 1, 7, None, [4]),
    "shared-empty-set": (3, 2, 11, 11, 16, 1, 7, None, [0]),
    "indexed": (4, 2, 9, 9, 16, 3, 5, [2, 0, 2, 1], None),
    "indexed-lengths": (4, 2, 9, 9, 16, 3, 5, [2, 0, 2, 1], [5, 0, 3]),
    "key-count": (2, 2, 9, 14, 16, 1, 6, None, None),
    "no-prompts": (2, 2, 9, 9, 16, 1, 0, None, None),
    "no-image-keys": (2, 2, 9, 0, 16, 2, 4, [1, 0], None),
    "no-key-at-all": (2, 2, 9, 0, 16, 2, 4, [1, 0], [4, 0]),
    "no-queries": (2, 2, 0, 5, 16, 1, 4, None, None),
    "one-query": (2, 3, 1, 1, 8, 1, 3, None, None),
}


@pytest.mark.parametrize("module", [cascade, concat], ids=["cascade", "concat"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_the_fp32_reference(module, case):
    b, h, n, n_k, d, t, p, index, lengths = CASES[case]
    q, _, _ = make_qkv(b, h, n, d, non_contiguous=True)
    k, v, _ = make_qkv(b, h, n_k, d, seed=3)
    pk, pv = make_prompts(t, h, p, d)
    index = None if index is None else torch.tensor(index)
    lengths = None if lengths is None else torch.tensor(lengths)
    dout = torch.randn(b, h, n, d)
    args = (q, k, v, pk, pv, index, lengths, d**-0.5, dout)
    _compare(_kernels(module, *args), _reference(*args))


@pytest.mark.parametrize("chunks", [1, 2, 6])
def test_the_shared_sets_long_call_split_into_chunks_gives_the_same_gradients(chunks):
    b, h, n, d, p = 6, 2, 5, 16, 9
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(1, h, p, d)
    dout = torch.randn(b, h, n, d)
    for lengths in (None, torch.tensor([4])):
        args = (q, k, v, pk, pv, None, lengths, 0.3, dout)
        _compare(_kernels(cascade, *args, chunks=chunks), _reference(*args))


@pytest.mark.parametrize("module", [cascade, concat], ids=["cascade", "concat"])
@pytest.mark.parametrize("shape", [(1, 2, 7, 7), (3, 1, 1, 7), (7, 7), (2, 1, 7)])
def test_key_bias_on_the_image_keys(module, shape):
    """Swin's bias: broadcast over any of (B, H, N, N_k); prompt keys get none; -inf masks."""
    b, h, n, d = 3, 2, 7, 16
    q, k, v = make_qkv(b, h, n, d)
    pk, pv = make_prompts(2, h, 4, d)
    bias = torch.randn(shape)
    bias[..., 0] = float("-inf")
    dout = torch.randn(b, h, n, d)
    index = torch.tensor([1, 0, 1])
    args = (q, k, v, pk, pv, index, None, 0.25, dout)
    _compare(_kernels(module, *args, key_bias=bias), _reference(*args, key_bias=bias))


@pytest.mark.parametrize("module", [cascade, concat], ids=["cascade", "concat"])
@pytest.mark.parametrize("indexed", [False, True])
def test_scored_backward_matches_the_reference_scores(module, indexed):
    b, h, n, d, p = 3, 2, 9, 16, 5
    t = 2 if indexed else 1
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(t, h, p, d)
    index = torch.tensor([1, 0, 1]) if indexed else None
    lengths = torch.tensor([5, 2]) if indexed else None
    g = torch.Generator().manual_seed(4)
    u_k, u_v = (torch.randn(2, t, h, p, d, generator=g) for _ in "kv")
    dout = torch.randn(b, h, n, d)
    scale = 0.3
    out, lse = module.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, scale)
    *grads, terms, gate = module.prompt_attention_bwd_scored(
        dout, q, k, v, pk, pv, index, lengths, out, lse, scale, u_k, u_v
    )
    plain = module.prompt_attention_bwd(dout, q, k, v, pk, pv, index, lengths, out, lse, scale)
    for name, a, e in zip(NAMES[2:], grads, plain):
        assert_close(a, e, name)
    # The per-sequence gradients by autograd on per-sequence copies of the sets.
    sets = torch.zeros(b, dtype=torch.long) if index is None else index
    pk_seq, pv_seq = pk[sets].requires_grad_(), pv[sets].requires_grad_()
    lens = None if lengths is None else lengths[sets]
    ref_out, ref_lse = prompt_attention_ref(q, k, v, pk_seq, pv_seq, torch.arange(b), lens, scale)
    dpk, dpv = torch.autograd.grad(ref_out, (pk_seq, pv_seq), dout)
    delta = (dout * ref_out).sum(-1)
    ref_terms, ref_gate = prompt_scores_ref(
        q, pk, pv, ref_lse, delta, dpk, dpv, u_k, u_v, scale, index, lengths
    )
    assert_close(terms, ref_terms, "terms", atol=1e-4, rtol=1e-4)
    assert_close(gate, ref_gate, "gate", atol=1e-4, rtol=1e-4)


def test_the_merge_kernel_matches_the_pytorch_merge():
    """The Triton merge (in Triton's interpreter without a GPU, on the GPU with one, where
    Triton cannot read CPU tensors) against the PyTorch one."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, h, n, d = 2, 3, 5, 24
    g = torch.Generator().manual_seed(0)
    o_p = torch.randn(1, h, b * n, d, generator=g).to(device)
    o_p = cascade_impl._ungrouped(o_p, b, n)  # the long call's layout
    o_i = torch.randn(b, n, h, d, generator=g).to(device).transpose(1, 2)
    lse_p = torch.randn(b, h, n, generator=g).to(device)
    lse_i = torch.randn(b, h, n, generator=g).to(device)
    lse_p[0, 0, :2] = float("-inf")  # no prompt key
    lse_i[0, 0, 1:3] = float("-inf")  # no image key; row 1 has no key at all
    out_t, out_k = _common.empty_out(o_i), _common.empty_out(o_i)
    lse_t = _merge.merge_torch(o_p, lse_p, o_i, lse_i, out_t)
    lse_k = _merge.merge_triton(o_p, lse_p, o_i, lse_i, out_k)
    assert_close(out_k, out_t, "out", atol=1e-6, rtol=1e-6)
    assert_close(lse_k, lse_t, "lse", atol=1e-6, rtol=1e-6)
    assert torch.equal(out_t[0, 0, 1].cpu(), torch.zeros(d)) and lse_t[0, 0, 1] == float("-inf")


def test_reduce_over_sets_sums_in_batch_order_without_a_host_sync():
    per_seq = torch.randn(6, 2, 3, 4)
    index = torch.tensor([2, 0, 2, 2, 0, 1])
    got = _common.reduce_over_sets(per_seq, index, 4)
    expected = torch.stack([per_seq[index == t].sum(0) for t in range(4)])
    assert got.dtype == torch.float32 and torch.equal(got[3], torch.zeros(2, 3, 4))
    assert_close(got, expected, "per-set sums")
    assert torch.equal(got, _common.reduce_over_sets(per_seq, index, 4))


# ----------------------------------------------------------------------------------------------
# Which PyTorch kernel, and the CUDA adapters on emulated aten ops
# ----------------------------------------------------------------------------------------------

ALL = frozenset({"flash", "efficient", "cudnn"})
H100, A100, T4, V100 = (9, 0), (8, 0), (7, 5), (7, 0)


@pytest.mark.parametrize(
    "device, dtype, d, bias, cap, enabled, expected",
    [
        ("cpu", torch.float32, 64, False, None, ALL, "cpu_flash"),
        ("cpu", torch.bfloat16, 64, True, None, ALL, "cpu_flash"),
        ("cpu", torch.float64, 40, False, None, ALL, "cpu_flash"),
        ("cuda", torch.bfloat16, 64, False, H100, ALL, "flash"),
        ("cuda", torch.float16, 128, False, A100, ALL, "flash"),
        ("cuda", torch.bfloat16, 72, False, H100, ALL, "flash"),
        ("cuda", torch.bfloat16, 64, False, H100, ALL - {"flash"}, "cudnn"),
        ("cuda", torch.bfloat16, 64, False, H100, frozenset({"efficient"}), "efficient"),
        ("cuda", torch.bfloat16, 64, True, H100, ALL, "efficient"),
        ("cuda", torch.float32, 64, False, H100, ALL, "efficient"),
        ("cuda", torch.float32, 64, True, A100, ALL, "efficient"),
        ("cuda", torch.float16, 64, False, T4, ALL, "efficient"),
        ("cuda", torch.bfloat16, 64, False, T4, ALL, "math"),
        ("cuda", torch.float16, 60, False, H100, ALL, "math"),
        ("cuda", torch.float32, 62, False, H100, ALL, "math"),
        ("cuda", torch.float64, 64, False, H100, ALL, "math"),
        ("cuda", torch.bfloat16, 64, False, H100, frozenset(), "math"),
        ("cuda", torch.float32, 64, False, V100, ALL, "efficient"),
        ("mps", torch.float32, 64, False, None, ALL, "math"),
    ],
)
def test_which_pytorch_kernel_each_device_and_dtype_takes(
    device, dtype, d, bias, cap, enabled, expected
):
    assert _sdpa.select(device, dtype, d, bias, cap or (0, 0), enabled) == expected


def _schema_check(name: str, args, kwargs) -> None:
    """The call binds to the real aten schema: the argument count and keyword names match."""
    schema = getattr(torch.ops.aten, name).default._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    keywords = {a.name for a in schema.arguments if a.kwarg_only}
    required = [a for a in positional if a.default_value is None and not a.type.kind() == "Opt"]
    assert len(required) <= len(args) <= len(positional), (name, len(args), len(positional))
    assert set(kwargs) <= keywords, (name, set(kwargs) - keywords)


def _meta_outputs(name, args, kwargs):
    def meta(x):
        return torch.empty(x.shape, dtype=x.dtype, device="meta") if torch.is_tensor(x) else x

    return getattr(torch.ops.aten, name)(
        *[meta(a) for a in args], **{k: meta(v) for k, v in kwargs.items()}
    )


def _emulation(name: str):
    """A CPU stand-in for a CUDA aten op with its schema and its output layouts."""
    forward = not name.endswith("backward")

    def run(*args, **kwargs):
        _schema_check(name, args, kwargs)
        shapes = _meta_outputs(name, args, kwargs)
        scale = kwargs["scale"]
        if forward:
            q, k, v = args[:3]
            bias = args[3] if "efficient" in name or "cudnn" in name else None
            s = (q.float() @ k.float().transpose(-1, -2)) * scale
            if bias is not None:
                s = s + bias.float()
            lse = torch.logsumexp(s, -1)
            out = (torch.softmax(s, -1) @ v.float()).to(q.dtype)
            raw = torch.zeros(shapes[1].shape)
            if raw.dim() == 4:
                raw[..., 0] = lse
            else:
                raw[..., : lse.shape[-1]] = lse
            return (out, raw, *shapes[2:])
        dout, q, k, v = args[:4]
        if "flash" in name:
            out, raw, bias = args[4], args[5], None
        elif "cudnn" in name:
            out, raw, bias = args[4], args[5], args[8]
        else:
            bias, out, raw = args[4], args[5], args[6]
        # The lse must come in the forward's own layout.
        fwd_name = name.replace("_backward", "")
        fwd_args = (q, k, v) if "flash" in fwd_name else (q, k, v, None, True)
        assert raw.shape == _meta_outputs(fwd_name, fwd_args, {"scale": scale})[1].shape
        lse = raw[..., 0] if raw.dim() == 4 else raw[..., : q.shape[2]]
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias.float()
        probs = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
        do = dout.float()
        dv = probs.transpose(-1, -2) @ do
        ds = probs * (do @ v.float().transpose(-1, -2) - (do * out.float()).sum(-1, keepdim=True))
        grads = [((ds @ k.float()) * scale), ((ds.transpose(-1, -2) @ q.float()) * scale), dv]
        grads = [g.to(q.dtype) for g in grads]
        return (*grads, None) if "efficient" in name else tuple(grads)

    return run


@pytest.fixture
def emulated_cuda_kernels(monkeypatch):
    cuda_ops = {n for kernel in ("flash", "efficient", "cudnn") for n in _sdpa.ATEN[kernel]}
    real = _sdpa.op
    monkeypatch.setattr(_sdpa, "op", lambda n: _emulation(n) if n in cuda_ops else real(n))


@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
@pytest.mark.parametrize("module", [cascade, concat], ids=["cascade", "concat"])
@pytest.mark.parametrize("case", ["shared", "indexed-lengths", "key-count", "no-key-at-all"])
def test_cuda_adapters_on_emulated_kernels(
    emulated_cuda_kernels, monkeypatch, kernel, module, case
):
    """The orchestration a GPU runs (layouts, lse layouts, biases, arguments) on the CPU."""
    monkeypatch.setattr(
        _sdpa, "kernel_for", lambda q, has_bias: "efficient" if has_bias else kernel
    )
    for mod in (cascade_impl, concat):
        monkeypatch.setattr(mod, "kernel_for", _sdpa.kernel_for)
    b, h, n, n_k, d, t, p, index, lengths = CASES[case]
    q, _, _ = make_qkv(b, h, n, d, non_contiguous=True)
    k, v, _ = make_qkv(b, h, n_k, d, seed=3)
    pk, pv = make_prompts(t, h, p, d)
    index = None if index is None else torch.tensor(index)
    lengths = None if lengths is None else torch.tensor(lengths)
    dout = torch.randn(b, h, n, d)
    args = (q, k, v, pk, pv, index, lengths, d**-0.5, dout)
    extra = {"chunks": b} if module is cascade and index is None else {}
    _compare(_kernels(module, *args, **extra), _reference(*args))


@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn", "cpu_flash"])
@pytest.mark.parametrize("module", [cascade, concat], ids=["cascade", "concat"])
@pytest.mark.parametrize("bias_rows", [None, 1, 2, 5, 10], ids=lambda g: f"bias{g}")
def test_calls_over_the_grids_sequence_limit_are_made_in_parts(
    emulated_cuda_kernels, monkeypatch, kernel, module, bias_rows
):
    """No fused kernel is handed more than MAX_SEQUENCES sequences (CUDA's grid limit, here 4):
    a periodic bias (G rows) keeps whole periods per call, or is read row by row."""
    limit, seen = 4, []
    real = _sdpa.op

    def counted(name):
        def run(*args, **kwargs):
            seen.append(args[1].shape[0] if name.endswith("backward") else args[0].shape[0])
            return real(name)(*args, **kwargs)

        return run

    monkeypatch.setattr(_sdpa, "op", counted)
    monkeypatch.setattr(_sdpa, "MAX_SEQUENCES", limit)
    monkeypatch.setattr(
        _sdpa, "kernel_for", lambda q, has_bias: "efficient" if has_bias else kernel
    )
    if kernel == "cpu_flash":
        monkeypatch.setattr(_sdpa, "kernel_for", lambda q, has_bias: "cpu_flash")
    for mod in (cascade_impl, concat):
        monkeypatch.setattr(mod, "kernel_for", _sdpa.kernel_for)
    b, h, n, d = 10, 2, 5, 16
    q, k, v = make_qkv(b, h, n, d, non_contiguous=True)
    pk, pv = make_prompts(3, h, 4, d)
    index = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0])
    lengths = torch.tensor([4, 1, 3])
    bias = None if bias_rows is None else torch.randn(bias_rows, 1, n, n)
    dout = torch.randn(b, h, n, d)
    args = (q, k, v, pk, pv, index, lengths, d**-0.5, dout)
    _compare(_kernels(module, *args, key_bias=bias), _reference(*args, key_bias=bias))
    assert seen and max(seen) <= limit, seen


def test_efficient_bias_is_aligned_and_broadcast_without_copies():
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 3, 7, 8)
    small = torch.zeros(1, 1, 1, 7)
    prepared = _sdpa._efficient_bias(small, q, k)
    assert prepared.shape == (2, 3, 5, 7) and prepared.stride()[:3] == (0, 0, 0)
    windows = torch.randn(2, 1, 5, 7)  # stride(-2) = 7: padded to 16
    prepared = _sdpa._efficient_bias(windows, q, k)
    assert prepared.stride(-2) % 16 == 0 and prepared.stride(1) == 0
    assert torch.equal(prepared[:, 0], windows[:, 0])
    per_query = torch.randn(2, 1, 5, 1)  # broadcast over the keys: widened, unit stride along them
    prepared = _sdpa._efficient_bias(per_query, q, k)
    assert prepared.stride(-1) == 1 and prepared.stride(-2) % 16 == 0
    assert torch.equal(prepared[:, 0], per_query[:, 0].expand(2, 5, 7))


def test_long_calls_are_chunked_to_fill_a_gpu(monkeypatch):
    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    q = torch.empty(64, 12, 197, 64, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    chunks = cascade_impl.long_chunks(q, 200)
    assert 64 % chunks == 0 and chunks * 12 * 2 >= 2 * 132
    assert cascade_impl.long_chunks(torch.empty(1, 12, 197, 64, device="meta"), 200) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn", "math"])
@pytest.mark.parametrize("module", [cascade, concat], ids=["cascade", "concat"])
@pytest.mark.parametrize("case", ["shared", "indexed-lengths", "key-count", "no-key-at-all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_each_pytorch_kernel_on_the_gpu(monkeypatch, kernel, module, case, dtype):
    """Every adapter on the real CUDA kernels (flash and cuDNN take 16-bit inputs only)."""
    if dtype == torch.float32 and kernel in ("flash", "cudnn"):
        pytest.skip(f"{kernel} takes no fp32")
    enabled = _sdpa.enabled_cuda_kernels()
    if kernel in ("flash", "cudnn", "efficient") and kernel not in enabled:
        pytest.skip(f"{kernel} is not built into this torch or switched off")

    def forced(q, has_bias):
        if has_bias and kernel in ("flash", "cudnn"):
            return "efficient"
        return kernel

    for mod in (cascade_impl, concat):
        monkeypatch.setattr(mod, "kernel_for", forced)
    b, h, n, n_k, d, t, p, index, lengths = CASES[case]
    d = 64
    q, _, _ = make_qkv(b, h, n, d, non_contiguous=True, device="cuda", dtype=dtype)
    k, v, _ = make_qkv(b, h, n_k, d, seed=3, device="cuda", dtype=dtype)
    pk, pv = make_prompts(t, h, p, d, device="cuda", dtype=dtype)
    index = None if index is None else torch.tensor(index, device="cuda")
    lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
    dout = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    args = (q, k, v, pk, pv, index, lengths, d**-0.5, dout)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    _compare(_kernels(module, *args), _reference(*args), **tol)
