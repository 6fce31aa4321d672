"""Ahead-of-time compilation of the prompt-attention launch plans for a GPU target, no GPU needed.

The launchers' own plans (:func:`~fastprompt.kernels.triton.prompt_attention.fwd_plan`,
:func:`~fastprompt.kernels.triton.prompt_attention_backward.bwd_plan`,
:func:`~fastprompt.kernels.triton._bwd_reduce.reduce_plan`) are built on CPU tensors with the
strides the model passes (q, k, v views of a (B, N, 3, H, d) buffer), and each kernel is compiled
with ``JITFunction.warmup`` under a stand-in driver that reports the target
(``GPUTarget("cuda", 80 | 90, 32)``) and never launches. So the compiled code has exactly the
specialisation a real launch gets. Resources come from the cubin (``cuobjdump``) and the PTX.

Must run with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled):
``benchmarks/static_report.py`` and the static test run it in a subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import triton

from fastprompt.kernels.triton import _tuning

# Per-SM resources of the targets (A100, H100 SXM): registers, shared memory, warps, blocks.
SM_LIMITS = {
    80: {"regs": 65536, "smem": 164 * 1024, "warps": 64, "blocks": 32},
    90: {"regs": 65536, "smem": 228 * 1024, "warps": 64, "blocks": 32},
}


def unavailable() -> str | None:
    """None when this Triton can compile for a target without a GPU, else why not."""
    if _tuning.interpreting():
        return "TRITON_INTERPRET is set: interpreted kernels cannot be compiled"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime import driver

        driver.set_active  # noqa: B018 - attribute probe (Triton >= 3.0)
    except (ImportError, AttributeError) as e:
        return f"triton {triton.__version__} lacks the AOT hooks used here ({e})"
    if _cuobjdump() is None:
        return "cuobjdump not found (neither bundled with Triton nor under CUDA_HOME)"
    return None


class _TargetDriver:
    """Stand-in for Triton's CUDA driver: says which GPU to compile for; cannot launch."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return f"aot-sm{self.arch}"  # its own key in Triton's per-device kernel caches

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        # Asked for when an Autotuner is built (Triton 3.2 does it in __init__, at import):
        # refuse only a benchmark actually run.
        return _cannot_benchmark


def _cannot_benchmark(*args: object, **kwargs: object) -> None:
    raise RuntimeError("ahead-of-time compilation cannot benchmark")


