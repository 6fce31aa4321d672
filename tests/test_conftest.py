"""The suite-wide fixtures of tests/conftest.py reach every test, not only tests/kernels."""

from __future__ import annotations

import torch


def test_gpu_tests_run_the_triton_kernels_untuned(request):
    # Outside tests/kernels too: on a GPU, autotuning every (dtype, d) of every test that reaches
    # the Triton backend cost about 300 serial compiles.
    assert "_untuned" in request.fixturenames
    if torch.cuda.is_available():
        from fastprompt.kernels.triton import _tuning

        assert _tuning.deterministic()
