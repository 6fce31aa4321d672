"""Skip ``gpu``-marked tests cleanly without CUDA; run Triton kernels interpreted there."""

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
