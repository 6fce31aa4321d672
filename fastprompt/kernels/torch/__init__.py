"""The ``torch`` backend: PyTorch's own attention on concatenated prompt K/V (runs everywhere)."""

from __future__ import annotations

from fastprompt.kernels.torch.prompt_attention import (
    prompt_attention_bwd,
    prompt_attention_bwd_scored,
    prompt_attention_fwd,
)

__all__ = [
    "availability",
    "prompt_attention_bwd",
    "prompt_attention_bwd_scored",
    "prompt_attention_fwd",
]


def availability() -> str | None:
    """Always None: plain PyTorch runs wherever torch does."""
    return None
