"""The prompt_attention op beyond what every backend must do (``test_conformance.py``): its
reference against independent computations, what autograd keeps, gradcheck, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, make_prompts, make_qkv

from fastprompt import backends
from fastprompt.ops import prompt_attention, prompt_attention_ref


def test_the_references_import_only_torch():
    """An oracle shares no code with what it checks (also an import-linter contract)."""
    import ast
    import inspect

    from fastprompt.ops import reference

    tree = ast.parse(inspect.getsource(reference))
    imported = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"torch", "__future__"}, imported


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


def _sdpa_oracle(q, k, v, pk, pv, index, lengths, key_bias):
    """Per sequence, the valid prompt keys cut out and an explicit float mask: shares no code."""
    outs = []
    for b in range(q.shape[0]):
        t = 0 if index is None else int(index[b])
        n_valid = pk.shape[2] if lengths is None else int(lengths[t])
        keys = torch.cat([pk[t, :, :n_valid], k[b]], 1).double()
        values = torch.cat([pv[t, :, :n_valid], v[b]], 1).double()
        mask = torch.zeros(q.shape[1], q.shape[2], keys.shape[1], dtype=torch.float64)
        if key_bias is not None:
            full = key_bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            mask[..., n_valid:] = full[b].double()
        outs.append(F.scaled_dot_product_attention(q[b].double(), keys, values, attn_mask=mask))
    return torch.stack(outs)


@pytest.mark.parametrize(
    "case", ["shared", "indexed", "indexed+lengths", "shared+lengths", "key_bias", "key_count"]
)
def test_reference_against_an_independent_oracle(case):
    b, h, n, d, t, p = 4, 2, 11, 16, 3, 5
    q, _, _ = make_qkv(b, h, n, d, non_contiguous=True)
    n_k = 7 if case == "key_count" else n
    k, v, _ = make_qkv(b, h, n_k, d, seed=2)
    pk, pv = make_prompts(t, h, p, d)
    index = torch.tensor([2, 0, 1, 2]) if "indexed" in case else None
    lengths = torch.tensor([5, 0, 2]) if "lengths" in case else None
    bias = torch.randn(1, h, n, n_k) if case == "key_bias" else None
    expected = _sdpa_oracle(q, k, v, pk, pv, index, lengths, bias)
    got, _ = prompt_attention_ref(q, k, v, pk, pv, index, lengths, key_bias=bias)
    assert_close(got.double(), expected, "out", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [b.name for b in backends.BACKENDS if torch.float64 in b.dtypes])
def test_gradcheck_float64(name):
    q, k, v = make_qkv(2, 1, 4, 4, dtype=torch.float64)
    pk, pv = make_prompts(2, 1, 3, 4, dtype=torch.float64)
    index, lengths = torch.tensor([1, 0]), torch.tensor([3, 2])
    bias = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    assert torch.autograd.gradcheck(
        lambda *a: prompt_attention(*a, index, lengths, backend=name, key_bias=bias)[0], inputs
    )


def test_does_not_save_concatenated_keys():
    """Autograd keeps image q/k/v, the prompt set once, out and lse, nothing of size B·(P+N)."""
    b, h, n, d, p = 4, 2, 9, 16, 50
    q, k, v = (t.requires_grad_() for t in make_qkv(b, h, n, d))
    pk, pv = (t.requires_grad_() for t in make_prompts(1, h, p, d))
    for name in ("torch", "cascade"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            prompt_attention(q, k, v, pk, pv, backend=name)
        assert saved, "nothing saved for backward"
        assert all(t.shape[2:3] != (p + n,) for t in saved if t.dim() == 4), name


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_index=torch.tensor([0, 5])), "prompt_index values"),
        (dict(prompt_index=torch.tensor([0.0, 1.0])), "prompt_index must be an int"),
        (dict(prompt_lengths=torch.tensor([9])), "prompt_lengths values"),
        (dict(prompt_lengths=torch.tensor([-1])), "prompt_lengths values"),
        (dict(backend="nope"), "backend='nope' does not exist"),
        (dict(key_bias=torch.zeros(3, 2, 5, 5)), r"key_bias \(3, 2, 5, 5\) must broadcast"),
        (dict(key_bias=torch.zeros(2, 5, 4)), "must broadcast to"),
        (dict(key_bias=torch.zeros(0, 2, 5, 5)), "first dimension 1, B or a divisor of B"),
        (dict(key_bias=torch.zeros(1, 1, 5, 5, dtype=torch.long)), "floating-point"),
        (dict(key_bias=torch.zeros(1, 1, 5, 5, requires_grad=True)), "does not differentiate"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(1, 2, 3, 8)
    with pytest.raises(ValueError, match=match):
        prompt_attention(q, k, v, pk, pv, **kwargs)


def test_shape_mismatches_name_what_is_needed():
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(1, 2, 3, 16)
    with pytest.raises(ValueError, match="prompt_k must be"):
        prompt_attention(q, k, v, pk, pv)
    pk, pv = make_prompts(1, 2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="must match"):
        prompt_attention(q, k, v, pk, pv)
    pk, pv = make_prompts(1, 2, 3, 8)
    with pytest.raises(
        ValueError, match=r"k \(2, 2, 5, 8\) and v \(2, 2, 4, 8\) must have the same"
    ):
        prompt_attention(q, k, v[:, :, :4], pk, pv)
    with pytest.raises(ValueError, match=r"k and v must be \(B=2, H=2, N_k, d=8\)"):
        prompt_attention(q, k[:1], v[:1], pk, pv)


def test_prompt_index_given_as_a_list_gets_a_clear_error():
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(2, 2, 3, 8)
    with pytest.raises(
        TypeError, match="prompt_index must be an int tensor of shape \\(2,\\) or None, got list"
    ):
        prompt_attention(q, k, v, pk, pv, [0, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_lengths=torch.tensor([-1])), r"prompt_lengths values must lie in \[0, 3\]"),
        (dict(prompt_lengths=torch.tensor([4])), r"prompt_lengths values must lie in \[0, 3\]"),
        (dict(prompt_index=torch.tensor([0, -1])), r"prompt_index values must lie in \[0, 0\]"),
        (dict(prompt_index=torch.tensor([0, 1])), r"prompt_index values must lie in \[0, 0\]"),
    ],
)
def test_the_reference_refuses_out_of_range_values_clearly(kwargs, match):
    """It used to accept lengths of -1 or above P and raise a raw IndexError for index -1."""
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(1, 2, 3, 8)
    with pytest.raises(ValueError, match=match):
        prompt_attention_ref(q, k, v, pk, pv, **kwargs)


def test_an_index_changed_behind_its_version_counter_is_checked_again():
    """A CPU index sharing a numpy array's memory changes without a version bump; a check kept
    per tensor and version let the kernels read its new, out-of-range values."""
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(2, 2, 3, 8)
    values = np.array([0, 1])
    index = torch.from_numpy(values)
    prompt_attention(q, k, v, pk, pv, index, backend="torch")
    values[1] = 7
    assert index._version == 0
    with pytest.raises(ValueError, match=r"prompt_index values must lie in \[0, 2\)"):
        prompt_attention(q, k, v, pk, pv, index, backend="torch")


@pytest.mark.parametrize(
    "scale, error, match",
    [
        (float("inf"), ValueError, "scale must be finite, got inf"),
        (float("-inf"), ValueError, "scale must be finite"),
        (float("nan"), ValueError, "scale must be finite"),
        ("0.5", TypeError, "scale must be a real number, got str"),
        (True, TypeError, "scale must be a real number, got bool"),
    ],
)
def test_a_scale_the_backends_would_disagree_on_is_refused(scale, error, match):
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(1, 2, 3, 8)
    with pytest.raises(error, match=match):
        prompt_attention(q, k, v, pk, pv, scale=scale, backend="torch")
    assert prompt_attention(q, k, v, pk, pv, scale=np.float32(0.5), backend="torch")[0].shape


def test_head_dim_0_asks_for_a_scale():
    q, k, v = (torch.randn(2, 2, 5, 0) for _ in range(3))
    pk, pv = make_prompts(1, 2, 3, 0)
    with pytest.raises(ValueError, match="head dim 0 has no default scale"):
        prompt_attention(q, k, v, pk, pv, backend="torch")


def test_an_inference_index_on_a_device_is_checked_at_every_call():
    """A device index made under inference_mode has no version counter: the per-version cache
    of device checks raised reading it (the meta device takes the same branch as CUDA)."""
    from fastprompt.ops.checks import _check_int_vector

    with torch.inference_mode():
        index = torch.tensor([0, 1], device="meta")
    for _ in range(2):
        _check_int_vector("op", "prompt_index", index, 2, index.device, 0, 1, "[0, 2)")


def test_a_compiled_call_checks_the_index_in_its_graph():
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 2, 5, 8)
    pk, pv = make_prompts(2, 2, 3, 8)

    def call(index):
        return prompt_attention(q, k, v, pk, pv, index, backend="torch")[0]

    compiled = torch.compile(call, fullgraph=True, backend="eager")
    assert_close(compiled(torch.tensor([1, 0])), call(torch.tensor([1, 0])), "compiled")
    with pytest.raises(RuntimeError, match=r"prompt_index values must lie in \[0, 2\)"):
        compiled(torch.tensor([1, 2]))


def test_collecting_the_op_tests_builds_nothing():
    """Collection used to compile the C++ extension (it asked every backend whether it runs)."""
    import subprocess
    import sys

    code = (
        "import sys, pytest\n"
        "rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/ops'])\n"
        "from fastprompt.kernels import cpp\n"
        "sys.exit(rc if not cpp._LOADED else 99)\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_the_cpu_kernel_gets_a_mask_unit_strided_along_the_keys():
    """torch 2.6's CPU flash kernel read a transposed mask as if it were not (the cascade's image
    part was off by 2 under a transposed 2-D key_bias); later torch reads its strides."""
    from fastprompt.kernels.torch._sdpa import _cpu_mask

    q = torch.randn(2, 2, 5, 8)
    mask = _cpu_mask(torch.randn(7, 5).t(), q)
    assert mask.stride(-1) == 1 and mask.shape[-2:] == (5, 7)
    broadcast = _cpu_mask(torch.randn(1, 1, 5, 1).expand(2, 2, 5, 7), q)
    assert broadcast.stride(0) == 0  # a mask broadcast along the keys alone is widened, not more
