"""Whether Triton's interpreter (``TRITON_INTERPRET=1``) can run the kernels in this process.

Interpreted, a scalar is a one-element array, and older interpreters (Triton 3.2 among them)
turn it into a loop bound with ``int()``, which NumPy >= 2.4 refuses for arrays of one dimension
or more (triton-lang/triton#9171; newer Triton squeezes the array first). Every kernel here loops
over a key count that is an argument, so under that pairing every launch would fail with
"only 0-dimensional arrays can be converted to Python scalars". :func:`defect` runs one such loop
once and says why, so that the backend is refused with a remedy instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["defect"]


@triton.jit
def _count_kernel(out_ptr, n):
    count = 0
    for _ in range(0, n):  # a loop bound that is a kernel argument, as in every kernel here
        count += 1
    tl.store(out_ptr, count)


# A plain list as cache (as the backend's import check): one entry once probed.
_DEFECT: list[str | None] = []


def defect() -> str | None:
    """None when an interpreted kernel loops over an argument correctly, else why not."""
    if not _DEFECT:
        _DEFECT.append(_probe())
    return _DEFECT[0]


def _probe() -> str | None:
    import numpy

    versions = f"triton {triton.__version__} with numpy {numpy.__version__}"
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_kernel[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps what the kernel raised
        text = f"{type(e).__name__}: {e}"
        if "0-dimensional arrays" in text:
            return (
                f"Triton's interpreter ({versions}) cannot run a loop over a kernel argument: "
                "it converts a one-element array with int(), which numpy >= 2.4 refuses "
                "(triton-lang/triton#9171); install numpy<2.4 or a Triton with the fix"
            )
        return f"Triton's interpreter ({versions}) cannot run a minimal kernel: {text}"
    if int(out.item()) != 3:
        return f"Triton's interpreter ({versions}) counts a 3-step loop as {int(out.item())}"
    return None
