"""The backend registry: one declaration per backend, and how one is chosen for a call.

A backend is one :class:`Backend` entry in :data:`BACKENDS` (what it supports, in the style of
xformers' ``SUPPORTED_*`` attributes and ``not_supported_reasons``) plus its kernels folder
``fastprompt/kernels/<name>/``, which implements the kernel contract of ``docs/design.md``
section 6. Dispatch, ``fastprompt info``, the README's table and the conformance tests read these
declarations; nothing else in the package names a backend.

Choosing (``docs/design.md`` section 6): ``backend=`` or ``FASTPROMPT_BACKEND`` is strict and raises
with every reason (on a GPU a failed probe, below, among them). Otherwise the candidates are the
backends declared for the call's device and dtype that can run it; on a GPU each is first checked
against the cascade by a small probe (:mod:`.probe`; a failure disables it for the process, saying
why once), and the fastest is kept per shape bucket (:mod:`.measure`, cached on disk). Without
measurement the first candidate in preference order wins; a better backend that cannot run is
reported once.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType

import torch

from fastprompt import _config
from fastprompt._warnings import warn_at_caller
from fastprompt.kernels.triton import _capability as _triton

__all__ = [
    "BACKENDS",
    "FEATURES",
    "NAMES",
    "YARDSTICK",
    "Backend",
    "Call",
    "choose",
    "choose_name",
    "get",
]

logger = logging.getLogger("fastprompt")

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ALL_FLOATS = (*_FLOATS, torch.float64)

#: Features a call may need beyond plain prompt attention, and what each means.
FEATURES: Mapping[str, str] = {
    "prompt_index": "a table of prompt sets indexed per sequence",
    "prompt_lengths": "per-set prompt lengths (slots past a length masked)",
    "key_count": "image keys/values with their own row count (N_k != N)",
    "key_bias": "an additive bias on the image keys (Swin's relative-position bias and mask)",
    "scores": "Prompt Condensation's score terms fused into the backward",
}

#: Optional functions a kernels module may have beyond the contract, when declared in ``hooks``.
HOOKS = ("device_availability", "status", "unsupported_reasons")

#: The backend the probe checks others against (PyTorch's own kernels).
YARDSTICK = "cascade"


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
    """One backend's declaration.

    Attributes
    ----------
    name : str
        What users pass as ``backend=`` and ``FASTPROMPT_BACKEND``.
    kernels : str
        Module implementing the kernel contract (``fastprompt.kernels.<name>``).
    summary : str
        What it is, one line (``fastprompt info``, README).
    measured : str
        What has been measured of it and where (``fastprompt info``, README).
    devices : tuple of str
        Device types it runs on when asked for explicitly.
    dtypes : tuple of torch.dtype
        Input dtypes it accepts.
    features : frozenset of str
        The features of :data:`FEATURES` it implements.
    lacks : mapping of str to str
        For every feature it does not implement, why (shown in errors and ``fastprompt info``).
    head_dims : tuple of int or None
        Head dimensions it accepts; None means any.
    auto : mapping of str to tuple of torch.dtype
        Device type → dtypes it is chosen for automatically, in :data:`BACKENDS` order.
    auto_head_dims : tuple of int or None
        Head dims it is chosen for automatically (None: every accepted one).
    auto_capabilities : tuple of (int, int) or None
        NVIDIA compute capabilities it is chosen for automatically (None: any).
    candidate : mapping of str to tuple of torch.dtype
        Device type → dtypes where it competes only when choices are measured.
    hooks : frozenset of str
        Optional functions of :data:`HOOKS` its kernels module has.
    prompt_grads_only : bool
        Its backward takes ``image_grads=False`` and then skips dq, dk, dv. The op passes it when
        no image input needs a gradient (a frozen backbone's first prompted block); other
        backends compute every gradient and the op drops the unneeded ones.
    """

    name: str
    kernels: str
    summary: str
    measured: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    features: frozenset[str]
    lacks: Mapping[str, str] = field(default_factory=dict)
    head_dims: tuple[int, ...] | None = None
    auto: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    auto_head_dims: tuple[int, ...] | None = None
    auto_capabilities: tuple[tuple[int, int], ...] | None = None
    candidate: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    hooks: frozenset[str] = frozenset()
    prompt_grads_only: bool = False

    def __post_init__(self) -> None:
        unknown = (set(self.features) | set(self.lacks)) - set(FEATURES)
        if unknown:
            raise ValueError(f"backend {self.name!r}: unknown features {sorted(unknown)}")
        missing = set(FEATURES) - set(self.features) - set(self.lacks)
        if missing or set(self.features) & set(self.lacks):
            raise ValueError(
                f"backend {self.name!r}: every feature is either implemented or lacked with a "
                f"reason; check {sorted(missing | (set(self.features) & set(self.lacks)))}"
            )
        if set(self.hooks) - set(HOOKS):
            raise ValueError(f"backend {self.name!r}: unknown hooks {sorted(self.hooks)}")

    def module(self) -> ModuleType:
        """The kernels module (imported on first use)."""
        return importlib.import_module(self.kernels)

    def availability(self, device_type: str | None = None) -> str | None:
        """None when the backend can run in this process (on ``device_type`` if given), else
        why not. May load or build its kernels (the C++ extension compiles on first use)."""
        try:
            module = self.module()
        except Exception as e:  # a missing optional dependency, or a broken install
            return f"{self.kernels} is not importable ({type(e).__name__}: {e})"
        if device_type is not None and "device_availability" in self.hooks:
            return module.device_availability(device_type)
        return module.availability()

    def status(self) -> str | None:
        """Like :meth:`availability`, but never builds anything (for ``fastprompt info``)."""
        try:
            module = self.module()
        except Exception as e:
            return f"{self.kernels} is not importable ({type(e).__name__}: {e})"
        return module.status() if "status" in self.hooks else module.availability()

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
        reasons += [f"no {f}: {self.lacks[f]}" for f in sorted(call.features - self.features)]
        if "unsupported_reasons" in self.hooks and not reasons:
            # What depends on the device as well (the cpp CUDA path's head dims), never building.
            narrow = self.module().unsupported_reasons
            reasons += narrow(call.device.type, call.dtype, call.head_dim)
        return reasons

    def auto_reasons(self, call: Call, measuring: bool = False) -> list[str]:
        """Why this backend is not a candidate of automatic choice for ``call`` (empty: it is),
        whether or not it could run it. ``measuring`` admits :attr:`candidate` entries."""
        device = call.device.type
        declared = self.auto.get(device, ())
        if measuring:
            declared = (*declared, *self.candidate.get(device, ()))
        if not declared:
            return [f"not chosen automatically on {device}"]
        if call.dtype not in declared:
            return [
                f"not chosen automatically for {call.dtype} on {device} "
                f"(only {'/'.join(_dtype_names(declared))})"
            ]
        reasons = []
        if self.auto_head_dims is not None and call.head_dim not in self.auto_head_dims:
            reasons.append(
                f"head dim {call.head_dim} is not chosen automatically ({self.auto_head_dims} are)"
            )
        if self.auto_capabilities is not None and device == "cuda" and torch.cuda.is_available():
            if torch.version.hip is not None:
                reasons.append("ROCm: not yet validated on AMD GPUs")
            else:
                cap = torch.cuda.get_device_capability(call.device)
                if cap not in self.auto_capabilities:
                    covered = ", ".join(f"sm_{a}{b}" for a, b in self.auto_capabilities)
                    reasons.append(
                        f"compute capability sm_{cap[0]}{cap[1]} is not covered by its tests yet "
                        f"({covered} are)"
                    )
        return reasons


def _dtype_names(dtypes) -> tuple[str, ...]:
    return tuple(str(d).replace("torch.", "") for d in dtypes)


# In order of preference.
BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="triton",
        kernels="fastprompt.kernels.triton",
        summary="Triton kernels: prompt keys read in place through the set index, online softmax "
        "over prompt then image keys, fused per-prompt scores (NVIDIA GPUs; CPU tensors only "
        "under TRITON_INTERPRET=1, for tests)",
        measured="nothing on a GPU yet; compiled for sm_80/sm_90 without spills "
        "(benchmarks/results/static/), correct in Triton's interpreter",
        devices=("cuda", "cpu"),
        dtypes=_triton.SUPPORTED_DTYPES,
        head_dims=_triton.SUPPORTED_HEAD_DIMS,
        features=frozenset({"prompt_index", "prompt_lengths", "scores", "key_count"}),
        lacks={"key_bias": "the Triton kernels add no bias to the scores"},
        auto={"cuda": _triton.AUTO_DTYPES},
        auto_head_dims=_triton.AUTO_HEAD_DIMS,
        auto_capabilities=_triton.AUTO_CAPABILITIES,
        hooks=frozenset({"device_availability"}),
    ),
    Backend(
        name="cpp",
        kernels="fastprompt.kernels.cpp",
        summary="C++/CUDA extension (csrc/): CPU kernels, one task per (sequence, head, query "
        "block) over its prompt set and keys packed into one block; on CUDA a C++-orchestrated "
        "cascade over PyTorch's fused attention with fused merge, per-set sum and score "
        "kernels (compiled for sm_80/sm_90, not yet run on a GPU)",
        measured="CPU, 2 cores, ViT-B/16 shapes (B 8, P 50/200): fp32 1.02-1.24x cat + SDPA, "
        "bf16 forward 1.00-1.10x and forward + backward 3.8-5.0x "
        "(benchmarks/results/cpu-2core/op_cascade); Swin-B windows with their bias 2.0-2.5x "
        "torch (op_swin_stage0/2_packed); nothing on a GPU yet",
        devices=("cpu", "cuda"),
        dtypes=_FLOATS,
        features=frozenset(FEATURES),
        # On the CPU it beat every other path in fp32 and bf16 (op_cascade); fp16 is unmeasured.
        auto={"cpu": (torch.float32, torch.bfloat16)},
        # On CUDA it competes only when choices are measured, and only on the GPUs the
        # compile-checked kernels target, so it never wins before it has been timed.
        candidate={"cpu": (torch.float16,), "cuda": _FLOATS},
        auto_capabilities=((8, 0), (9, 0)),
        hooks=frozenset({"device_availability", "status", "unsupported_reasons"}),
        prompt_grads_only=True,
    ),
    Backend(
        name="cascade",
        kernels="fastprompt.kernels.cascade",
        summary="cascade attention on PyTorch's fused kernels: the prompt part as one call over "
        "all the batch's queries (a shared set) or per sequence (indexed sets), the image part "
        "per sequence, merged by log-sum-exp; flash (fp16/bf16), memory-efficient (fp32, biases), "
        "cuDNN (where flash is off); the CPU flash kernel on CPU",
        measured="CPU, 2 cores, ViT-B/16 shapes: 0.72-0.98x cat + SDPA, behind torch and cpp "
        "(benchmarks/results/cpu-2core/op_cascade), so a CPU candidate only when measuring; "
        "nothing on a GPU yet",
        devices=("cpu", "cuda", "mps", "xpu"),
        dtypes=_ALL_FLOATS,
        features=frozenset(FEATURES),
        auto={"cuda": _ALL_FLOATS},
        candidate={"cpu": _ALL_FLOATS},
        prompt_grads_only=True,
    ),
    Backend(
        name="torch",
        kernels="fastprompt.kernels.torch",
        summary="concatenated prompt K/V per sequence + one call of PyTorch's fused attention "
        "(the CPU flash kernel on CPU; flash / memory-efficient / cuDNN on CUDA)",
        measured="CPU, 2 cores: the baseline of the cpp figures; nothing on a GPU yet",
        devices=("cpu", "cuda", "mps", "xpu"),
        dtypes=_ALL_FLOATS,
        features=frozenset(FEATURES),
        auto={d: _ALL_FLOATS for d in ("cpu", "cuda", "mps", "xpu")},
    ),
)

NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)

_warned: set[tuple[str, str, str]] = set()


def get(name: str, source: str = "backend") -> Backend:
    """The registry entry called ``name``.

    Raises
    ------
    ValueError
        Naming ``source`` (``backend=`` or ``FASTPROMPT_BACKEND``) and every valid name.
    """
    for b in BACKENDS:
        if b.name == name:
            return b
    raise ValueError(f"{source}={name!r} does not exist; choose one of {NAMES}")


def _active(mode: str, device: torch.device) -> bool:
    """Whether a probe/measure setting applies on ``device`` (``auto``: GPUs only)."""
    return mode == "always" or (mode == "auto" and device.type not in ("cpu", "meta"))


def choose(
    op: str,
    call: Call,
    requested: str | None = None,
    shape: tuple[int | None, ...] | None = None,
    training: bool = False,
) -> Backend:
    """Pick the backend for one call.

    Parameters
    ----------
    op : str
        Op name, for messages.
    call : Call
        What the call needs.
    requested : str or None
        ``backend=`` from the caller; when None, ``FASTPROMPT_BACKEND`` applies. Either is strict.
    shape : tuple of (int or None), optional
        (B, H, N, N_k, T, P) of the call: what a measured choice times (a size traced
        symbolically by ``torch.compile`` is None); without it the preference order decides.
    training : bool
        Whether the call will be differentiated (a measured choice times forward + backward).

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
    source = "backend"
    if requested is None and settings.backend is not None:
        requested, source = settings.backend, "FASTPROMPT_BACKEND"
    from fastprompt.backends import measure, probe

    probing = _active(settings.probe, call.device)
    if requested is not None:
        backend = get(requested, source)
        reasons = backend.not_supported_reasons(call)
        # A requested backend is probed too: forcing one (a CLI's --backend) must not train
        # on kernels that were never checked on this device.
        failed = probe.check(backend, call, say=False) if probing and not reasons else None
        if reasons or failed:
            raise NotImplementedError(
                f"{op}: backend {requested!r} was requested but cannot run this call: "
                + "; ".join(reasons or [failed])
            )
        if settings.verbose:
            _say_choice(op, backend, call, f"requested by {source}")
        return backend
    measuring = _active(settings.measure, call.device) and measure.measurable(shape)
    rejected: list[tuple[Backend, list[str], bool]] = []
    eligible: list[Backend] = []
    for b in BACKENDS:
        # Whether it is a candidate at all is decided first: asking whether it can run may build
        # its kernels.
        auto = b.auto_reasons(call, measuring)
        if auto:
            rejected.append((b, auto, False))
            continue
        reasons = b.not_supported_reasons(call)
        if reasons:
            rejected.append((b, reasons, True))
            continue
        failed = probe.check(b, call) if probing else None
        if failed:  # the probe has said so, once
            rejected.append((b, [failed], False))
            continue
        eligible.append(b)
    if not eligible:
        raise NotImplementedError(
            f"{op}: no backend can run on {call.device.type} with dtype {call.dtype} and head dim "
            f"{call.head_dim}: " + " | ".join(f"{b.name}: {'; '.join(r)}" for b, r, _ in rejected)
        )
    if measuring and len(eligible) > 1:
        chosen = measure.fastest(op, eligible, call, shape, training)
    else:
        chosen = eligible[0]
    _say_fallback(op, chosen, call, rejected, settings.verbose)
    return chosen


@torch.compiler.assume_constant_result
def choose_name(
    op: str,
    device: str,
    dtype: torch.dtype,
    head_dim: int,
    features: tuple[str, ...],
    requested: str | None,
    shape: tuple[int | None, ...] | None = None,
    training: bool = False,
) -> str:
    """:func:`choose` on plain values, returning the backend's name.

    This is what the ops call: ``torch.compile`` runs it once while tracing and keeps the
    answer as a constant (choosing imports kernel modules, probes and times them, which it cannot
    trace).
    """
    call = Call(torch.device(device), dtype, head_dim, frozenset(features))
    return choose(op, call, requested, shape, training).name


def _say_fallback(
    op: str,
    chosen: Backend,
    call: Call,
    rejected: list[tuple[Backend, list[str], bool]],
    verbose: bool,
) -> None:
    # Only a better backend that would have been a candidate for this device and dtype, had it
    # been able to run, is a fallback worth telling the user about; Triton not running on a CPU
    # is the normal case, not a fallback.
    order = NAMES.index(chosen.name)
    for b, reasons, would_have_been_chosen in rejected:
        if not would_have_been_chosen or NAMES.index(b.name) > order:
            continue
        key = (op, b.name, "; ".join(reasons))
        if key in _warned and not verbose:
            continue
        _warned.add(key)
        warn_at_caller(
            f"fastprompt: {op} on {call.device.type} uses backend {chosen.name!r} because "
            f"{b.name!r} cannot run: {'; '.join(reasons)}",
            RuntimeWarning,
        )
    if verbose:
        _say_choice(op, chosen, call, "chosen")


def _say_choice(op: str, chosen: Backend, call: Call, how: str) -> None:
    """One dispatch decision, for ``FASTPROMPT_VERBOSE=1``."""
    line = f"fastprompt: {op}: backend {chosen.name!r} on {call.device.type} ({call.dtype}), {how}"
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(line)
    else:
        # Unconfigured logging drops INFO records, and FASTPROMPT_VERBOSE=1 asked for them.
        print(line, file=sys.stderr)
