"""The one place that reads ``FASTPROMPT_*`` environment variables.

Every other module asks this one, so a user can find every knob in a single file and tests can
override them with ``monkeypatch.setenv`` before calling :func:`get`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Settings", "get"]


@dataclass(frozen=True)
class Settings:
    """Settings read from the environment.

    Attributes
    ----------
    backend : str or None
        ``FASTPROMPT_BACKEND``: force one backend for every op (strict: raises if it cannot run).
        One of :data:`fastprompt.backends.NAMES`.
    verbose : bool
        ``FASTPROMPT_VERBOSE=1``: log every dispatch decision, not only the first fallback.
    triton_interpret : bool
        ``TRITON_INTERPRET=1`` (Triton's own variable): Triton kernels run on CPU tensors, slowly;
        the Triton backend then accepts CPU tensors when asked for explicitly.
    """

    backend: str | None
    verbose: bool
    triton_interpret: bool


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def get() -> Settings:
    """Read the variables now (cheap; not cached, so tests can change them)."""
    from fastprompt.backends import NAMES

    backend = os.environ.get("FASTPROMPT_BACKEND", "").strip().lower() or None
    if backend is not None and backend not in NAMES:
        raise ValueError(
            f"FASTPROMPT_BACKEND={backend!r} is not a backend; expected one of {NAMES}"
        )
    return Settings(
        backend=backend,
        verbose=_flag("FASTPROMPT_VERBOSE"),
        triton_interpret=_flag("TRITON_INTERPRET"),
    )
