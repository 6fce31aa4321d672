"""The C++/CUDA extension backend (``csrc/``), behind the backend kernel contract.

The extension registers low-level operators under ``torch.ops.fastprompt_ext`` (schemas and their
meaning in ``csrc/registration.cpp``). On the CPU they run the extension's own kernels
(``csrc/cpu/``: GEMMs over each sequence's prompt set and keys packed into one block, an online
softmax, per-set reductions and the fused score terms). On CUDA they run prompt attention as a
cascade over PyTorch's fused attention kernels, orchestrated in C++ (``csrc/cascade/``): the
prompt part and the image part each on FlashAttention-2 (fp16/bf16) or the memory-efficient
kernel (fp32 as 3xTF32, fp32-accurate; per-set lengths), merged by one log-sum-exp kernel, with
the per-set reduction and Prompt Condensation's score epilogue as CUDA kernels (``csrc/cuda/``)
whose CPU twins run the same arithmetic in the tests.

This module loads the library (an ahead-of-time build from ``setup.py`` if one matches this torch
and these sources, else a first-use ninja build cached per torch version, CUDA toolkit, CPU
instruction set and source hash, verified by size and hash before it is loaded), registers a fake
(meta) implementation for every operator so ``torch.compile`` traces them, and exposes the
contract functions the ops call. Nothing is compiled at import: the first call to
:func:`availability` (or any kernel) builds or loads.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastprompt import _config
from fastprompt.kernels.cpp import _build

__all__ = [
    "availability",
    "build_info",
    "device_availability",
    "prompt_attention_bwd",
    "prompt_attention_bwd_scored",
    "prompt_attention_fwd",
    "status",
    "unsupported_reasons",
]

# A plain list as cache (torch.compile traces availability(); it warns on lru_cache). One entry:
# None when loaded, else the reason it cannot be.
_LOADED: list[str | None] = []
_INFO: dict[str, Any] = {}


def _ops_registered() -> bool:
    try:
        torch.ops.fastprompt_ext.prompt_attention_fwd.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _cache_root() -> Path:
    custom = _config.get().ext_cache
    # The same root as the dispatch cache's (XDG_CACHE_HOME with ~ expanded).
    return Path(custom).expanduser() if custom else Path(_config.default_cache_dir()) / "ext"


def _load() -> str | None:
    if _LOADED:
        return _LOADED[0]
    why: str | None = None
    try:
        if not _ops_registered():
            torch.ops.load_library(str(_locate_or_build()))
        _register_fakes()
        _INFO["loaded"] = True
    except Exception as e:
        why = f"the C++ extension is unavailable: {e}"
        _INFO["last_error"] = f"{type(e).__name__}: {e}"
    _LOADED.append(why)
    return why


def _locate_or_build() -> Path:
    settings = _config.get()
    lib, why_not_aot = _build.aot_library()
    if lib is not None:
        _INFO.update(library=str(lib), how="ahead-of-time build (setup.py)")
        _INFO["cuda_reason"] = _build.aot_record(lib).get("cuda_reason")
        return lib
    _INFO["aot"] = why_not_aot
    if not settings.ext_jit:
        raise RuntimeError(f"{why_not_aot}, and FASTPROMPT_EXT_JIT=0 forbids building on first use")
    missing = [
        what
        for what, ok in (
            ("a C++ compiler (c++ or $CXX)", _build.find_cxx() is not None),
            ("ninja", shutil.which("ninja") is not None),
        )
        if not ok
    ]
    if missing:
        raise RuntimeError(f"cannot build it on first use: {' and '.join(missing)} not found")
    plan = _build.plan(settings.skip_cuda_build, settings.force_cuda, settings.cuda_arch_list)
    _INFO["cuda_reason"] = plan.cuda_reason
    if settings.force_cuda and not plan.with_cuda and not settings.skip_cuda_build:
        logging.getLogger("fastprompt").warning(
            "fastprompt: FASTPROMPT_FORCE_CUDA is set, but the C++ extension is built without "
            "its CUDA kernels: %s",
            plan.cuda_reason,
        )
    root = _cache_root()
    cached, damage = _build.cached_build(root / plan.key)
    fresh = cached is None
    if damage is not None:
        _INFO["repaired"] = damage
    if fresh:
        logging.getLogger("fastprompt").warning(
            "fastprompt: compiling the C++ extension into %s (once per torch/CUDA/source "
            "version; about a minute)",
            root / plan.key,
        )
    start = time.perf_counter()
    try:
        lib = _build.build(plan, root, verbose=settings.verbose)
    except RuntimeError as e:
        if not plan.with_cuda:
            raise
        # The CPU kernels need not wait for a broken CUDA toolchain: build them alone, and say so.
        _INFO["cuda_build_error"] = str(e)[-2000:]
        _INFO["cuda_reason"] = "its CUDA kernels failed to build (`fastprompt info` shows how)"
        logging.getLogger("fastprompt").warning(
            "fastprompt: the C++ extension's CUDA kernels failed to build (%s); building its CPU "
            "kernels only. `fastprompt info` shows the error.",
            str(e).splitlines()[0][:200],
        )
        plan = _build.plan(True, False, settings.cuda_arch_list)
        lib = _build.build(plan, root, verbose=settings.verbose)
    how = "cached first-use build (size and hash checked)" if not fresh else "first-use build"
    if damage is not None:
        how = "first-use build, replacing a damaged cached one"
    _INFO.update(library=str(lib), how=how, seconds=round(time.perf_counter() - start, 1))
    return lib


def availability() -> str | None:
    """None when the extension is loaded (building it on first use if needed), else why not."""
    return _load()


def status() -> str | None:
    """:func:`availability` without building: None when loaded or when a build can be made here
    (it is then made on first use), else why not."""
    if _LOADED:
        return _LOADED[0]
    info = build_info()
    if info.get("last_error"):
        return f"the last build failed: {str(info['last_error']).splitlines()[-1]}"
    if info.get("compiler") is None:
        return "no C++ compiler found (the extension compiles on first use)"
    if info.get("ninja") is None and not _build.aot_library()[0]:
        return "ninja is not installed (pip install ninja, or fastprompt[ext])"
    return None


def device_availability(device_type: str) -> str | None:
    """None when the loaded extension has kernels for ``device_type`` usable here, else why not.

    The CPU kernels are always built; the CUDA ones only where a toolkit was found (and a GPU
    was visible or ``FASTPROMPT_FORCE_CUDA`` was set) at build time.
    """
    why = _load()
    if why is not None or device_type == "cpu":
        return why
    if device_type == "cuda":
        if "cuda=yes" not in torch.ops.fastprompt_ext.build_info():
            why = _INFO.get("cuda_reason") or "`fastprompt info` may say why"
            return f"the extension was built without its CUDA kernels: {why}"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return f"the extension has no kernels for device type {device_type!r}"


def build_info() -> dict[str, Any]:
    """What ``fastprompt info`` prints about the extension; never compiles anything.

    Returns
    -------
    dict
        ``compiler`` (path or None), ``ninja``, ``cuda_toolkit`` (root, version, how found, or
        why none), ``cuda_kernels`` (whether a build here compiles them, and why), ``archs``,
        ``cpu_isa``, ``cache`` (where first-use builds go), ``cache_state`` (built and verified,
        damaged, or not built), ``library`` and ``how`` (once loaded), ``repaired`` (the damage
        found in a cached build this process replaced), ``aot`` (why an ahead-of-time build was
        not used), ``build_seconds`` and ``last_error`` (the last failed build's message, from
        this process or the cache).
    """
    settings = _config.get()
    info: dict[str, Any] = {
        "compiler": _build.find_cxx(),
        "ninja": shutil.which("ninja"),
    }
    toolkit, how = _build.find_cuda_toolkit()
    info["cuda_toolkit"] = (
        f"{toolkit.home} (CUDA {toolkit.version}, found by {how})" if toolkit else how
    )
    try:
        plan = _build.plan(settings.skip_cuda_build, settings.force_cuda, settings.cuda_arch_list)
        info["cuda_kernels"] = ("yes: " if plan.with_cuda else "no: ") + plan.cuda_reason
        info["archs"] = ",".join(plan.archs) or "-"
        info["cpu_isa"] = plan.isa
        build_dir = _cache_root() / plan.key
        info["cache"] = str(build_dir)
        lib, damage = _build.cached_build(build_dir)
        if lib is not None:
            import json

            record = json.loads((build_dir / "build.json").read_text())
            info["cache_state"] = "built, size and hash verified"
            info["build_seconds"] = record.get("seconds")
        elif damage is not None:
            info["cache_state"] = f"DAMAGED (rebuilt on first use, never loaded): {damage}"
        else:
            info["cache_state"] = "not built yet (compiles on first use)"
        if (build_dir / "error.txt").is_file():
            info["last_error"] = (build_dir / "error.txt").read_text().strip()[-2000:]
    except Exception as e:  # no sources shipped, no torch CPU info...
        info["plan"] = f"{type(e).__name__}: {e}"
    info.update(_INFO)
    if _INFO.get("loaded"):
        info["build"] = torch.ops.fastprompt_ext.build_info()
    return info


def unsupported_reasons(device_type: str, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Why the extension cannot take a call on ``device_type`` with this dtype and head dim.

    Never builds anything. The CPU kernels take float32, bfloat16 and float16 at any head dim;
    the CUDA path runs PyTorch's fused attention kernels, which take head dims that are multiples
    of 8 up to 256 (the scored backward pads the head dim by 8, so up to 248 there).
    """
    reasons = []
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"dtype {dtype} is not float32, bfloat16 or float16")
    if device_type == "cuda" and (head_dim % 8 or head_dim > 256):
        reasons.append(
            f"head dim {head_dim}: the CUDA path takes multiples of 8 up to 256 (PyTorch's "
            "fused attention kernels)"
        )
    elif device_type not in ("cpu", "cuda"):
        reasons.append(f"no kernels for device type {device_type!r}")
    return reasons


