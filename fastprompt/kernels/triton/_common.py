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


def empty_heads_last(like: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, d) tensor of ``like``'s shape, dtype and device, stored as (B, N, H, d): the
    layout the op returns (heads merge into (B, N, H·d) without a copy)."""
    b, h, n, d = like.shape
    return like.new_empty((b, n, h, d)).transpose(1, 2)


# The kernels index a sequence's (or a prompt set's) elements with 32-bit integers: the offsets
# of heads, rows and features are products of int32 program values and strides that Triton passes
# as int32 when they fit. Only the batch (or set) offset is formed in 64 bits.
INT32_MAX = 2**31 - 1


def sequence_extent(shape, strides) -> int:
    """Largest element offset of one entry of dim 0 (a sequence, or a prompt set) from its
    first element: ``Σ (size - 1)·|stride|`` over the other dims (0 if any size is 0)."""
    if any(n == 0 for n in shape):
        return 0
    return sum((n - 1) * abs(s) for n, s in zip(shape[1:], strides[1:]))


def fits_int32(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` (B, H, N, d), or a compact copy of it if its own strides put one sequence's elements
    further apart than int32 offsets reach (a sequence-first layout such as ``(N, B, H·d)`` at a
    large batch: N·B·H·d elements); the copy is stored (B, N, H, d), one sequence spanning N·H·d.

    Raises
    ------
    ValueError
        If even compactly one entry holds more than 2^31 elements.
    """
    if sequence_extent(t.shape, t.stride()) <= INT32_MAX:
        return t
    if sequence_extent(t.shape, (0, t.shape[2] * t.shape[3], t.shape[3], 1)) > INT32_MAX:
        raise ValueError(
            f"prompt_attention (triton): {name} {tuple(t.shape)} holds "
            f"{t[0].numel()} elements per entry of its first dim; the Triton kernels index "
            f"within one with 32-bit offsets (at most {INT32_MAX + 1})"
        )
    return empty_heads_last(t).copy_(t)


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
def store_rows(base, rows, s_r, s_c, x, row_ok, C0: tl.constexpr, W: tl.constexpr):
    """Store ``x`` into rows ``rows`` × columns ``[C0, C0 + W)``, rows where ``row_ok``."""
    cols = C0 + tl.arange(0, W)
    tl.store(base + rows[:, None] * s_r + cols[None, :] * s_c, x, mask=row_ok[:, None])


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
