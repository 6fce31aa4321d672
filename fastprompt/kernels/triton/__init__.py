"""Triton kernels and their launchers."""

from __future__ import annotations

_IMPORT_ERROR: list[str | None] = []


def _import_error() -> str | None:
    # A plain list as cache: torch.compile traces this function, and it warns on lru_cache.
    if not _IMPORT_ERROR:
        try:
            import triton
            import triton.language  # noqa: F401

            _IMPORT_ERROR.append(None)
        except Exception as e:  # ImportError, or a broken install raising something else
            _IMPORT_ERROR.append(f"triton is not importable ({type(e).__name__}: {e})")
    return _IMPORT_ERROR[0]


def availability() -> str | None:
    """None when Triton kernels can run in this process, else why not."""
    import torch

    from fastprompt import _config

    why = _import_error()
    if why is not None:
        return why
    if not torch.cuda.is_available() and not _config.get().triton_interpret:
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"
    return None