@contextlib.contextmanager
def target(arch: int) -> Iterator[None]:
    from triton.runtime import driver

    # Restore whatever was active before (reset_active would build the real driver, which fails
    # on a machine without a GPU).
    previous = getattr(driver, "_active", None)
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def _cuobjdump() -> str | None:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for path in (
        os.path.join(bundled, "cuobjdump"),
        shutil.which("cuobjdump"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
    ):
        if path and os.path.exists(path):
            return path
    return None


def _cubin_resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    regs, stack, static_smem, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_smem": static_smem, "local": local}


def warps_per_sm(arch: int, regs: int, smem: int, warps: int) -> int:
    """Theoretical resident warps per SM (register allocation in 256-register warp units,
    1 KB of shared memory reserved per block)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // warps
    by_smem = lim["smem"] // (smem + 1024)
    blocks = min(by_regs, by_smem, lim["warps"] // warps, lim["blocks"])
    return blocks * warps


@dataclass
class Row:
    """Resources of one compiled (kernel, config, dtype, head dim, target)."""

    arch: int
    kernel: str
    dtype: str
    d: int
    variant: str
    block_m: int | None
    block_n: int | None
    warps: int
    stages: int | None
    regs: int
    spill_bytes: int  # stack frame + local memory per thread: 0 means no spills
    smem: int
    smem_limit: int
    smem_estimate: int | None
    wgmma: int
    mma_sync: int
    warps_per_sm: int
    admissible: bool

    def as_dict(self) -> dict:
        return asdict(self)


def model_inputs(
    dtype,
    d,
    n=197,
    p=50,
    t=1,
    heads=12,
    batch=2,
    indexed=False,
    lengths=False,
    device="cpu",
    n_k=None,
):
    """Tensors laid out as the model passes them (contents are irrelevant to compiling): q, k, v
    views of (B, N, 3, H, d) buffers (k and v of another one with ``n_k`` rows when given)."""

    def qkv_views(rows):
        buf = torch.empty(batch, rows, 3, heads, d, dtype=dtype, device=device)
        return buf.permute(2, 0, 3, 1, 4).unbind(0)

    q, k, v = qkv_views(n)
    if n_k is not None and n_k != n:
        _, k, v = qkv_views(n_k)
    pk = torch.empty(t, heads, p, d, dtype=dtype, device=device)
    pv = torch.empty(t, heads, p, d, dtype=dtype, device=device)
    index = torch.zeros(batch, dtype=torch.int64, device=device) if indexed else None
    lens = torch.full((t,), p, dtype=torch.int64, device=device) if lengths else None
    # out and dout as the model has them: (B, N, H, d) storage seen as (B, H, N, d)
    out = torch.empty(batch, n, heads, d, dtype=dtype, device=device).transpose(1, 2)
    dout = torch.empty(batch, n, heads, d, dtype=dtype, device=device).transpose(1, 2)
    lse = torch.empty(batch, heads, n, dtype=torch.float32, device=device)
    return q, k, v, pk, pv, index, lens, out, dout, lse


def plan(dtype, d, scores: int = 0, **shape) -> list:
    """Every launch of a forward and a backward as the launchers plan them (prompt gradients
    reduced per set), for :func:`model_inputs` of ``shape``; with ``scores`` > 0 the backward is
    the scored one with that many vector pairs."""
    from fastprompt.kernels.triton.prompt_attention import fwd_plan
    from fastprompt.kernels.triton.prompt_attention_backward import backward_plan

    q, k, v, pk, pv, index, lens, out, dout, lse = model_inputs(dtype, d, **shape)
    scale = d**-0.5
    *_, fwd = fwd_plan(q, k, v, pk, pv, index, lens, scale)
    u = torch.empty(scores, *pk.shape, dtype=torch.float32, device=q.device) if scores else None
    *_, bwd = backward_plan(dout, q, k, v, pk, pv, index, lens, out, lse, scale, u, u)
    return fwd + bwd


def compile_plan(
    arch: int,
    dtype,
    d: int,
    variant: str = "",
    select: Callable[[str, list, list], list] | None = None,
    roles: tuple[str, ...] | None = None,
    **plan_kw,
) -> list[Row]:
    """Compile a plan's kernels for ``arch`` and read their resources.

    Tuned kernels are compiled for ``select(role, all_configs, admissible_configs)`` (default:
    every config, each marked admissible or not by the pruner against ``arch``); ``roles`` limits
    which kernels are compiled.
    """
    why = unavailable()
    if why is not None:
        raise RuntimeError(why)
    limit = _tuning.SMEM_LIMIT[arch]
    elt = torch.empty((), dtype=dtype).element_size()
    rows = []
    with target(arch):
        for launch in plan(dtype, d, **plan_kw):
            if roles is not None and launch.role not in roles:
                continue
            kernel = launch.kernel
            if launch.role in _tuning.CONFIGS:
                every = list(_tuning.CONFIGS[launch.role])
                ok = _tuning.admissible(launch.role, every, d, elt, arch, limit)
                cfgs = every if select is None else select(launch.role, every, ok)
                jobs = [(c, c in ok, c.triton().all_kwargs()) for c in cfgs]
                fn = kernel.fn
            else:
                jobs = [(None, True, {})]
                fn = kernel
            for cfg, is_ok, cfg_kwargs in jobs:
                compiled = fn.warmup(*launch.args, grid=(1,), **launch.kwargs, **cfg_kwargs)
                rows.append(_row(arch, launch, cfg, is_ok, compiled, dtype, d, variant, elt))
    return rows


def resources(compiled) -> dict:
    """Registers, spill bytes, shared memory and wgmma / mma.sync counts of a compiled kernel."""
    res = _cubin_resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return {
        "regs": res["regs"],
        "spill_bytes": res["stack"] + res["local"],
        "smem": int(compiled.metadata.shared),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
    }


def _row(arch, launch, cfg, is_ok, compiled, dtype, d, variant, elt) -> Row:
    res = resources(compiled)
    smem = res["smem"]
    warps = int(compiled.metadata.num_warps)
    return Row(
        arch=arch,
        kernel=launch.role,
        dtype=str(dtype).replace("torch.", ""),
        d=d,
        variant=variant,
        block_m=cfg.block_m if cfg else launch.kwargs.get("BLOCK_M"),
        block_n=cfg.block_n if cfg else None,
        warps=warps,
        stages=cfg.stages if cfg else None,
        regs=res["regs"],
        spill_bytes=res["spill_bytes"],
        smem=smem,
        smem_limit=_tuning.SMEM_LIMIT[arch],
        smem_estimate=_tuning.smem_estimate(launch.role, cfg, d, elt) if cfg else None,
        wgmma=res["wgmma"],
        mma_sync=res["mma_sync"],
        warps_per_sm=warps_per_sm(arch, res["regs"], smem, warps),
        admissible=is_ok,
    )


# Modules whose jit functions the static report compiles.
_KERNEL_MODULES = (
    "fastprompt.kernels.triton._common",
    "fastprompt.kernels.triton.prompt_attention",
    "fastprompt.kernels.triton._bwd_dkdv",
    "fastprompt.kernels.triton._bwd_dq",
    "fastprompt.kernels.triton._bwd_reduce",
)


def source_hash() -> str:
    """Hash of every Triton jit function's source and of the config lists: the static report is
    stale when it changes (launcher comments and docstrings do not count)."""
    import importlib
    import inspect

    h = hashlib.sha256()
    for name in _KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            fn = getattr(getattr(module, attr), "fn", None)  # JITFunction / InterpretedFunction
            if inspect.isfunction(fn) and fn.__module__ == name:
                h.update(f"{name}.{attr}\0".encode() + inspect.getsource(fn).encode())
    h.update(repr(sorted(_tuning.CONFIGS.items())).encode())
    return h.hexdigest()[:16]
