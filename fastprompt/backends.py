"""The backend registry: what each backend can run, where its kernels live, and how one is chosen.

A backend is one :class:`Backend` entry in :data:`BACKENDS` plus its kernels folder
``fastprompt/kernels/<name>/``. The entry declares what the backend supports (devices, dtypes,
head dims, features) and the folder implements the kernel contract below; nothing else in the
package names a backend. The environment override, the CLI choices, ``fastprompt info`` and the
scoring path all read this registry.

Kernel contract (``docs/design.md`` §6). A kernels folder's ``__init__`` exposes:

- ``availability() -> str | None``: None when the backend can run in this process, else why not.
- ``prompt_attention_fwd(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale)``
  → ``(out, lse)``. q, k, v (B, H, N, d) with any strides; prompt_k/v (T, H, P, d), T = 1 never
  expanded; ``out`` in q's dtype, preferably stored (B, N, H, d); ``lse`` (B, H, N) float32,
  natural log. N = 0 and P = 0 work; a query with no key gets ``out = 0`` and ``lse = -inf``;
  prompt slots past a set's length never influence anything, whatever they hold.
- ``prompt_attention_bwd(dout, q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, out,
  lse, scale)`` → ``(dq, dk, dv, dprompt_k, dprompt_v)``: the prompt gradients are accumulated per
  sequence in fp32 and summed per set in a fixed order (deterministic, no atomics, no TF32),
  returned (T, H, P, d) float32 with zero rows past each set's length.
- ``prompt_attention_bwd_scored`` (None if the backend does not fuse scores): the same plus
  Prompt Condensation's per-(sequence, prompt) ``terms`` (S, B, P) and ``gate`` (B, P), float32,
  computed from the per-sequence prompt gradients before they are summed
  (:func:`fastprompt.ops.scores.prompt_scores_ref` is their definition).

Automatic choice takes the first backend in preference order that can take a call and says once
why a better one was skipped (in the spirit of xformers' ``not_supported_reasons``); an explicit
``backend=`` or ``FASTPROMPT_BACKEND`` is strict and raises with every reason.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch

from fastprompt import _config

__all__ = ["BACKENDS", "NAMES", "Backend", "Call", "choose", "choose_name", "describe", "get"]

logger = logging.getLogger("fastprompt")

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# Features a call may need beyond plain prompt attention.
FEATURES = ("prompt_index", "prompt_lengths", "scores")


@dataclass(frozen=True)
class Call:
    """What a backend must support to take one call.

    Attributes
    ----------
    device : torch.device
    dtype : torch.dtype
    head_dim : int
    features : frozenset of str
        Subset of :data:`FEATURES` the call uses.
    """

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    features: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Backend:
    """One backend: its capability declaration and where its kernels live.

    Attributes
    ----------
    name : str
        What users pass as ``backend=`` and ``FASTPROMPT_BACKEND``.
    kernels : str
        Module implementing the kernel contract (``fastprompt.kernels.<name>``).
    summary : str
        One line for ``fastprompt info``.
    devices : tuple of str
        Device types it runs on when asked for explicitly.
    auto : dict of str to tuple of torch.dtype
        Device type → dtypes it is chosen for automatically. A backend that runs somewhere but is
        not chosen there (the Triton interpreter on CPU: correct, far too slow) leaves it out.
    dtypes : tuple of torch.dtype
        Input dtypes it accepts.
    head_dims : tuple of int or None
        Head dimensions it accepts; None means any.
    features : frozenset of str
        Features of :data:`FEATURES` it implements.
    """

    name: str
    kernels: str
    summary: str
    devices: tuple[str, ...]
    auto: dict[str, tuple[torch.dtype, ...]]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None
    features: frozenset[str] = field(default_factory=lambda: frozenset(FEATURES))

    def module(self) -> ModuleType:
        """The kernels module (imported on first use)."""
        return importlib.import_module(self.kernels)

    def availability(self, device_type: str | None = None) -> str | None:
        """None when the backend can run in this process (on ``device_type`` if given), else
        the reason it cannot. May load or build the backend's kernels (the C++ extension
        compiles on first use)."""
        try:
            module = self.module()
        except Exception as e:  # a missing optional dependency, or a broken install
            return f"{self.kernels} is not importable ({type(e).__name__}: {e})"
        if device_type is not None and hasattr(module, "device_availability"):
            return module.device_availability(device_type)
        return module.availability()

    def status(self) -> str | None:
        """Like :meth:`availability`, but never builds anything (for ``fastprompt info``)."""
        try:
            module = self.module()
        except Exception as e:
            return f"{self.kernels} is not importable ({type(e).__name__}: {e})"
        return module.status() if hasattr(module, "status") else module.availability()

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Every reason this backend cannot take ``call`` (empty when it can)."""
        reasons = []
        why = self.availability(call.device.type)
        if why is not None:
            reasons.append(why)
        if call.device.type not in self.devices:
            reasons.append(f"device type {call.device.type!r} not in {self.devices}")
        if call.dtype not in self.dtypes:
            reasons.append(f"dtype {call.dtype} not in {_dtype_names(self.dtypes)}")
        if self.head_dims is not None and call.head_dim not in self.head_dims:
            reasons.append(f"head dim {call.head_dim} not in {self.head_dims}")
        missing = sorted(call.features - self.features)
        if missing:
            reasons.append(f"does not implement {', '.join(missing)}")
        return reasons

    def auto_reasons(self, call: Call) -> list[str]:
        """Why this backend is not chosen automatically for ``call`` although it could run it.

        Beyond the declared device types and dtypes, a kernels module may narrow automatic choice
        per call with ``not_auto_reasons(device, dtype, head_dim)`` (Triton: covered GPUs only).
        """
        chosen_for = self.auto.get(call.device.type, ())
        if not chosen_for:
            return [f"not chosen automatically on {call.device.type}"]
        if call.dtype not in chosen_for:
            return [
                f"not chosen automatically for {call.dtype} on {call.device.type} "
                f"(only {_dtype_names(chosen_for)})"
            ]
        try:
            narrow = getattr(self.module(), "not_auto_reasons", None)
        except Exception:  # not importable: not_supported_reasons says why
            return []
        return narrow(call.device, call.dtype, call.head_dim) if narrow is not None else []


