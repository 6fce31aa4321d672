"""What the Triton backend can run, and what it is chosen for automatically.

Safe default until measured: automatic dispatch picks Triton only where its tests and the static
report cover it -- NVIDIA sm_80 (A100) and sm_90 (H100), fp16/bf16, head dims 32-128. Everything
else it supports runs only when asked for (``backend="triton"``). fp32 in particular goes to the
torch backend automatically: PyTorch's memory-efficient SDPA kernel computes fp32 on tensor cores
with 3xTF32 (about fp32 accuracy), which is what this backend would do too (``tf32x3``); the
Triton 3xTF32 kernels spill in every listed config (static report) and have no GPU measurement.

The backend registry entry reads these; the kernels folder is the one place that knows them.
"""

from __future__ import annotations

import torch

from fastprompt.kernels.triton._common import SUPPORTED_HEAD_DIMS

__all__ = [
    "AUTO_CAPABILITIES",
    "AUTO_DTYPES",
    "AUTO_HEAD_DIMS",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "not_auto_reasons",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
AUTO_DTYPES = (torch.float16, torch.bfloat16)
AUTO_HEAD_DIMS = (32, 64, 80, 96, 128)
# Compute capabilities the static report compiles for (and the gpu tests will run on).
AUTO_CAPABILITIES = ((8, 0), (9, 0))


def not_auto_reasons(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Why Triton is not chosen automatically for a call it could run (empty: it is chosen).

    Parameters
    ----------
    device : torch.device
        The inputs' device (only CUDA devices are ever chosen automatically).
    dtype : torch.dtype
        The inputs' dtype.
    head_dim : int
        d.

    Returns
    -------
    list of str
        Readable reasons, each naming what it got and what automatic choice needs.
    """
    reasons = []
    if device.type != "cuda":
        return [f"not chosen automatically on {device.type} (Triton runs there only interpreted)"]
    if not torch.cuda.is_available():
        return []  # nothing to ask a GPU; availability() says that Triton cannot run
    if torch.version.hip is not None:
        reasons.append("ROCm: the Triton kernels are not yet validated on AMD GPUs")
    else:
        cap = torch.cuda.get_device_capability(device)
        if cap not in AUTO_CAPABILITIES:
            covered = ", ".join(f"sm_{a}{b}" for a, b in AUTO_CAPABILITIES)
            reasons.append(
                f"compute capability sm_{cap[0]}{cap[1]} is not covered by the static report "
                f"and GPU tests yet ({covered} are)"
            )
    if dtype not in AUTO_DTYPES:
        reasons.append(
            f"dtype {dtype} is not chosen automatically (fp16/bf16 are; fp32 goes to torch's "
            "SDPA, which uses 3xTF32 tensor cores)"
        )
    if head_dim not in AUTO_HEAD_DIMS:
        reasons.append(f"head dim {head_dim} is not chosen automatically ({AUTO_HEAD_DIMS} are)")
    return reasons
