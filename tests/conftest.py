"""Skip ``gpu``-marked tests cleanly without CUDA; run Triton kernels interpreted there.

On a GPU every test runs the Triton kernels untuned: each tuned kernel takes its first admissible
config (as in deterministic mode) instead of compiling and timing every config for every new
shape key, which would cost minutes of serial compiles. A test of the autotuning itself asks for
the ``autotuning`` fixture (one does).
"""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. This must be set before
# any kernel module is imported (Triton reads it when a kernel is decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker, not `"gpu" in item.keywords`: keywords also hold the names of the folders
        # above a test (a checkout in a folder called gpu would skip everything).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _untuned(request, monkeypatch):
    # Without CUDA the kernels are interpreted with one config: nothing to tune, nothing imported.
    if "autotuning" in request.fixturenames or not torch.cuda.is_available():
        return
    try:
        from fastprompt.kernels.triton import _tuning
    except ImportError:  # no Triton: its tests skip themselves
        return
    monkeypatch.setattr(_tuning, "deterministic", lambda: True)


@pytest.fixture
def autotuning():
    """Let the Triton autotuner time its configs in this test."""
