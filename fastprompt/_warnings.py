"""Warnings attributed to the line of the person's code that led to them, or, under the
``fastprompt`` command, to the command."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

import torch

__all__ = ["command_line", "warn_at_caller"]

# The fastprompt command running (``fastprompt evaluate``), innermost last: its warnings have no
# line of the person's code to point at (``python -m fastprompt`` put them at runpy's line).
_COMMANDS: list[str] = []
# The "default" warning filter shows each command warning once, as it does a line's.
_REGISTRY: dict = {}

# Frames in these folders are fastprompt's or torch's (a module's __call__, a checkpoint's
# recomputation), never the person's.
_INSIDE = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__) if f
)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` pointing at the first frame outside fastprompt and
    torch: the person's ``prompted(x)`` or ``load_prompts(...)``, however deep inside the
    warning was raised (a fixed ``stacklevel`` points inside once the call path changes).
    Under :func:`command_line` it names the command instead (``<fastprompt info>:0``)."""
    if _COMMANDS:
        warnings.warn_explicit(
            message, category, f"<{_COMMANDS[-1]}>", 0, module="fastprompt", registry=_REGISTRY
        )
        return
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def command_line(command: str) -> Iterator[None]:
    """While the ``fastprompt`` command ``command`` (``"fastprompt info"``) runs, its warnings
    name it rather than a line: the person's "line" is the command they typed."""
    _COMMANDS.append(command)
    try:
        yield
    finally:
        _COMMANDS.pop()
