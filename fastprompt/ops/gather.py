"""``gather_prompts``: pack the kept prompts of every block into one table, no padding.

Packing runs once per condensed model, on at most L·P rows (12 × 200 × 768 values for ViT-B/16),
as one ``index_select``: a single gather kernel on any device, with autograd's scatter into the
kept rows as its backward. A dedicated C++/CUDA kernel for it had nothing to win on that path and
was removed. Per-sequence gathering of prompt K/V by index needs no op of its own:
``prompt_attention`` reads a table of sets through ``prompt_index`` (stride 0 for a shared set)
without per-sequence copies.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_prompts", "gather_prompts_ref"]


def gather_prompts_ref(table: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Reference: a Python loop over blocks (the test oracle)."""
    rows = [table[layer][keep[layer]] for layer in range(table.shape[0])]
    counts = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    return torch.cat(rows, 0), counts


def gather_prompts(table: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Kept prompts of every block, packed block after block.

    Parameters
    ----------
    table : Tensor, shape (L, P, D)
        Prompts of L blocks.
    keep : Tensor of bool, shape (L, P)
        Which prompts each block keeps; blocks may keep different counts, or none.

    Returns
    -------
    packed : Tensor, shape (K, D)
        The kept rows in (block, index) order, K = keep.sum(). Its backward scatters into the
        kept rows of ``table`` only.
    counts : Tensor of int64, shape (L,)
        Kept prompts per block (offsets are their cumulative sum).
    """
    if table.dim() != 3:
        raise ValueError(f"gather_prompts: table must be (L, P, D), got {tuple(table.shape)}")
    if keep.dtype != torch.bool or keep.shape != table.shape[:2]:
        raise ValueError(
            f"gather_prompts: keep must be bool {tuple(table.shape[:2])}, got {keep.dtype} "
            f"{tuple(keep.shape)}"
        )
    rows = keep.to(table.device).flatten().nonzero().squeeze(1)
    packed = table.flatten(0, 1).index_select(0, rows)
    return packed, keep.sum(1).long().cpu()
