"""Kernels that check themselves: a small probe before a backend's first use on a device.

The first time automatic choice considers a backend for a (device, dtype, head dim) — on a GPU by
default (``FASTPROMPT_PROBE``) — it runs the backend's forward and backward on a few small inputs (a
shared set, also one with query, key and prompt counts past a tile; indexed sets with per-set
lengths; keys of their own count, and a key bias, where the backend declares them; q, k, v and the
prompt keys and values as strided views of one projection buffer made on the device, as models pass
them; a shared set at a batch large enough for kernels that sum several sequences per program) and,
where declared, its scored backward and its backward without image gradients, and compares each
output with a float64 computation on the CPU (the prompt gradients of a backward without image
gradients with those of the full one). The rule is the package's (``docs/design.md`` section
5): the error may be at most twice that of PyTorch's own kernels in the same dtype on the same
device — the cascade backend, the yardstick — (three times for gradients), plus a small floor. A
backend that breaks the rule, returns non-finite values or raises is disabled for the process with a
one-time warning naming the error; the cascade itself must be within a fixed tolerance of float64.
Results are kept per process and recorded in the dispatch cache file for ``fastprompt info``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastprompt._warnings import warn_at_caller
from fastprompt.backends import YARDSTICK, Backend, Call, get
from fastprompt.backends.cache import record

__all__ = ["ProbeResult", "check", "results", "run"]

NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v", "terms", "gate")
# Outputs held to the forward's factor of the rule; every other one is a gradient (3x).
FORWARD = ("out", "lse")
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
# Prompt Condensation's vectors per case (u_k, u_v of shape (S, T, H, P, d)).
SCORE_VECTORS = 2


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
# The failures already said as a warning (a requested backend's is said by its error instead).
_SAID: set[tuple[str, str, str, int]] = set()


def results() -> dict[tuple[str, str, str, int], ProbeResult]:
    """The probes run in this process: (backend, device, dtype, head dim) → result."""
    return dict(_RESULTS)


@dataclass(frozen=True)
class _Case:
    """One probe input. ``bias``: False, True, or ``"period"`` (a bias per window, period 2).
    ``views``: q, k, v and the prompt keys/values as strided views of one projection buffer each,
    made on the device, as timm's attention (and Swin's windows) split them. ``variants``: the
    scored and the prompt-gradients-only backwards too, where the backend declares them."""

    b: int
    h: int
    n: int
    n_k: int
    t: int
    p: int
    index: tuple[int, ...] | None = None
    lengths: tuple[int, ...] | None = None
    bias: bool | str = False
    views: bool = False
    variants: bool = False

    def describe(self) -> str:
        sizes = (self.b, self.h, self.n, self.n_k, self.t, self.p)
        return f"B,H,N,N_k,T,P = {sizes}" + (", q/k/v views of one buffer" if self.views else "")


# A shared set at a batch where Triton's prompt-key programs each sum several sequences (its
# seq_group: from B·H·cdiv(P, 64) >= 512 prompt blocks; at ViT-B's 12 heads and P <= 64 from B 43):
# 257 gives groups of 2 with a partial last one. The other sizes are the first case's, so a tuned
# kernel reuses that case's autotuning bucket. A test pins that this case engages the groups.
GROUPED = (257, 2, 37, 37, 1, 13)


def _cases(backend: Backend) -> list[_Case]:
    """The cases the backend declares it takes."""
    features = backend.features
    indexed = {"prompt_index", "prompt_lengths"} <= features
    sets = {"t": 2, "index": (1, 0, 1), "lengths": (13, 6)} if indexed else {"t": 1}
    cases = [
        _Case(3, 2, 37, 37, 1, 13, variants=True),
        # Counts past a tile of 128: the others run only the masked last tiles of the kernels that
        # mask just those, never the full-tile code every ViT-sized call runs.
        _Case(2, 2, 197, 197, 1, 140, variants=True),
    ]
    if indexed:
        cases.append(_Case(3, 2, 37, 37, p=13, **sets, variants=True))
    if "key_count" in features:
        cases.append(_Case(2, 2, 21, 45, 1, 9, bias="key_bias" in features))
    if "key_bias" in features:  # Swin's windows: a bias per window, period 2 over 4 sequences
        cases.append(_Case(4, 2, 21, 21, 1, 9, bias="period"))
    # The layouts models hand over: views of one qkv buffer (a windowed model's too, with its bias).
    cases.append(_Case(3, 2, 37, 37, p=13, **sets, views=True, variants=True))
    if "key_bias" in features:
        cases.append(_Case(4, 2, 21, 21, 1, 9, bias="period", views=True, variants=True))
    # A shared set at a batch where kernels may sum several sequences' prompt gradients per program.
    cases.append(_Case(*GROUPED, views=True))
    return cases


def _variants(backend: Backend, case: _Case) -> list[tuple[bool, bool]]:
    """The backwards to run, as (scored, image_grads)."""
    runs = [(False, True)]
    if case.variants:
        scored = [True] if "scores" in backend.features else []
        runs += [(s, True) for s in scored]
        if backend.prompt_grads_only:
            runs += [(s, False) for s in [False, *scored]]
    return runs


def _inputs(case: _Case, head_dim: int, seed: int):
    b, h, n, n_k, t, p, d = case.b, case.h, case.n, case.n_k, case.t, case.p, head_dim
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "q": torch.randn(b, h, n, d, generator=g),
        "k": torch.randn(b, h, n_k, d, generator=g),
        "v": torch.randn(b, h, n_k, d, generator=g),
        "prompt_k": torch.randn(t, h, p, d, generator=g),
        "prompt_v": torch.randn(t, h, p, d, generator=g),
        "dout": torch.randn(b, h, n, d, generator=g),
        "u_k": torch.randn(SCORE_VECTORS, t, h, p, d, generator=g),
        "u_v": torch.randn(SCORE_VECTORS, t, h, p, d, generator=g),
    }
    extra = {
        "prompt_index": None if case.index is None else torch.tensor(case.index),
        "prompt_lengths": None if case.lengths is None else torch.tensor(case.lengths),
        "key_bias": (
            torch.randn(2 if case.bias == "period" else 1, h, n, n_k, generator=g)
            if case.bias
            else None
        ),
    }
    return tensors, extra


def _split(parts: list[Tensor], device, dtype) -> tuple[Tensor, ...]:
    """(B, H, N, d) tensors as views of one (B, N, len(parts), H, d) buffer made on ``device``,
    as ``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)`` gives them."""
    buffer = torch.stack(parts).permute(1, 3, 0, 2, 4).contiguous().to(device, dtype)
    return buffer.permute(2, 0, 3, 1, 4).unbind(0)


def _place(case: _Case, tensors, device, dtype) -> dict[str, Tensor]:
    """The inputs on ``device`` in ``dtype`` (the score vectors in at least float32, as Prompt
    Condensation computes them), dense or in the models' layouts."""
    u_dtype = torch.promote_types(dtype, torch.float32)
    x = {k: v.to(device, u_dtype if k.startswith("u_") else dtype) for k, v in tensors.items()}
    if case.views:
        x["q"], x["k"], x["v"] = _split([tensors[k] for k in "qkv"], device, dtype)
        x["prompt_k"], x["prompt_v"] = _split(
            [tensors["prompt_k"], tensors["prompt_v"]], device, dtype
        )
        # the gradient the output projection hands back: (B, N, H, d) seen as (B, H, N, d)
        x["dout"] = tensors["dout"].transpose(1, 2).contiguous().to(device, dtype).transpose(1, 2)
    return x