def _ext():
    why = _load()
    if why is not None:
        raise RuntimeError(why)
    return torch.ops.fastprompt_ext


# ----------------------------------------------------------------------------------------------
# The backend contract (see fastprompt/ops/attention.py for the op that calls it).
# ----------------------------------------------------------------------------------------------


def prompt_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    scale: float,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Prompt attention forward.

    Parameters
    ----------
    q, k, v : Tensor, shape (B, H, N, d)
        float32, bfloat16 or float16, any strides (k/v may have their own N).
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
        Prompt sets; T = 1 is shared (read in place, never expanded).
    prompt_index : Tensor of int, shape (B,), optional
    prompt_lengths : Tensor of int, shape (T,), optional
    scale : float
    key_bias : Tensor, optional
        Added to the scores of the image keys (broadcastable to (B, H, N, N_k), or with a first
        dimension G dividing B, sequence b reading row b mod G; not differentiated); the CPU
        kernels read it in fp32 through its broadcast strides, the CUDA path hands it to the
        image part's memory-efficient kernel.

    Returns
    -------
    out : Tensor, shape (B, H, N, d), dtype of q, stored (B, N, H, d)
    lse : Tensor, shape (B, H, N), float32, contiguous; -inf for a query with no key.
    """
    return _ext().prompt_attention_fwd(
        q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, float(scale), key_bias
    )


def prompt_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    key_bias: Tensor | None = None,
    image_grads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Prompt attention backward.

    Parameters
    ----------
    image_grads : bool
        False when the caller needs only the prompt gradients (the first block of a frozen
        backbone): dq, dk, dv are then not computed, and the CPU kernels score only the prompt
        keys' columns.

    Returns
    -------
    dq, dk, dv : Tensor
        Shapes of q, k, v; dtype of q; stored (B, N, H, d) like ``out``. Unspecified values
        without ``image_grads``.
    dprompt_k, dprompt_v : Tensor, shape (T, H, P, d), float32
        Accumulated in fp32 and summed per set in a fixed order (deterministic): on the CPU per
        run of up to 16 sequences with one set, then over the set's runs in order (whatever the
        thread count); on CUDA a shared set's sum comes out of
        one fused-kernel call over all the batch's queries, indexed sets' per-sequence gradients
        are summed in sequence order. Zero past a set's length.
    """
    grads = _ext().prompt_attention_bwd(
        dout,
        q,
        k,
        v,
        prompt_k,
        prompt_v,
        prompt_index,
        prompt_lengths,
        out,
        lse,
        float(scale),
        None,
        None,
        key_bias,
        image_grads,
    )
    return tuple(grads[:5])


