"""Pieces shared by the prompt-attention kernels: Triton helpers, head-dim split, launch plumbing.

Launchers build a list of :class:`Launch` (kernel, grid, arguments) and hand it to :func:`run`,
which launches on the inputs' device. The same plans are compiled ahead of time, without a GPU,
by :mod:`fastprompt.kernels.triton._aot`, so the static report sees exactly what runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from fastprompt.kernels.triton._capability import HEAD_DIM_SPLITS, SUPPORTED_HEAD_DIMS

LOG2E = 1.4426950408889634
# The same constants as kernel globals (Triton reads only constexpr globals inside kernels).
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)


def split_head_dim(d: int) -> tuple[int, int]:
    """``(D0, D1)`` with ``d = D0 + D1``, both powers of two >= 16 (``D1 = 0``: one chunk).

    d = 80 and 96 run as 64 + 16 and 64 + 32: two dots per product instead of one padded to 128,
    so no tensor-core work or register is spent on zero columns.
    """
    if d not in HEAD_DIM_SPLITS:
        raise ValueError(
            f"prompt_attention (triton): head dim {d} is not supported; "
            f"supported: {SUPPORTED_HEAD_DIMS}"
        )
    return HEAD_DIM_SPLITS[d]


def matmul_precision(dtype: torch.dtype, interpreting: bool) -> str:
    """``input_precision`` of the kernels' dots.

    16-bit inputs: irrelevant ("ieee"). fp32: "tf32" when the user allowed TF32 for matmuls
    (``torch.set_float32_matmul_precision("high" | "medium")``), else "tf32x3" (three TF32
    products, about fp32 accuracy, still on tensor cores). Plain fp32 FMA ("ieee") is never used on
    a GPU: it runs on CUDA cores and spills. The interpreter computes in fp32 regardless.
    """
    if dtype != torch.float32 or interpreting:
        return "ieee"
    return "tf32" if torch.get_float32_matmul_precision() in ("high", "medium") else "tf32x3"


def bucket(x: int, cap: int) -> int:
    """Autotuning bucket of a size: 0, or the next power of two, capped."""
    return 0 if x <= 0 else min(triton.next_power_of_2(x), cap)


@dataclass
class Launch:
    """One kernel launch: an autotuned kernel (or a plain jit function), its grid and arguments.

    ``grid`` is a callable of the config's meta-parameters, as Triton takes it.
    """

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)
    role: str = ""


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the launches (Triton launches on the current one)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton.jit
def load_tile(
    base, rows, s_r, s_c, n_rows, C0: tl.constexpr, W: tl.constexpr, MASKED: tl.constexpr
):
    """Rows ``rows`` × columns ``[C0, C0 + W)`` of a row-major-ish tile; with MASKED, rows at or
    past ``n_rows`` read as 0 (only a sequence's last block pays for the mask)."""
    cols = C0 + tl.arange(0, W)
    ptrs = base + rows[:, None] * s_r + cols[None, :] * s_c
    if MASKED:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def prompt_set(IDX, LENS, b, T, P, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Set index (int64), valid prompt keys (int32) and a bad-input flag for sequence ``b``.

    Out-of-range values are clamped so that no read leaves the tables, and flagged: the caller
    writes NaN to that sequence's outputs, so a bad index never passes silently. (The op checks
    the ranges loudly; this is the kernel's memory-safety net.)
    """
    bad = b < 0
    t = (b * 0).to(tl.int64)
    if HAS_INDEX:
        raw = tl.load(IDX + b).to(tl.int64)
        bad = (raw < 0) | (raw >= T)
        t = tl.where(bad, 0, raw)
    plen = (b * 0 + P).to(tl.int32)
    if HAS_LENGTHS:
        raw_len = tl.load(LENS + t).to(tl.int64)
        bad = bad | (raw_len < 0) | (raw_len > P)
        plen = tl.minimum(tl.maximum(raw_len, 0), P).to(tl.int32)
    return t, plen, bad
