"""The CUDA kernels compile with nvcc for sm_80 and sm_90 without spilling, within the register
budget.

Needs the CUDA toolkit only, not a GPU (CI compiles them this way; about half a minute per
architecture on two cores). ``benchmarks/cuda_ptxas_report.py`` writes the full table.
The register budget, and why: ``fastprompt.kernels.cpp._ptxas.REGISTER_BUDGET``.
"""

from __future__ import annotations

import pytest

from fastprompt.kernels.cpp import _build, _ptxas

TOOLKIT, HOW = _build.find_cuda_toolkit()
pytestmark = pytest.mark.skipif(TOOLKIT is None, reason=f"no CUDA toolkit: {HOW}")


def _check(arch: str) -> None:
    rows, _ = _ptxas.compile_usage(arch, TOOLKIT)
    kernels = {r.kernel for r in rows}
    for name in ("check_sets_kernel", "merge_kernel", "reduce_sets_kernel", "score_terms_kernel"):
        assert any(name in k for k in kernels), f"{name} missing from {sorted(kernels)}"
    bad = [
        f"{r.file} {r.kernel} {r.arch}: {r.registers} registers, {r.spill_stores} B spill stores, "
        f"{r.spill_loads} B spill loads, {r.stack_bytes} B stack"
        for r in rows
        if r.spill_stores or r.spill_loads or r.stack_bytes or r.registers > _ptxas.REGISTER_BUDGET
    ]
    assert not bad, "\n".join(bad)


def test_kernels_fit_the_register_budget_without_spills_sm80():
    _check("8.0")


def test_kernels_fit_the_register_budget_without_spills_sm90():
    _check("9.0")


def test_ptxas_output_is_parsed():
    text = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 40 registers, 1024 bytes smem, 352 bytes cmem[0]\n"
    )
    (row,) = _ptxas.parse(text, "x.cu")
    assert (row.registers, row.spill_stores, row.spill_loads, row.stack_bytes) == (40, 16, 12, 8)
    assert row.static_smem_bytes == 1024 and row.arch == "sm_80" and row.kernel.startswith("foo")