def prompt_attention_bwd_scored(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    prompt_index: Tensor | None,
    prompt_lengths: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    u_k: Tensor,
    u_v: Tensor,
    key_bias: Tensor | None = None,
    image_grads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`prompt_attention_bwd` plus Prompt Condensation's terms, fused.

    Parameters
    ----------
    u_k, u_v : Tensor, shape (S, T, H, P, d)
        Per-prompt vectors dotted with the per-sequence prompt gradients.
    image_grads : bool
        As in :func:`prompt_attention_bwd`.

    Returns
    -------
    dq, dk, dv, dprompt_k, dprompt_v
        As :func:`prompt_attention_bwd`.
    terms : Tensor, shape (S, B, P), float32
        ``Σ_{h,d} dK_seq[b,h,i]·u_k[s,t_b,h,i] + dV_seq[b,h,i]·u_v[s,t_b,h,i]``.
    gate : Tensor, shape (B, P), float32
        ``Σ_{h,n} dS[b,h,n,i]``.

    On CUDA the scored backward's head dim is padded by 8 (the gate comes out of the fused
    backward as an extra column of dK), so it takes head dims up to 248.
    """
    return tuple(
        _ext().prompt_attention_bwd(
            dout,
            q,
            k,
            v,
            prompt_k,
            prompt_v,
            prompt_index,
            prompt_lengths,
            out,
            lse,
            float(scale),
            u_k,
            u_v,
            key_bias,
            image_grads,
        )
    )


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes, dtypes and layouts only, so torch.compile can trace.
# ----------------------------------------------------------------------------------------------

_FAKES_DONE: list[bool] = []


def _register_fakes() -> None:
    if _FAKES_DONE:
        return
    _FAKES_DONE.append(True)
    register = torch.library.register_fake

    def fwd(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, key_bias=None):
        return _heads_last(q, q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    def bwd(dout, q, k, v, prompt_k, *rest, **named):
        # rest: prompt_v, prompt_index, prompt_lengths, out, lse, scale, u_k, u_v[, key_bias,
        # image_grads]
        u_k = rest[6] if len(rest) > 6 else named.get("u_k")
        b = q.shape[0]
        t, h, p, d = prompt_k.shape
        s = 0 if u_k is None else u_k.shape[0]
        f32 = dict(dtype=torch.float32, device=q.device)
        return (
            _heads_last(q, q.shape),
            _heads_last(q, k.shape),
            _heads_last(q, v.shape),
            torch.empty((t, h, p, d), **f32),
            torch.empty((t, h, p, d), **f32),
            torch.empty((s, b, p), **f32),
            torch.empty((b, p), **f32),
        )

    for path in ("prompt_attention", "cascade_attention"):
        register(f"fastprompt_ext::{path}_fwd")(fwd)
        register(f"fastprompt_ext::{path}_bwd")(bwd)


def _heads_last(like: Tensor, shape: torch.Size) -> Tensor:
    """(B, H, N, d) stored as (B, N, H, d), the layout of every output of the library."""
    b, h, n, d = shape
    return like.new_empty((b, n, h, d)).transpose(1, 2)