def _dtype_names(dtypes: Sequence[torch.dtype]) -> tuple[str, ...]:
    return tuple(str(d).replace("torch.", "") for d in dtypes)


# In order of preference.
BACKENDS: tuple[Backend, ...] = (
    # Chosen automatically only where its tests and static report cover it (NVIDIA sm_80/sm_90,
    # fp16/bf16, d 32-128; the kernels module's not_auto_reasons says so per call). fp32 on CUDA
    # goes to torch's SDPA, which runs it as 3xTF32 on tensor cores.
    Backend(
        name="triton",
        kernels="fastprompt.kernels.triton",
        summary="Triton kernels (NVIDIA GPUs; CPU tensors only under TRITON_INTERPRET=1: tests)",
        devices=("cuda", "cpu"),
        auto={"cuda": (torch.float16, torch.bfloat16)},
        dtypes=_FLOATS,
        head_dims=(16, 32, 48, 64, 80, 96, 128),
    ),
    # Chosen automatically on CPU for fp32 only, where benchmarks/bench_prompt_attention_cpu.py
    # measured it >= 1.15x the torch backend at every ViT-B/16 shape (2 threads; bf16 forward at
    # P = 50 was 1.05x, below the 1.1x bar). Its CUDA kernels have never run: explicit only.
    Backend(
        name="cpp",
        kernels="fastprompt.kernels.cpp",
        summary="C++/CUDA extension (csrc/): CPU kernels; SIMT CUDA kernels never run on a GPU",
        devices=("cpu", "cuda"),
        auto={"cpu": (torch.float32,)},
        dtypes=_FLOATS,
    ),
    Backend(
        name="torch",
        kernels="fastprompt.kernels.torch",
        summary="PyTorch composite: concatenated prompt K/V + PyTorch's fused attention",
        devices=("cpu", "cuda", "mps", "xpu"),
        auto={d: (*_FLOATS, torch.float64) for d in ("cpu", "cuda", "mps", "xpu")},
        dtypes=(*_FLOATS, torch.float64),
    ),
)

NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)

_warned: set[tuple[str, str, str]] = set()


