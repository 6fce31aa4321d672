"""The ``torch`` backend: concatenated prompt K/V + PyTorch's fused attention (runs everywhere).

Its declaration is in :mod:`fastprompt.backends`; the contract it implements in
``docs/design.md`` section 6.
"""

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
    """Always None: PyTorch's kernels run wherever torch does."""
    return None
