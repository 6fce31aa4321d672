"""The ``triton`` backend: Triton kernels and their launchers (the contract in ``docs/design.md``
section 6).

:func:`availability`, :func:`prompt_attention_fwd`, :func:`prompt_attention_bwd` (per-set fp32
prompt gradients, reduced by the backend's own kernel), :func:`prompt_attention_bwd_scored`, and
:func:`precompile` (every build the calls to come may need, compiled in parallel beforehand).
Kernel modules are imported on first use, so importing ``fastprompt`` never imports Triton.
What the kernels support and are chosen for automatically is declared in :mod:`._capability`.
"""

from __future__ import annotations

__all__ = [
    "availability",
    "device_availability",
    "precompile",
    "prompt_attention_bwd",
    "prompt_attention_bwd_scored",
    "prompt_attention_fwd",
]

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
    interpreting = _config.get().triton_interpret
    if not torch.cuda.is_available() and not interpreting:
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"
    if interpreting:
        from fastprompt.kernels.triton import _interpreter

        return _interpreter.defect()
    return None


def device_availability(device_type: str) -> str | None:
    """None when Triton kernels can take tensors on ``device_type`` here, else why not.

    Compiled, they take CUDA tensors only, even on a host with a GPU: CPU tensors need Triton's
    interpreter, which runs every kernel in Python (for tests)."""
    from fastprompt import _config

    why = availability()
    if why is None and device_type == "cpu" and not _config.get().triton_interpret:
        return (
            "Triton kernels take CUDA tensors; CPU tensors only under Triton's interpreter "
            "(TRITON_INTERPRET=1, for tests: it runs each kernel in Python, very slowly)"
        )
    return why


def prompt_attention_fwd(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale):
    """See :func:`fastprompt.kernels.triton.prompt_attention.prompt_attention_fwd`."""
    from fastprompt.kernels.triton.prompt_attention import prompt_attention_fwd as fwd

    return fwd(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale)


def prompt_attention_bwd(
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
):
    """See :func:`.prompt_attention_backward.prompt_attention_bwd`."""
    from fastprompt.kernels.triton.prompt_attention_backward import prompt_attention_bwd as bwd

    return bwd(dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale)


def prompt_attention_bwd_scored(
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v
):
    """See :func:`.prompt_attention_backward.prompt_attention_bwd_scored`."""
    from fastprompt.kernels.triton.prompt_attention_backward import (
        prompt_attention_bwd_scored as bws,
    )

    return bws(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v
    )


def precompile(*args, **kwargs):
    """Compile in parallel, ahead of the first launches, every kernel build that calls of the given
    dtypes, head dims and shapes may launch (every config the autotuner may pick on the current
    GPU, or on ``arch=`` without one). See :func:`._precompile.precompile`; returns a
    :class:`._precompile.PrecompileReport`."""
    from fastprompt.kernels.triton._precompile import precompile as run

    return run(*args, **kwargs)