def get(name: str) -> Backend:
    """The registry entry called ``name``."""
    for b in BACKENDS:
        if b.name == name:
            return b
    raise ValueError(f"backend={name!r} does not exist; choose one of {NAMES}")


def choose(op: str, call: Call, requested: str | None = None) -> Backend:
    """Pick the backend for one call.

    Parameters
    ----------
    op : str
        Op name, for messages.
    call : Call
        What the call needs.
    requested : str or None
        ``backend=`` from the caller; when None, ``FASTPROMPT_BACKEND`` applies. Either is strict.

    Returns
    -------
    Backend

    Raises
    ------
    ValueError
        If the requested backend does not exist.
    NotImplementedError
        If the requested backend cannot take the call, or none can; the message lists every reason.
    """
    settings = _config.get()
    requested = requested or settings.backend
    if requested is not None:
        backend = get(requested)
        reasons = backend.not_supported_reasons(call)
        if reasons:
            raise NotImplementedError(
                f"{op}: backend {requested!r} was requested but cannot run this call: "
                + "; ".join(reasons)
            )
        return backend
    rejected: list[tuple[Backend, list[str], bool]] = []
    for b in BACKENDS:
        # Whether it would be chosen first: asking whether it can run may build its kernels.
        auto = b.auto_reasons(call)
        if auto:
            rejected.append((b, auto, False))
            continue
        reasons = b.not_supported_reasons(call)
        if not reasons:
            _say_fallback(op, b.name, call, rejected, settings.verbose)
            return b
        rejected.append((b, reasons, True))
    raise NotImplementedError(
        f"{op}: no backend can run on {call.device.type} with dtype {call.dtype} and head dim "
        f"{call.head_dim}: " + " | ".join(f"{b.name}: {'; '.join(r)}" for b, r, _ in rejected)
    )


@torch.compiler.assume_constant_result
def choose_name(
    op: str,
    device: str,
    dtype: torch.dtype,
    head_dim: int,
    features: tuple[str, ...],
    requested: str | None,
) -> str:
    """:func:`choose` on plain values, returning the backend's name.

    This is what the ops call: ``torch.compile`` runs it once while tracing and keeps the
    answer as a constant (choosing imports kernel modules, which it cannot trace).
    """
    call = Call(torch.device(device), dtype, head_dim, frozenset(features))
    return choose(op, call, requested).name


def _say_fallback(
    op: str,
    chosen: str,
    call: Call,
    rejected: list[tuple[Backend, list[str], bool]],
    verbose: bool,
) -> None:
    # Only a better backend that would have been chosen for this device and dtype, had it been
    # able to run, is a fallback worth telling the user about; Triton not running on a CPU is
    # the normal case, not a fallback.
    for b, reasons, would_have_been_chosen in rejected:
        if not would_have_been_chosen:
            continue
        key = (op, b.name, "; ".join(reasons))
        if key in _warned and not verbose:
            continue
        _warned.add(key)
        warnings.warn(
            f"fastprompt: {op} on {call.device.type} uses backend {chosen!r} because {b.name!r} "
            f"cannot run: {'; '.join(reasons)}",
            RuntimeWarning,
            stacklevel=4,
        )
    if verbose:
        logger.info("%s: backend %r on %s (%s)", op, chosen, call.device.type, call.dtype)


def describe(probe: Callable[[Backend], str | None] | None = None) -> list[dict[str, object]]:
    """Rows for ``fastprompt info``: each backend, what it declares, and whether it can run here.

    Parameters
    ----------
    probe : callable, optional
        Replaces :meth:`Backend.status` (tests).
    """
    rows = []
    for b in BACKENDS:
        why = probe(b) if probe is not None else b.status()
        auto = ", ".join(f"{dev}: {'/'.join(_dtype_names(dts))}" for dev, dts in b.auto.items())
        rows.append(
            {
                "backend": b.name,
                "summary": b.summary,
                "devices": ",".join(b.devices),
                "dtypes": ",".join(_dtype_names(b.dtypes)),
                "head_dims": "any" if b.head_dims is None else ",".join(map(str, b.head_dims)),
                "features": ",".join(sorted(b.features)),
                "auto": auto or "never (explicit only)",
                "available": why or "yes",
            }
        )
    return rows
