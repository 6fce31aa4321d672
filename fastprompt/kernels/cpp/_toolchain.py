"""What this machine compiles the ``csrc/`` extension with: the CUDA toolkit, the host C++ compiler,
the CPU instruction set, and the compiler flags for each.

Only the standard library and torch are imported at module level, because ``setup.py`` loads
:mod:`fastprompt.kernels.cpp._build` by path before the package is importable, and that module
loads this one the same way; that is also why nothing here reads ``FASTPROMPT_*`` (the package
reads them in :mod:`fastprompt._config`): the architecture list is an argument.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CUDA_ARCHS = ("8.0", "9.0")

# Flags per CPU capability, as torch compiles its own per-capability kernels: the vectorised
# loops (at::vec) are only as wide as the instruction set the file is compiled for.
_ISA_FLAGS = {
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


@dataclass(frozen=True)
class CudaToolkit:
    """A CUDA toolkit found on this machine."""

    home: str
    nvcc: str
    version: str  # "13.0"
    found_by: str  # which rule found it (CUDA_HOME, nvcc on PATH, ...)


def _is_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def _nvcc_home(nvcc: str) -> Path | None:
    """The toolkit root of an ``nvcc`` on PATH, which may be a symlink or a wrapper script."""
    real = Path(nvcc).resolve()
    if _is_toolkit(real.parent.parent):
        return real.parent.parent
    # A wrapper script (``exec /opt/cuda-x/bin/nvcc "$@"``): nvcc's dry run names its own dir.
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("")
        try:
            res = subprocess.run(
                [nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"^#\$ _HERE_=(.+)$", res.stdout + res.stderr, re.MULTILINE)
    if m:
        root = Path(m.group(1).strip()).resolve().parent
        if _is_toolkit(root):
            return root
    return None


def nvcc_version(nvcc: str) -> str | None:
    """``"13.0"`` from ``nvcc --version``, or None."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out.stdout)
    return m.group(1) if m else None


def find_cuda_toolkit() -> tuple[CudaToolkit | None, str]:
    """The CUDA toolkit to build with, and how it was found (or why none was).

    Order: ``CUDA_HOME``, ``CUDA_PATH``, the real location of ``nvcc`` on PATH (through symlinks
    and wrapper scripts), ``/usr/local/cuda``. A candidate counts only if it has ``bin/nvcc`` and
    ``include/cuda_runtime.h``. A set ``CUDA_HOME`` (else ``CUDA_PATH``) is the user's choice, as
    for PyTorch's own builder: when it is no toolkit, none is found (rather than another one
    quietly taken in its place).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        chosen = os.environ.get(var, "").strip()
        if not chosen:
            continue
        root = Path(chosen).expanduser()
        version = nvcc_version(str(root / "bin" / "nvcc")) if _is_toolkit(root) else None
        if version is None:
            return None, (
                f"no CUDA toolkit found: {var}={chosen} is not a CUDA toolkit (it needs a "
                f"working bin/nvcc and include/cuda_runtime.h); point {var} at one, or unset it"
            )
        return CudaToolkit(str(root.resolve()), str(root / "bin" / "nvcc"), version, var), var
    candidates: list[tuple[str, Path | None]] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append((f"nvcc on PATH ({nvcc})", _nvcc_home(nvcc)))
    candidates.append(("/usr/local/cuda", Path("/usr/local/cuda")))
    rejected = []
    for how, root in candidates:
        if root is not None and _is_toolkit(root):
            exe = str(root / "bin" / "nvcc")
            version = nvcc_version(exe)
            if version is not None:
                return CudaToolkit(str(root.resolve()), exe, version, how), how
        rejected.append(f"{how}: {root} is not a CUDA toolkit")
    return None, "no CUDA toolkit found (" + "; ".join(rejected) + ")"


def find_cxx() -> str | None:
    """The host C++ compiler torch will use (``CXX`` or ``c++``), if present."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def cpu_isa() -> str:
    """The CPU capability to compile for: torch's own choice on this machine."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability().lower()
    if cap.startswith("avx512"):
        return "avx512"
    if cap.startswith("avx2"):
        return "avx2"
    return "default"


def cuda_archs(explicit: str | None) -> list[str]:
    """Architectures to compile for, as ``["8.0", "9.0"]``.

    ``TORCH_CUDA_ARCH_LIST`` (``explicit``, numbers separated by ``;`` or spaces, ``+PTX``
    allowed) wins; otherwise the visible GPUs'; otherwise sm_80 and sm_90.

    Raises
    ------
    ValueError
        If ``explicit`` holds an entry that is no such number (PyTorch's names, "Hopper", or
        "sm_90"), which nvcc would refuse only once the build has started.
    """
    if explicit:
        archs = [a for a in re.split(r"[;\s,]+", explicit.strip()) if a]
        bad = [a for a in archs if not re.fullmatch(r"\d+\.\d+[a-z]?(\+PTX)?", a)]
        if bad or not archs:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST={explicit!r}: {', '.join(map(repr, bad)) or 'nothing'} "
                'is no architecture number; give numbers such as "8.0;9.0" (+PTX allowed)'
            )
        return archs
    try:
        import torch

        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            return [f"{major}.{minor}" for major, minor in sorted(caps)]
    except Exception:  # a broken driver must not stop a CPU build from describing itself
        pass
    return list(DEFAULT_CUDA_ARCHS)


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def nvcc_flags(archs: list[str], ptxas_verbose: bool = True) -> list[str]:
    """nvcc flags for the kernels (``-Xptxas -v`` puts register/spill counts in the build log)."""
    flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *gencode_flags(archs)]
    if ptxas_verbose:
        flags += ["-Xptxas", "-v"]
    return flags


def cxx_flags(isa: str) -> list[str]:
    return ["-O3", *_ISA_FLAGS[isa], *openmp_flags()]


def openmp_flags() -> list[str]:
    """``-fopenmp`` when torch parallelises with OpenMP: ``at::parallel_for`` is inlined from
    ATen's headers into the extension, and compiled without OpenMP it runs every task on the
    calling thread (the kernels then use one core whatever ``torch.get_num_threads()`` says)."""
    import torch

    return ["-fopenmp"] if torch.backends.openmp.is_available() else []
