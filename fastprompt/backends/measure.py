"""Dispatch by measurement: the fastest candidate per shape bucket, timed once, cached on disk.

On a GPU by default (``FASTPROMPT_MEASURE``), automatic choice among several candidates (each
able to run the call and past its probe) times each for a few iterations at the call's own
shapes, forward only for inference or forward + backward for training, and keeps the fastest for
the key (op, device name, dtype, head dim, P bucket, N bucket, inference or training, features).
The decision is logged once, kept for the process and in the dispatch cache file
(:mod:`.cache`, keyed by versions, shown by ``fastprompt info``). Inside ``torch.compile`` the
choice runs while tracing (``choose_name`` is an assumed constant), so compiled code holds the
decision as a constant.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch

from fastprompt.backends import Backend, Call
from fastprompt.backends.cache import device_name, entries, record

__all__ = ["bucket", "decisions", "fastest", "key", "measurable", "time_backend"]

logger = logging.getLogger("fastprompt")

WARMUP = 2  # calls before timing: compilation, autotuning, the allocator's first requests
REPEATS = 5  # timed samples; the median is kept
INNER = {"cuda": 3, "cpu": 1}  # calls per sample

_DECIDED: dict[str, str] = {}


# The batch to time where torch.compile traced it symbolically (N and P, which key the decision,
# are always known).
STAND_INS = {"cuda": 64, "cpu": 8}


def measurable(shape: tuple[int | None, ...] | None) -> bool:
    """Whether a call's shape can key a measured choice: N and P known."""
    return shape is not None and shape[2] is not None and shape[5] is not None


def _concrete(shape: tuple[int | None, ...], call: Call) -> tuple[int, ...]:
    b, h, n, n_k, t, p = shape
    b = b if b is not None else STAND_INS.get(call.device.type, 8)
    h = h if h is not None else 12
    n_k = n_k if n_k is not None else n
    if t is None:  # a symbolic set count: one set per sequence when indexed
        t = b if "prompt_index" in call.features else 1
    return b, h, n, n_k, t, p


def bucket(x: int) -> int:
    """0, or the next power of two at or above ``x``."""
    return 0 if x <= 0 else 1 << (int(x) - 1).bit_length()


def key(op: str, call: Call, shape: tuple[int, ...], training: bool) -> str:
    """The cache key of a measured choice."""
    _, _, n, _, _, p = shape
    dtype = str(call.dtype).replace("torch.", "")
    features = "+".join(sorted(call.features)) or "plain"
    mode = "train" if training else "infer"
    return (
        f"{op}|{device_name(call.device)}|{dtype}|d{call.head_dim}|P{bucket(p)}|N{bucket(n)}"
        f"|{mode}|{features}"
    )


def decisions() -> dict[str, str]:
    """The measured choices made or loaded in this process: key → backend name."""
    return dict(_DECIDED)


def _inputs(call: Call, shape: tuple[int, ...]):
    b, h, n, n_k, t, p = shape
    d, dev, dtype = call.head_dim, call.device, call.dtype
    g = torch.Generator(device=dev if dev.type != "mps" else "cpu").manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=g, device=g.device).to(dev, dtype)

    if n_k == n:  # as timm lays them out: views of one (B, N, 3, H, d) buffer
        q, k, v = randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = randn(b, h, n, d), randn(b, h, n_k, d), randn(b, h, n_k, d)
    features = call.features
    extra = {
        "prompt_index": torch.arange(b, device=dev) % t if "prompt_index" in features else None,
        "prompt_lengths": torch.full((t,), p, device=dev) if "prompt_lengths" in features else None,
    }
    kw = {"key_bias": torch.zeros(1, h, n, n_k, device=dev)} if "key_bias" in features else {}
    dout = randn(b, n, h, d).transpose(1, 2)
    return (q, k, v, randn(t, h, p, d), randn(t, h, p, d)), extra, kw, dout


def _timer(step: Callable[[], None], device: torch.device) -> float:
    """Median milliseconds of one ``step``."""
    inner = INNER.get(device.type, 1)
    samples = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        else:
            begin = time.perf_counter()
            for _ in range(inner):
                step()
            samples.append((time.perf_counter() - begin) * 1e3 / inner)
    return statistics.median(samples)


def time_backend(backend: Backend, call: Call, shape: tuple[int, ...], training: bool) -> float:
    """Milliseconds of one call of ``backend``'s kernels at ``shape``: forward, plus backward
    (the scored one when the call needs scores) when ``training``."""
    kernels = backend.module()
    (q, k, v, pk, pv), extra, kw, dout = _inputs(call, shape)
    index, lengths = extra["prompt_index"], extra["prompt_lengths"]
    scale = call.head_dim**-0.5
    u = torch.zeros(1, *pk.shape, device=call.device, dtype=call.dtype)

    def step() -> None:
        out, lse = kernels.prompt_attention_fwd(q, k, v, pk, pv, index, lengths, scale, **kw)
        if not training:
            return
        args = (dout, q, k, v, pk, pv, index, lengths, out, lse, scale)
        if "scores" in call.features:
            kernels.prompt_attention_bwd_scored(*args, u, u, **kw)
        else:
            kernels.prompt_attention_bwd(*args, **kw)

    with torch.no_grad():
        for _ in range(WARMUP):
            step()
        return _timer(step, call.device)


def fastest(
    op: str, candidates: list[Backend], call: Call, shape: tuple[int | None, ...], training: bool
) -> Backend:
    """The fastest of ``candidates`` for the call's bucket: decided already in this process, read
    from the cache file, or measured now."""
    shape = _concrete(shape, call)
    k = key(op, call, shape, training)
    by_name = {b.name: b for b in candidates}
    name = _DECIDED.get(k)
    if name not in by_name:
        cached = entries("measured").get(k)
        name = cached["backend"] if isinstance(cached, dict) else None
        if name in by_name:
            logger.info("fastprompt: %s uses %r (measured earlier, dispatch cache)", k, name)
    if name not in by_name:
        times, failures = {}, {}
        for b in candidates:
            try:
                times[b.name] = time_backend(b, call, shape, training)
            except Exception as e:  # it cannot run this shape: not a candidate here
                failures[b.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        name = min(times, key=times.get) if times else candidates[0].name
        record(
            "measured",
            k,
            {
                "backend": name,
                "ms": {n: round(t, 4) for n, t in times.items()},
                "shape": shape,
                "failed": failures,
            },
        )
        logger.info(
            "fastprompt: %s uses %r, the fastest of %s (ms)%s",
            k,
            name,
            {n: round(t, 3) for n, t in times.items()},
            f"; could not run: {failures}" if failures else "",
        )
    _DECIDED[k] = name
    return by_name[name]


def forget() -> None:
    """Drop this process's decisions (tests)."""
    _DECIDED.clear()
