"""The one place that reads ``FASTPROMPT_*`` environment variables.

Every other module asks this one, so a user can find every knob in a single file and tests can
override them with ``monkeypatch.setenv`` before calling :func:`get`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Settings", "default_cache_dir", "flag", "get", "max_image_pixels"]


@dataclass(frozen=True)
class Settings:
    """Settings read from the environment.

    Attributes
    ----------
    backend : str or None
        ``FASTPROMPT_BACKEND``: force one backend for every op (strict: raises if it cannot run),
        lower-cased. Dispatch checks it against the registry (this module knows no backend).
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
    cuda_arch_list : str or None
        ``TORCH_CUDA_ARCH_LIST`` (torch's own variable): CUDA architectures to compile for,
        e.g. ``"8.0;9.0"``; default: the visible GPUs', or sm_80 and sm_90 without one.
    probe : str
        ``FASTPROMPT_PROBE``: ``auto`` (default: the first call of a backend on a GPU for a device,
        dtype and head dim, chosen or requested, checks it against the cascade first), ``off``,
        or ``always`` (on every device, the CPU included: tests).
    measure : str
        ``FASTPROMPT_MEASURE``: ``auto`` (default: on a GPU, automatic choice times the candidate
        backends once per shape bucket and keeps the fastest), ``off`` (the fixed preference
        order), or ``always`` (on every device).
    dispatch_cache : str or None
        ``FASTPROMPT_DISPATCH_CACHE``: the file measured choices and probe results are kept in
        (default ``$XDG_CACHE_HOME/fastprompt/dispatch.json``); ``off`` keeps them in memory.

    ``FASTPROMPT_BUILD_EXT=1`` (compile the extension during ``pip install``) is read by
    ``setup.py`` itself, which runs before the package can be imported.
    ``FASTPROMPT_MAX_IMAGE_PIXELS`` (the image size limit of the training data's reads) is read
    by :func:`max_image_pixels`, apart: a bad value must not stop the prompt-attention op.
    """

    backend: str | None
    verbose: bool
    triton_interpret: bool
    ext_jit: bool = True
    ext_cache: str | None = None
    skip_cuda_build: bool = False
    force_cuda: bool = False
    cuda_arch_list: str | None = None
    probe: str = "auto"
    measure: str = "auto"
    dispatch_cache: str | None = None


_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def flag(name: str, default: bool = False) -> bool:
    """A ``FASTPROMPT_*`` switch: 1/true/yes/on or 0/false/no/off (any case; unset or empty:
    ``default``).

    Anything else is refused rather than read as on: ``FASTPROMPT_EXT_JIT=disabled`` must not
    leave compilation allowed. ``setup.py`` loads this module by path to read its switches the
    same way.

    Raises
    ------
    ValueError
        Naming the variable, what it holds and what it takes.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in _ON:
        return True
    if raw.lower() in _OFF:
        return False
    raise ValueError(f"{name}={raw!r} is not a switch: use 1 or 0 (or true/false, yes/no, on/off)")


def _triton_flag(name: str) -> bool:
    # Triton's own reading of its variables (triton.knobs): anything else is off for Triton, so
    # fastprompt must not treat it as on (TRITON_INTERPRET=2 would send CPU tensors to kernels
    # Triton then compiles for a GPU).
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on", "y")


_MODES = ("auto", "off", "always")


def _mode(name: str) -> str:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw in ("1", "always", "on", "true", "yes"):
        return "always"
    raise ValueError(f"{name}={raw!r} is not one of {_MODES} (or 0/1)")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/fastprompt`` (``~/.cache/fastprompt``)."""
    root = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(root), "fastprompt")


def get() -> Settings:
    """Read the variables now (cheap; not cached, so tests can change them).

    Raises
    ------
    ValueError
        If ``FASTPROMPT_PROBE`` or ``FASTPROMPT_MEASURE`` holds something else than
        auto/off/always, or a switch (``FASTPROMPT_VERBOSE``, ``FASTPROMPT_EXT_JIT``,
        ``FASTPROMPT_SKIP_CUDA_BUILD``, ``FASTPROMPT_FORCE_CUDA``) something else than :func:`flag`
        takes.
    """
    cache = os.environ.get("FASTPROMPT_DISPATCH_CACHE", "").strip()
    if cache.lower() == "off":
        cache_path = None
    else:
        cache_path = os.path.expanduser(cache) or os.path.join(default_cache_dir(), "dispatch.json")
    return Settings(
        backend=os.environ.get("FASTPROMPT_BACKEND", "").strip().lower() or None,
        verbose=flag("FASTPROMPT_VERBOSE"),
        triton_interpret=_triton_flag("TRITON_INTERPRET"),
        ext_jit=flag("FASTPROMPT_EXT_JIT", default=True),
        ext_cache=os.environ.get("FASTPROMPT_EXT_CACHE", "").strip() or None,
        skip_cuda_build=flag("FASTPROMPT_SKIP_CUDA_BUILD"),
        force_cuda=flag("FASTPROMPT_FORCE_CUDA"),
        cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or None,
        probe=_mode("FASTPROMPT_PROBE"),
        measure=_mode("FASTPROMPT_MEASURE"),
        dispatch_cache=cache_path,
    )


def max_image_pixels() -> tuple[bool, int | None]:
    """``FASTPROMPT_MAX_IMAGE_PIXELS``: the most pixels an image fastprompt reads as data may
    have (:func:`fastprompt.train.images.read_rgb`), in place of PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, refused over twice it: about 179 million pixels). A positive
    integer, or ``none`` for no limit (trusted images only). An environment variable, not an
    option: ``train``, ``evaluate``, ``condense`` and ``domains`` all read images, and DataLoader
    worker processes, however they are started, see it; PIL's own setting is left alone.

    Returns
    -------
    (bool, int or None)
        Whether it is set (else PIL's own limit applies), and the limit (None: no limit).

    Raises
    ------
    ValueError
        Anything else than a positive integer or ``none``.
    """
    raw = os.environ.get("FASTPROMPT_MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return False, None
    if raw.lower() == "none":
        return True, None
    try:
        limit = int(raw.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(
            f"FASTPROMPT_MAX_IMAGE_PIXELS={raw!r} is not a positive whole number of pixels or "
            "'none' (no limit)"
        )
    return True, limit