def _run_backend(
    backend: Backend, case: _Case, tensors, extra, device, dtype, variants
) -> list[dict[str, Tensor]]:
    """The forward, then each backward of ``variants``: per variant its outputs by name, as
    float64 on the CPU (without dq, dk, dv where image gradients are not asked for)."""
    kernels = backend.module()
    x = _place(case, tensors, device, dtype)
    e = {k: None if v is None else v.to(device) for k, v in extra.items()}
    kw = {} if e["key_bias"] is None else {"key_bias": e["key_bias"].to(dtype)}
    scale = x["q"].shape[-1] ** -0.5
    args = (x["q"], x["k"], x["v"], x["prompt_k"], x["prompt_v"])
    sets = (e["prompt_index"], e["prompt_lengths"])
    out, lse = kernels.prompt_attention_fwd(*args, *sets, scale, **kw)
    runs = []
    for scored, image_grads in variants:
        skip = {} if image_grads else {"image_grads": False}
        common = (x["dout"], *args, *sets, out, lse, scale)
        if scored:
            grads = kernels.prompt_attention_bwd_scored(*common, x["u_k"], x["u_v"], **kw, **skip)
        else:
            grads = kernels.prompt_attention_bwd(*common, **kw, **skip)
        got = dict(zip(NAMES, (out, lse, *grads)))
        if not image_grads:  # unspecified then
            got = {k: t for k, t in got.items() if k not in ("dq", "dk", "dv")}
        runs.append({k: t.detach().to("cpu", torch.float64) for k, t in got.items()})
    return runs


