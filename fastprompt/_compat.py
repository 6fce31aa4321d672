"""What differs between the torch versions fastprompt supports (torch >= 2.6)."""

from __future__ import annotations

import torch

__all__ = ["tracing"]


def tracing() -> bool:
    """Whether ``torch.compile`` or ``torch.export`` is tracing the code that asks.

    ``torch.compiler.is_exporting`` came in torch 2.7; before it, export traced through Dynamo,
    which ``is_compiling`` reports.
    """
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (exporting is not None and exporting())
