"""The ``cascade`` backend: cascade attention over PyTorch's own fused kernels.

The prompt part (a shared set's keys against every query of the batch as one sequence) and the
image part (each sequence against its own keys) are merged by log-sum-exp; see
:mod:`.prompt_attention`. Its declaration is in :mod:`fastprompt.backends`; the contract it
implements in ``docs/design.md`` section 6.
"""

from __future__ import annotations

from fastprompt.kernels.cascade.prompt_attention import (
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