def _worst(got: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    errs = {}
    for name, a in got.items():
        e = ref[name]
        if a.shape != e.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} where {tuple(e.shape)} was expected")
        finite = torch.isfinite(e)
        if not torch.equal(torch.isfinite(a), finite):
            errs[name] = float("inf")
            continue
        diff = (a - e)[finite].abs()
        errs[name] = float(diff.max()) if diff.numel() else 0.0
    return errs


def _variant_name(scored: bool, image_grads: bool) -> str:
    return ("scored " if scored else "") + (
        "backward" if image_grads else "backward without image gradients"
    )


def run(backend: Backend, call: Call) -> ProbeResult:
    """Probe ``backend`` on ``call``'s device, dtype and head dim (no caching)."""
    device, dtype, d = call.device, call.dtype, call.head_dim
    yardstick = get(YARDSTICK)
    cpu, f64 = torch.device("cpu"), torch.float64
    worst = 0.0
    for seed, case in enumerate(_cases(backend)):
        variants = _variants(backend, case)
        tensors, extra = _inputs(case, d, seed)
        # The reference sees the inputs rounded to dtype: errors are the kernels' arithmetic.
        u_dtype = torch.promote_types(dtype, torch.float32)
        rounded = {
            k: v.to(u_dtype if k.startswith("u_") else dtype).double() for k, v in tensors.items()
        }
        # Without image gradients the prompt gradients must still be those of the full backward.
        full = sorted({(scored, True) for scored, _ in variants})
        refs = dict(zip(full, _run_backend(yardstick, case, rounded, extra, cpu, f64, full)))
        ref = [refs[(scored, True)] for scored, _ in variants]
        try:
            got = _run_backend(backend, case, tensors, extra, device, dtype, variants)
            errs = [_worst(a, r) for a, r in zip(got, ref)]
        except Exception as e:  # a kernel that cannot run here fails its probe, with the reason
            return ProbeResult(False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        if backend.name != YARDSTICK:
            theirs = _run_backend(yardstick, case, tensors, extra, device, dtype, variants)
            bases = [_worst(a, r) for a, r in zip(theirs, ref)]
        for i, variant in enumerate(variants):
            for name, err in errs[i].items():
                r = ref[i][name]
                magnitude = max(1.0, float(r[torch.isfinite(r)].abs().max()) if r.numel() else 1.0)
                if backend.name == YARDSTICK:
                    base, f, floor = 0.0, 0.0, YARDSTICK_TOL[dtype]
                else:
                    base, f = bases[i][name], 2.0 if name in FORWARD else 3.0
                    floor = FLOOR[dtype]
                allowed = f * base + floor * magnitude
                if not err <= allowed:
                    what = "non-finite values" if err == float("inf") else f"error {err:.3g}"
                    return ProbeResult(
                        False,
                        f"{name}: {what} against float64 where {allowed:.3g} is allowed "
                        f"({f:g} x PyTorch's {base:.3g} + {floor:g} x {magnitude:.3g}); "
                        f"{_variant_name(*variant)}, case {case.describe()}",
                    )
                worst = max(worst, err / allowed)
    return ProbeResult(True, f"within the rule (worst error {worst:.2f} of its allowance)")


def _device_usable(device: torch.device) -> bool:
    try:
        torch.empty(1, device=device)
    except Exception:
        return False
    return True


def check(backend: Backend, call: Call, say: bool = True) -> str | None:
    """None when ``backend`` passed (or cannot be probed here), else why it is disabled.

    Probes once per process and (backend, device, dtype, head dim). With ``say`` a failure is
    said once, as a warning at the person's call; a backend that was requested (``say=False``)
    is refused with the reason in the error instead, which then says it (the next automatic
    choice still warns).
    """
    key = (backend.name, str(call.device), str(call.dtype), call.head_dim)
    result = _RESULTS.get(key)
    if result is None:
        if not _device_usable(call.device):
            return None  # nothing to run on: availability reports it
        result = run(backend, call)
        _RESULTS[key] = result
        record("probes", _record_key(key), {"ok": result.ok, "detail": result.detail})
    if result.ok:
        return None
    if say and key not in _SAID:
        _SAID.add(key)
        warn_at_caller(
            f"fastprompt: backend {backend.name!r} failed its self-check on {call.device} "
            f"({call.dtype}, head dim {call.head_dim}) and is disabled for this process: "
            f"{result.detail}. Set FASTPROMPT_PROBE=off to skip the check.",
            RuntimeWarning,
        )
    return f"failed its self-check against the cascade ({result.detail})"


def _record_key(key: tuple[str, str, str, int]) -> str:
    from fastprompt.backends.cache import device_name

    name, device, dtype, d = key
    return f"{name}|{device_name(torch.device(device))}|{dtype}|d{d}"


def forget() -> None:
    """Drop this process's probe results (tests)."""
    _RESULTS.clear()
    _SAID.clear()
