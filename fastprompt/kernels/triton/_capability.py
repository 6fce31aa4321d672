"""What the Triton kernels can run, and what they are chosen for automatically: the one place
that states it. Plain data (imports only torch, never Triton): the backend registry
(:mod:`fastprompt.backends`) builds the ``triton`` declaration from it, and the kernels read their
head-dim split from it.

Safe default until measured on a GPU: automatic dispatch picks Triton only where its tests and the
static report cover it -- NVIDIA sm_80 (A100) and sm_90 (H100), fp16/bf16, head dims 32-128.
Everything else it supports runs only when asked for (``backend="triton"``). fp32 goes to the
cascade over PyTorch's memory-efficient kernel automatically: the Triton fp32 path (3xTF32 on
tensor cores) spills in every listed config (static report) and has no GPU measurement.
"""

from __future__ import annotations

import torch

__all__ = [
    "AUTO_CAPABILITIES",
    "AUTO_DTYPES",
    "AUTO_HEAD_DIMS",
    "HEAD_DIM_SPLITS",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
]

# Head dims the kernels take without padding: one power-of-two chunk, or two (d = D0 + D1).
HEAD_DIM_SPLITS = {16: (16, 0), 32: (32, 0), 48: (32, 16), 64: (64, 0), 80: (64, 16)}
HEAD_DIM_SPLITS.update({96: (64, 32), 128: (128, 0)})
SUPPORTED_HEAD_DIMS = tuple(sorted(HEAD_DIM_SPLITS))
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AUTO_DTYPES = (torch.float16, torch.bfloat16)
AUTO_HEAD_DIMS = (32, 64, 80, 96, 128)
# Compute capabilities the static report compiles for (and the gpu tests will run on).
AUTO_CAPABILITIES = ((8, 0), (9, 0))
