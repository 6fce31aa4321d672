"""Measurement primitives behind ``fastprompt bench`` and ``benchmarks/``: what every result records
about its environment, timings and their statistics, activation memory, FLOPs.

The benchmark itself (what is measured side by side, and the report rows) is
:mod:`fastprompt.bench`, which re-exports the public names here.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fastprompt

_PACKAGE = os.path.dirname(os.path.abspath(fastprompt.__file__))

__all__ = [
    "FLOP_HANDLES",
    "activation_bytes",
    "environment",
    "flops",
    "git_commit",
    "paired_ratios",
    "summarize",
    "time_fn",
    "time_interleaved",
]


# glibc's malloc (MALLOC_*, GLIBC_TUNABLES), jemalloc (MALLOC_CONF), tcmalloc, a preloaded one.
_ALLOCATOR_VARS = ("MALLOC_", "GLIBC_TUNABLES", "TCMALLOC_", "LD_PRELOAD")


# At most this many changed paths are named after "+dirty"; more are counted.
_DIRTY_NAMED = 3
# Where the benchmarks write their results in the tree: rewriting committed figures (a rerun
# removes them first) changes no code, so it leaves the commit clean.
_RESULTS = "benchmarks/results"


def git_commit(root: str | os.PathLike[str] | None = None) -> str | None:
    """The commit the code at ``root`` (default: fastprompt's source tree) is, as results record
    it: the short hash, then ``+dirty`` if tracked files differ from it (the changed paths named
    when there are at most three, else counted), so a figure measured on uncommitted code says so.

    Untracked files and files under ``benchmarks/results/`` do not count: results written into
    the tree, committed ones a rerun replaces among them, are not code. Git's optional index
    refresh is off, so recording the commit never writes the checkout's index (a ``git commit``
    run meanwhile would find it locked).

    Parameters
    ----------
    root : path, optional
        A folder that is the top of a git work tree.

    Returns
    -------
    str or None
        ``"<sha>"``, ``"<sha>+dirty (a.py, b.py)"`` or ``"<sha>+dirty (12 paths)"``; None where
        ``root`` is not the top of a git work tree (an installed copy) or git is missing.
    """
    root = os.path.realpath(root if root is not None else os.path.dirname(_PACKAGE))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *args],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=root,
            check=True,
        ).stdout

    try:
        # One line each: a checkout's path may hold spaces.
        top, sha = git("rev-parse", "--show-toplevel", "--short", "HEAD").splitlines()
        # An installed copy inside some other repository (a venv in a project) is not its code.
        if os.path.realpath(top) != root:
            return None
        changed = [
            line[3:].split(" -> ")[-1]
            for line in git(
                "status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){_RESULTS}"
            ).splitlines()
            if line.strip()
        ]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    if not changed:
        return sha
    named = ", ".join(changed) if len(changed) <= _DIRTY_NAMED else f"{len(changed)} paths"
    return f"{sha}+dirty ({named})"


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions, git commit and date, recorded with every result."""
    import timm

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (
            f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        )
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "timm": timm.__version__,
        # timm's switch between PyTorch's fused attention and attention written out
        # (TIMM_FUSED_ATTN): it moves the prompt-free model's time, Swin's (experimental) most.
        "timm_fused_attn": {
            "stable": timm.layers.use_fused_attn(),
            "experimental": timm.layers.use_fused_attn(experimental=True),
        },
        # On a CPU, glibc's malloc returns large freed tensors to the system, and the next
        # step's page faults cost up to a fifth of a step, more for a model that keeps more:
        # its settings (or a preloaded allocator) move the ratios, so they are recorded.
        "cpu_allocator": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith(_ALLOCATOR_VARS)
        }
        or "default",
        "fastprompt": fastprompt.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1
) -> list[float]:
    """Seconds per call, ``reps`` times after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of several functions, timed in turn within each repetition; the order
    rotates from one repetition to the next, so that what one call leaves behind (the
    allocator's state, caches) does not always fall on the same next one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for rep in range(reps):
        shift = rep % len(order)
        for name in order[shift:] + order[:shift]:
            times[name] += time_fn(fns[name], device, 1, warmup=0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median, p20 and p80 of repeated timings, in seconds.

    Quantiles are interpolated *within* the data (``method="inclusive"``), so with few
    repetitions p20 and p80 stay between the fastest and the slowest run instead of being
    extrapolated past them.
    """
    if not times:
        raise ValueError("summarize: no timings")
    qs = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {
        "median_s": statistics.median(times),
        "p20_s": qs[0],
        "p80_s": qs[3],
        "reps": len(times),
    }


def paired_ratios(times: list[float], against: list[float]) -> dict[str, float]:
    """Median, p20 and p80 of the ratios of two interleaved timings, repetition by repetition.

    Each repetition times the variants back to back, so a ratio taken within it cancels the
    machine's drift between repetitions, which a ratio of medians keeps.
    """
    if len(times) != len(against):
        raise ValueError(f"paired_ratios: {len(times)} timings against {len(against)}")
    s = summarize([a / b for a, b in zip(times, against)])
    return {"median": s["median_s"], "p20": s["p20_s"], "p80": s["p80_s"]}


def activation_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes autograd saves for backward while ``fn`` runs; each storage counted once.

    Parameters' storages (``exclude``) are not activations and are left out.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


# -- FLOPs -------------------------------------------------------------------------------------


def _attention_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of attention: q·kᵀ and p·v, 2·B·H·N·M·d (fvcore counts one MAC as one flop)."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    b, h, n, d = q
    return 2 * b * h * n * k[-2] * d


def _prompt_attention_flops(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    b, h, n, d = get_shape(inputs[0])
    keys = get_shape(inputs[1])[-2] + get_shape(inputs[3])[-2]
    return 2 * b * h * n * keys * d


FLOP_HANDLES: dict[str, Callable] = {
    "aten::scaled_dot_product_attention": _attention_flops,
    "aten::_scaled_dot_product_flash_attention_for_cpu": _attention_flops,
    "fastprompt::prompt_attention": _prompt_attention_flops,
}


def flops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward GFLOPs (fvcore convention: multiply-adds) with handles for attention ops.

    A prompted model is counted inside :meth:`~fastprompt.PromptedViT.frozen_prompts`, as it is
    deployed: its prompt K/V are computed once per model, not per image, and not counted.
    """
    from fvcore.nn import FlopCountAnalysis

    frozen = (
        model.frozen_prompts() if hasattr(model, "frozen_prompts") else contextlib.nullcontext()
    )
    with torch.no_grad(), frozen, warnings.catch_warnings():
        # fvcore hooks every module to name scopes; the blocks a prompted forward computes its
        # own way are counted by their ops all the same.
        warnings.filterwarnings("ignore", message="fastprompt: hooks on")
        analysis = FlopCountAnalysis(model, (x,)).set_op_handle(**FLOP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total() / 1e9
