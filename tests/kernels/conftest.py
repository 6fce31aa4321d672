"""Triton kernel tests run untuned by default: each tuned kernel takes its first admissible config
(as in deterministic mode) instead of compiling and timing every config for every new shape key,
which would cost minutes on a GPU. Tests of the autotuning itself ask for ``autotuning``."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _untuned(request, monkeypatch):
    if "autotuning" in request.fixturenames:
        return
    try:
        from fastprompt.kernels.triton import _tuning
    except ImportError:  # no Triton: the tests skip themselves
        return
    monkeypatch.setattr(_tuning, "deterministic", lambda: True)


@pytest.fixture
def autotuning():
    """Let the Triton autotuner time its configs in this test."""
