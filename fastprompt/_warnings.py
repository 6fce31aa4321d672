"""Warnings attributed to the line of the person's code that led to them."""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn_at_caller"]

# Frames in these folders are fastprompt's or torch's (a module's __call__, a checkpoint's
# recomputation), never the person's.
_INSIDE = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__) if f
)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` pointing at the first frame outside fastprompt and
    torch: the person's ``prompted(x)`` or ``load_prompts(...)``, however deep inside the
    warning was raised (a fixed ``stacklevel`` points inside once the call path changes)."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
