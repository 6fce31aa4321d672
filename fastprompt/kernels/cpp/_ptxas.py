"""Register, spill and stack figures of the CUDA kernels, from ``nvcc -Xptxas -v``.

The kernel files (``csrc/cuda/*.cu``) include no torch header, so nvcc compiles them alone, for one
architecture at a time, in seconds. Used by ``benchmarks/cuda_ptxas_report.py`` (the table in
``benchmarks/results/static/``) and by the test that keeps every kernel spill-free and under the
register budget.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastprompt.kernels.cpp import _build, _toolchain

# Budget per thread. Every kernel launches 256 threads per block and is bound by memory (the
# attention itself runs on PyTorch's fused kernels); at <= 64 registers an SM's 64K registers hold
# 4 such blocks, 32 warps, half the maximum occupancy of sm_80/sm_90: enough loads in flight to
# cover global-memory latency. Above it fewer warps hide the latency.
REGISTER_BUDGET = 64

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelUsage:
    """ptxas's figures for one compiled kernel."""

    file: str
    kernel: str
    arch: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    static_smem_bytes: int = 0


def demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names (``merge_kernel<bf16, 8>``) via c++filt when it is there."""
    out = dict(zip(names, names))
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
        if res.returncode == 0:
            out = dict(zip(names, res.stdout.splitlines()))
    for k, v in out.items():
        v = re.sub(r"fastprompt::cuda::(\(anonymous namespace\)::)?", "", v)
        v = re.sub(r"\((fastprompt::cuda::)?\w+Params\)|\(.*\)$", "", v)
        v = v.replace("__nv_bfloat16", "bf16").replace("__half", "f16").strip()
        out[k] = v.removeprefix("void ")
    return out


def parse(text: str, file: str) -> list[KernelUsage]:
    """KernelUsage rows from ptxas's verbose output for one source file."""
    rows: list[KernelUsage] = []
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            rows.append(KernelUsage(file=file, kernel=m.group(1), arch=m.group(2)))
        elif rows and (m := _FRAME.search(line)):
            rows[-1].stack_bytes, rows[-1].spill_stores, rows[-1].spill_loads = map(int, m.groups())
        elif rows and (m := _USED.search(line)):
            rows[-1].registers = int(m.group(1))
            if s := _SMEM.search(line):
                rows[-1].static_smem_bytes = int(s.group(1))
    names = demangle([r.kernel for r in rows])
    for r in rows:
        r.kernel = names[r.kernel]
    return rows


def compile_usage(
    arch: str, toolkit: _toolchain.CudaToolkit, root: Path | None = None
) -> tuple[list[KernelUsage], dict[str, float]]:
    """Compile every kernel file for ``arch`` (e.g. ``"8.0"``) with the extension's nvcc flags.

    Returns
    -------
    rows : list of KernelUsage
        One per kernel instantiation.
    seconds : dict
        Compile time per file.

    Raises
    ------
    RuntimeError
        If nvcc fails (its output is in the message).
    """
    root = root or _build.source_root()
    if root is None:
        raise FileNotFoundError("csrc/ sources not found")
    rows: list[KernelUsage] = []
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in _build.CUDA_KERNEL_SOURCES:
            cmd = [
                toolkit.nvcc,
                "-c",
                str(root / src),
                "-o",
                str(Path(tmp) / "kernel.o"),
                f"-I{root / 'include'}",
                f"-I{root / 'cuda'}",
                *_toolchain.nvcc_flags([arch], ptxas_verbose=True),
            ]
            start = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            seconds[src] = round(time.perf_counter() - start, 1)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src} for {arch}:\n{res.stderr[-4000:]}")
            rows += parse(res.stdout + res.stderr, Path(src).name)
    return rows, seconds


def as_dicts(rows: list[KernelUsage]) -> list[dict]:
    return [asdict(r) for r in rows]
