"""The ``triton`` backend: Triton kernels and their launchers (the contract in
:mod:`fastprompt.backends`)."""

from __future__ import annotations

_IMPORT_ERROR: list[str | None] = []

__all__ = [
    "availability",
    "prompt_attention_bwd",
    "prompt_attention_bwd_scored",
    "prompt_attention_fwd",
]


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


def prompt_attention_fwd(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale):
    from fastprompt.kernels.triton.prompt_attention import prompt_attention_fwd_triton

    return prompt_attention_fwd_triton(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale
    )


def prompt_attention_bwd(
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
):
    from fastprompt.kernels.torch.prompt_attention import reduce_over_sets
    from fastprompt.kernels.triton.prompt_attention import prompt_attention_bwd_triton

    dq, dk, dv, dpk, dpv = prompt_attention_bwd_triton(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale
    )
    t = prompt_k.shape[0]
    return (
        dq,
        dk,
        dv,
        reduce_over_sets(dpk, prompt_index, t),
        reduce_over_sets(dpv, prompt_index, t),
    )


def prompt_attention_bwd_scored(
    dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v
):
    from fastprompt.kernels.torch.prompt_attention import reduce_over_sets
    from fastprompt.kernels.triton.prompt_attention import prompt_attention_bwd_scores_triton

    dq, dk, dv, dpk, dpv, terms, gate = prompt_attention_bwd_scores_triton(
        dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v
    )
    t = prompt_k.shape[0]
    dpk, dpv = reduce_over_sets(dpk, prompt_index, t), reduce_over_sets(dpv, prompt_index, t)
    return dq, dk, dv, dpk, dpv, terms, gate
