"""The precompile API's plumbing on the CPU: builds listed from the launchers' plans and the
pruner, compiled ahead of time for sm_90 in parallel worker processes (the two small untuned
kernels, about 20 s on 2 cores), errors named, a timeout honoured."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.backends.compiler")

from fastprompt.kernels import triton as tk
from fastprompt.kernels.triton import _precompile, _tuning

TINY = _precompile.Shape(batch=4, heads=2, n=40, p=8)


def test_builds_compile_in_worker_processes():
    report = tk.precompile(
        [torch.bfloat16], [64], [TINY], arch=90, roles=("preprocess", "reduce"), jobs=2
    )
    assert report.arch == 90 and report.jobs == 2 and not report.timed_out
    assert sorted(b["role"] for b in report.builds) == ["preprocess", "reduce"]
    assert not report.failures, report.failures
    for b in report.builds:
        assert b["compile_s"] is not None and b["smem"] is not None and b["load_s"] is None
        assert b["spill_bytes"] in (0, None)  # None: no cuobjdump to read it
    assert "2 of 2" in report.summary() and "sm_90" in report.summary()


def test_tuned_kernels_list_what_the_pruner_admits():
    """Without compiling: one build per admissible config, shapes that Triton would specialise
    alike listed once (P = 50 and 200: neither 1 nor a multiple of 16)."""
    shapes = [TINY, _precompile.Shape(batch=4, heads=2, n=40, p=24)]
    specs = _precompile._job_specs(
        [torch.float16], [128], shapes, 90, _tuning.SMEM_LIMIT[90], "admissible", ("dkdv",)
    )
    admitted = _tuning.admissible("dkdv", _tuning.CONFIGS["dkdv"], 128, 2, 90,
                                  _tuning.SMEM_LIMIT[90], 40, 24 + 40)  # fmt: skip
    assert [s["config"] for s in specs] == [list(c) for c in admitted]
    first = _precompile._job_specs(
        [torch.float16], [128], shapes, 90, _tuning.SMEM_LIMIT[90], "first", ("dkdv",)
    )
    assert [s["config"] for s in first] == [list(admitted[0])]
    indexed = _precompile.Shape(batch=4, heads=2, n=40, p=8, sets=4, indexed=True)
    both = _precompile._job_specs(
        [torch.float16], [128], [TINY, indexed], 90, _tuning.SMEM_LIMIT[90], "first", ("dkdv",)
    )
    assert len(both) == 2  # HAS_INDEX is a compile-time argument


def test_a_timeout_gives_up_and_says_so():
    report = tk.precompile([torch.bfloat16], [64], [TINY], arch=80, roles=("reduce",), timeout=0)
    assert report.timed_out and report.failures
    assert "timeout" in report.failures[0]["error"]


def test_loading_stops_at_the_deadline():
    """On a GPU, a disk-cache miss compiles serially while loading: past the deadline the rest
    are left unloaded and the report says it timed out (checked here before any GPU call)."""
    spec = _precompile._job_specs(
        [torch.bfloat16], [64], [TINY], 90, _tuning.SMEM_LIMIT[90], "first", ("reduce",)
    )[0]
    build = _precompile._empty(spec, None)
    assert _precompile._load_here([build], deadline=time.time() - 1)
    assert build["load_s"] is None and build["error"] is None


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="unknown roles"):
        tk.precompile(arch=90, roles=("fwd", "attention"))
    with pytest.raises(ValueError, match="configs must be"):
        tk.precompile(arch=90, configs="all")
    with pytest.raises(ValueError, match="arch must be one of"):
        tk.precompile(arch=75)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            tk.precompile()
