"""Kernels that check themselves: a small probe before a backend's first use on a device.

The first time automatic choice considers a backend for a (device, dtype, head dim) — on a GPU by
default (``FASTPROMPT_PROBE``) — it runs the backend's forward and backward on a few small inputs (a
shared set, also one with query, key and prompt counts past a tile; indexed sets with per-set
lengths; keys of their own count, and a key bias, where the backend declares them) and compares each
output with a float64 computation on the CPU. The rule is the package's (``docs/design.md`` section
5): the error may be at most twice that of PyTorch's own kernels in the same dtype on the same
device — the cascade backend, the yardstick — (three times for gradients), plus a small floor. A
backend that breaks the rule, returns non-finite values or raises is disabled for the process with a
one-time warning naming the error; the cascade itself must be within a fixed tolerance of float64.
Results are kept per process and recorded in the dispatch cache file for ``fastprompt info``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from fastprompt.backends import YARDSTICK, Backend, Call, get
from fastprompt.backends.cache import record

__all__ = ["ProbeResult", "check", "results", "run"]

NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v")
# Absolute floors per dtype, scaled by the reference's magnitude (ties and rounding of tiny values).
FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
# The yardstick's own tolerance against float64 (far above what a correct kernel shows).
YARDSTICK_TOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 6e-2,
}


@dataclass(frozen=True)
class ProbeResult:
    """One backend's probe on one (device, dtype, head dim).

    Attributes
    ----------
    ok : bool
    detail : str
        The worst error against the allowance, or what went wrong.
    """

    ok: bool
    detail: str


_RESULTS: dict[tuple[str, str, str, int], ProbeResult] = {}


def results() -> dict[tuple[str, str, str, int], ProbeResult]:
    """The probes run in this process: (backend, device, dtype, head dim) → result."""
    return dict(_RESULTS)


def _cases(backend: Backend, head_dim: int):
    """(B, H, N, N_k, T, P, index, lengths, with_bias) cases the backend declares it takes
    (``with_bias``: False, True, or ``"period"`` for a bias read with period 2)."""
    yield 3, 2, 37, 37, 1, 13, None, None, False
    # Counts past a tile of 128: the others run only the masked last tiles of the kernels that
    # mask just those, never the full-tile code every ViT-sized call runs.
    yield 2, 2, 197, 197, 1, 140, None, None, False
    if {"prompt_index", "prompt_lengths"} <= backend.features:
        yield 3, 2, 37, 37, 2, 13, [1, 0, 1], [13, 6], False
    if "key_count" in backend.features:
        yield 2, 2, 21, 45, 1, 9, None, None, "key_bias" in backend.features
    if "key_bias" in backend.features:  # a bias per window, period 2 over 4 sequences (Swin's)
        yield 4, 2, 21, 21, 1, 9, None, None, "period"


def _inputs(case, head_dim: int, seed: int):
    b, h, n, n_k, t, p, index, lengths, with_bias = case
    g = torch.Generator().manual_seed(seed)
    d = head_dim
    tensors = {
        "q": torch.randn(b, h, n, d, generator=g),
        "k": torch.randn(b, h, n_k, d, generator=g),
        "v": torch.randn(b, h, n_k, d, generator=g),
        "prompt_k": torch.randn(t, h, p, d, generator=g),
        "prompt_v": torch.randn(t, h, p, d, generator=g),
        "dout": torch.randn(b, h, n, d, generator=g),
    }
    extra = {
        "prompt_index": None if index is None else torch.tensor(index),
        "prompt_lengths": None if lengths is None else torch.tensor(lengths),
        "key_bias": (
            torch.randn(2 if with_bias == "period" else 1, h, n, n_k, generator=g)
            if with_bias
            else None
        ),
    }
    return tensors, extra


def _run_backend(backend: Backend, tensors, extra, device, dtype) -> list[Tensor]:
    """forward + backward through the contract functions; results as float64 on the CPU."""
    kernels = backend.module()
    x = {k: v.to(device, dtype) for k, v in tensors.items()}
    e = {k: None if v is None else v.to(device) for k, v in extra.items()}
    kw = {} if e["key_bias"] is None else {"key_bias": e["key_bias"].to(dtype)}
    scale = x["q"].shape[-1] ** -0.5
    args = (x["q"], x["k"], x["v"], x["prompt_k"], x["prompt_v"])
    out, lse = kernels.prompt_attention_fwd(
        *args, e["prompt_index"], e["prompt_lengths"], scale, **kw
    )
    grads = kernels.prompt_attention_bwd(
        x["dout"], *args, e["prompt_index"], e["prompt_lengths"], out, lse, scale, **kw
    )
    return [t.detach().to("cpu", torch.float64) for t in (out, lse, *grads)]


def _worst(got: list[Tensor], ref: list[Tensor]) -> list[float]:
    errs = []
    for a, e in zip(got, ref):
        if a.shape != e.shape:
            raise ValueError(f"shape {tuple(a.shape)} where {tuple(e.shape)} was expected")
        finite = torch.isfinite(e)
        if not torch.equal(torch.isfinite(a), finite):
            errs.append(float("inf"))
            continue
        diff = (a - e)[finite].abs()
        errs.append(float(diff.max()) if diff.numel() else 0.0)
    return errs


def run(backend: Backend, call: Call) -> ProbeResult:
    """Probe ``backend`` on ``call``'s device, dtype and head dim (no caching)."""
    device, dtype, d = call.device, call.dtype, call.head_dim
    yardstick = get(YARDSTICK)
    worst = 0.0
    for seed, case in enumerate(_cases(backend, d)):
        tensors, extra = _inputs(case, d, seed)
        # The reference sees the inputs rounded to dtype: errors are the kernels' arithmetic.
        rounded = {k: v.to(dtype).double() for k, v in tensors.items()}
        ref = _run_backend(yardstick, rounded, extra, torch.device("cpu"), torch.float64)
        try:
            got = _run_backend(backend, tensors, extra, device, dtype)
            errs = _worst(got, ref)
        except Exception as e:  # a kernel that cannot run here fails its probe, with the reason
            return ProbeResult(False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        if backend.name == YARDSTICK:
            base = [0.0] * len(errs)
            factors = [0.0] * len(errs)
            floors = [YARDSTICK_TOL[dtype]] * len(errs)
        else:
            base = _worst(_run_backend(yardstick, tensors, extra, device, dtype), ref)
            factors = [2.0, 2.0] + [3.0] * (len(errs) - 2)
            floors = [FLOOR[dtype]] * len(errs)
        for name, err, b, f, floor, r in zip(NAMES, errs, base, factors, floors, ref):
            magnitude = max(1.0, float(r[torch.isfinite(r)].abs().max()) if r.numel() else 1.0)
            allowed = f * b + floor * magnitude
            if not err <= allowed:
                what = "non-finite values" if err == float("inf") else f"error {err:.3g}"
                return ProbeResult(
                    False,
                    f"{name}: {what} against float64 where {allowed:.3g} is allowed "
                    f"({f:g} x PyTorch's {b:.3g} + {floor:g} x {magnitude:.3g}); case "
                    f"B,H,N,N_k,T,P = {case[:6]}",
                )
            worst = max(worst, err / allowed)
    return ProbeResult(True, f"within the rule (worst error {worst:.2f} of its allowance)")


def _device_usable(device: torch.device) -> bool:
    try:
        torch.empty(1, device=device)
    except Exception:
        return False
    return True


def check(backend: Backend, call: Call) -> str | None:
    """None when ``backend`` passed (or cannot be probed here), else why it is disabled.

    Probes once per process and (backend, device, dtype, head dim); a failure is said once.
    """
    key = (backend.name, str(call.device), str(call.dtype), call.head_dim)
    result = _RESULTS.get(key)
    if result is None:
        if not _device_usable(call.device):
            return None  # nothing to run on: availability reports it
        result = run(backend, call)
        _RESULTS[key] = result
        record("probes", _record_key(key), {"ok": result.ok, "detail": result.detail})
        if not result.ok:
            warnings.warn(
                f"fastprompt: backend {backend.name!r} failed its self-check on {call.device} "
                f"({call.dtype}, head dim {call.head_dim}) and is disabled for this process: "
                f"{result.detail}. Set FASTPROMPT_PROBE=off to skip the check.",
                RuntimeWarning,
                stacklevel=5,
            )
    if result.ok:
        return None
    return f"failed its self-check against the cascade ({result.detail})"


def _record_key(key: tuple[str, str, str, int]) -> str:
    from fastprompt.backends.cache import device_name

    name, device, dtype, d = key
    return f"{name}|{device_name(torch.device(device))}|{dtype}|d{d}"


def forget() -> None:
    """Drop this process's probe results (tests)."""
    _RESULTS.clear()
