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
    ext_jit : bool
        ``FASTPROMPT_EXT_JIT`` (default 1): the C++/CUDA extension (``csrc/``) may be compiled on
        first use; ``0`` allows only an ahead-of-time build (``setup.py``) and otherwise reports
        the backend unavailable.
    ext_cache : str or None
        ``FASTPROMPT_EXT_CACHE``: where first-use builds are cached (default
        ``$XDG_CACHE_HOME/fastprompt/ext``, i.e. ``~/.cache/fastprompt/ext``).
    skip_cuda_build : bool
        ``FASTPROMPT_SKIP_CUDA_BUILD=1``: build the extension's CPU kernels only, even with a CUDA
        toolkit and a GPU.
    force_cuda : bool
        ``FASTPROMPT_FORCE_CUDA=1``: compile the CUDA kernels although no GPU is visible (a
        toolkit must still be found); for building on a CPU-only machine.
    build_ext : bool
        ``FASTPROMPT_BUILD_EXT=1``: ``pip install -e .`` also compiles the extension ahead of
        time. ``setup.py`` reads this one (and the two above) itself, since it runs before the
        package can be imported; it is listed here so every knob is in one place.
    cuda_arch_list : str or None
        ``TORCH_CUDA_ARCH_LIST`` (torch's own variable): CUDA architectures to compile for,
        e.g. ``"8.0;9.0"``; default: the visible GPUs', or sm_80 and sm_90 without one.
    """

    backend: str | None
    verbose: bool
    triton_interpret: bool
    ext_jit: bool = True
    ext_cache: str | None = None
    skip_cuda_build: bool = False
    force_cuda: bool = False
    build_ext: bool = False
    cuda_arch_list: str | None = None


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no", "off")


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
        ext_jit=_flag("FASTPROMPT_EXT_JIT", "1"),
        ext_cache=os.environ.get("FASTPROMPT_EXT_CACHE", "").strip() or None,
        skip_cuda_build=_flag("FASTPROMPT_SKIP_CUDA_BUILD"),
        force_cuda=_flag("FASTPROMPT_FORCE_CUDA"),
        build_ext=_flag("FASTPROMPT_BUILD_EXT"),
        cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or None,
    )
