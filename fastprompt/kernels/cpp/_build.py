"""Building the ``csrc/`` extension: its sources, the build plan and cache key, the JIT cache and
the ahead-of-time build. What the machine compiles with (the CUDA toolkit, the host compiler, the
CPU instruction set, the flags) is found in :mod:`fastprompt.kernels.cpp._toolchain`; its public
names are re-exported here, where the package, ``setup.py``, the tests and the benchmarks use them.

Only the standard library and torch are imported at module level, because ``setup.py`` loads this
file by path before the package is importable (this file then loads ``_toolchain.py`` by path
too); that is also why the functions here take the environment settings as arguments instead of
reading ``FASTPROMPT_*`` themselves (the package reads them in :mod:`fastprompt._config`).

Layout of a JIT build: ``<cache>/<key>/`` holds ninja's build tree and ``fastprompt_ext.so``, with
``<key> = torch<version>-<cu130|cpu>-<isa>-<hash of the sources and flags>``, so a change of
torch, CUDA toolkit, CPU instruction set or source gets its own directory and nothing stale is
ever loaded. ``build.json`` beside the library records what was built, how long it took, and the
library's size and SHA-256; a failed build leaves ``error.txt``.

A cached library is loaded only after its size and hash match that record: a truncated or
otherwise damaged file would be mapped by the dynamic loader and kill the process (SIGBUS) at its
first call. A damaged build is deleted and rebuilt. A verified build is used without taking the
lock, so a read-only cache holding one works; building takes a file lock
(``<cache>/<key>.lock``) that serialises concurrent first uses across processes: the second process
waits, then loads what the first built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType


def _load_sibling_by_path(name: str) -> ModuleType:
    """``<name>.py`` beside this file, loaded by path as ``setup.py`` loads this one (registered
    in ``sys.modules`` first, because dataclasses resolve their module by name)."""
    spec = importlib.util.spec_from_file_location(
        f"_fastprompt{name}", Path(__file__).with_name(f"{name}.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


if __package__:
    from fastprompt.kernels.cpp import _toolchain
else:  # loaded by path from setup.py: the package cannot be imported yet
    _toolchain = _load_sibling_by_path("_toolchain")

CudaToolkit = _toolchain.CudaToolkit
DEFAULT_CUDA_ARCHS = _toolchain.DEFAULT_CUDA_ARCHS
cpu_isa = _toolchain.cpu_isa
cuda_archs = _toolchain.cuda_archs
cxx_flags = _toolchain.cxx_flags
find_cuda_toolkit = _toolchain.find_cuda_toolkit
find_cxx = _toolchain.find_cxx
gencode_flags = _toolchain.gencode_flags
nvcc_flags = _toolchain.nvcc_flags
nvcc_version = _toolchain.nvcc_version
openmp_flags = _toolchain.openmp_flags

EXT_NAME = "fastprompt_ext"

CPU_SOURCES = (
    "registration.cpp",
    "build_info.cpp",
    "cpu/blas.cpp",
    "cpu/prompt_attention.cpp",
    "cpu/cascade_kernels.cpp",
    "cascade/cascade.cpp",
    "cascade/parts.cpp",
)
CUDA_SOURCES = (
    "cuda/cascade_kernels.cu",
    "cuda/dispatch.cpp",
)
# Kernels only (no torch headers): what the ptxas report and its test compile with nvcc alone.
CUDA_KERNEL_SOURCES = tuple(s for s in CUDA_SOURCES if s.endswith(".cu"))


def package_dir() -> Path:
    """``fastprompt/kernels/cpp/``, where an ahead-of-time build puts its library."""
    return Path(__file__).resolve().parent


def source_root() -> Path | None:
    """The ``csrc/`` folder: the checkout's (editable installs), or a copy shipped inside."""
    here = package_dir()
    for candidate in (here.parents[2] / "csrc", here / "_csrc"):
        if (candidate / "registration.cpp").is_file():
            return candidate
    return None


def source_files(root: Path) -> list[Path]:
    """Every file the build depends on, sorted (sources and headers)."""
    return sorted(p for p in root.rglob("*") if p.suffix in {".h", ".cuh", ".cpp", ".cu"})


def source_hash(root: Path, flags: list[str]) -> str:
    """Hash of the sources, headers and compile flags (the cache key's last part)."""
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    h.update("\0".join(flags).encode())
    # The build code is part of the key: this file and the toolchain's, where the flags come from.
    h.update(Path(__file__).read_bytes())
    h.update(Path(_toolchain.__file__).read_bytes())
    return h.hexdigest()[:16]


def write_config_header(folder: Path, isa: str, archs: list[str] | None) -> None:
    """``fastprompt_build_config.h``: the strings build_info() reports, without shell quoting."""
    lines = ["#pragma once", f'#define FASTPROMPT_CPU_ISA "{isa}"']
    if archs is not None:
        lines.append(f'#define FASTPROMPT_CUDA_ARCHS "{",".join(archs)}"')
    text = "\n".join(lines) + "\n"
    path = folder / "fastprompt_build_config.h"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ----------------------------------------------------------------------------------------------
# Build plan and JIT load
# ----------------------------------------------------------------------------------------------


@dataclass
class BuildPlan:
    """Everything a build needs, decided before compiling anything."""

    source_root: str
    sources: list[str]
    with_cuda: bool
    cuda_reason: str  # why CUDA sources are (not) compiled
    toolkit: CudaToolkit | None
    archs: list[str]
    isa: str
    cflags: list[str]
    cuda_cflags: list[str]
    ldflags: list[str]
    key: str


def cuda_mismatch(toolkit: CudaToolkit, torch_cuda: str) -> str:
    """Why a toolkit of another CUDA major version than torch's cannot build the CUDA kernels
    (PyTorch's own extension builder refuses the pair), and what to do."""
    major = torch_cuda.split(".")[0]
    return (
        f"the CUDA {toolkit.version} toolkit at {toolkit.home} (found by {toolkit.found_by}) "
        f"does not match this torch's CUDA {torch_cuda}: their major versions must agree, so "
        f"the CUDA kernels are not compiled (the CPU ones are); set CUDA_HOME to a CUDA {major}.x "
        f"toolkit, or install a torch built for CUDA {toolkit.version.split('.')[0]}"
    )


def plan(
    skip_cuda: bool, force_cuda: bool, arch_list: str | None, root: Path | None = None
) -> BuildPlan:
    """Decide sources and flags.

    CUDA sources are compiled when a toolkit is found, torch was built with CUDA, the build is
    not skipped (``FASTPROMPT_SKIP_CUDA_BUILD``), and a GPU is visible or
    ``FASTPROMPT_FORCE_CUDA`` asks for them anyway (a CPU-only machine building for a GPU one).
    """
    import torch

    root = root or source_root()
    if root is None:
        raise FileNotFoundError(
            "the csrc/ sources are not there (neither next to the package nor shipped in it)"
        )
    toolkit, how = find_cuda_toolkit()
    if skip_cuda:
        with_cuda, why = False, "FASTPROMPT_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        with_cuda, why = False, "this torch has no CUDA support"
    elif toolkit is None:
        with_cuda, why = False, how
    elif toolkit.version.split(".")[0] != str(torch.version.cuda).split(".")[0]:
        with_cuda, why = False, cuda_mismatch(toolkit, str(torch.version.cuda))
    elif not (force_cuda or torch.cuda.is_available()):
        with_cuda, why = False, "no GPU visible (FASTPROMPT_FORCE_CUDA=1 builds the kernels anyway)"
    else:
        with_cuda, why = True, f"CUDA {toolkit.version} toolkit at {toolkit.home} ({how})"
    archs: list[str] = []
    if with_cuda:
        try:
            archs = cuda_archs(arch_list)
        except ValueError as e:  # the CPU kernels need no architecture: build them, say why
            with_cuda, why = False, f"{e}; the CPU kernels are built without the CUDA ones"
    isa = cpu_isa()
    cflags = cxx_flags(isa)
    cuda_cflags: list[str] = []
    ldflags: list[str] = list(openmp_flags())
    srcs = list(CPU_SOURCES)
    if with_cuda:
        assert toolkit is not None
        srcs += CUDA_SOURCES
        cflags.append("-DFASTPROMPT_WITH_CUDA")
        cuda_cflags = ["-DFASTPROMPT_WITH_CUDA", *nvcc_flags(archs)]
        for lib in ("lib64", "lib"):
            if (Path(toolkit.home) / lib).is_dir():
                ldflags.append(f"-L{Path(toolkit.home) / lib}")
        ldflags.append("-lcudart")
    tag = f"cu{toolkit.version.replace('.', '')}" if with_cuda and toolkit else "cpu"
    torch_tag = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    digest = source_hash(root, [*srcs, *cflags, *cuda_cflags, *ldflags, ",".join(archs)])
    return BuildPlan(
        source_root=str(root),
        sources=srcs,
        with_cuda=with_cuda,
        cuda_reason=why,
        toolkit=toolkit,
        archs=archs,
        isa=isa,
        cflags=cflags,
        cuda_cflags=cuda_cflags,
        ldflags=ldflags,
        key=f"torch{torch_tag}-{tag}-{isa}-{digest}",
    )


class FileLock:
    """An exclusive lock across processes (POSIX ``flock``; no-op where unavailable).

    The lock file is opened here, not on entry, so that a cache that cannot be written raises
    ``OSError`` before anything is attempted.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+")  # closed by __exit__

    def __enter__(self) -> FileLock:
        try:
            import fcntl
        except ImportError:  # Windows: builds there are not guarded
            return self
        fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
        except ImportError:
            pass
        finally:
            self._file.close()


def file_lock(path: Path) -> FileLock:
    """:class:`FileLock` on ``path``; raises ``OSError`` if the lock file cannot be opened."""
    return FileLock(path)


def library_path(build_dir: Path) -> Path:
    return build_dir / f"{EXT_NAME}.so"


def file_digest(path: Path) -> dict[str, int | str]:
    """``{"size": bytes, "sha256": hex}`` of a file (what ``build.json`` records)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def check_digest(path: Path, recorded: object) -> str | None:
    """None when ``path`` has the recorded size and hash, else what is wrong with it."""
    if not isinstance(recorded, dict) or "size" not in recorded or "sha256" not in recorded:
        return f"{path} has no recorded size and hash to check it against"
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"{path} cannot be read ({e})"
    if size != recorded["size"]:
        return f"{path} is {size} bytes, but {recorded['size']} were built (truncated or replaced)"
    if file_digest(path)["sha256"] != recorded["sha256"]:
        return f"{path} does not match the SHA-256 recorded when it was built"
    return None


def cached_build(build_dir: Path) -> tuple[Path | None, str | None]:
    """A verified library in ``build_dir``.

    Returns
    -------
    library : Path or None
        The library, when present and matching its record.
    damage : str or None
        Why a library that is present cannot be used (None when it can, or when there is none).
    """
    lib = library_path(build_dir)
    record_path = build_dir / "build.json"
    if not lib.is_file() and not record_path.is_file():
        return None, None
    if not record_path.is_file():
        return None, f"{lib} has no build.json beside it (an interrupted build?)"
    if not lib.is_file():
        return None, None  # the record survived a deleted library: simply rebuild
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{record_path} is unreadable ({e})"
    damage = check_digest(lib, record.get("library"))
    return (None, damage) if damage else (lib, None)


def _discard_build(build_dir: Path) -> None:
    """Delete a damaged library and its record so the next build relinks it.

    The record goes first: a process reading the cache without the lock then sees no build
    rather than a record next to a half-written library.
    """
    (build_dir / "build.json").unlink(missing_ok=True)
    library_path(build_dir).unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _use_toolkit(toolkit: CudaToolkit | None) -> None:
    """Point torch's extension builder at the toolkit we found (it guesses from PATH otherwise)."""
    if toolkit is None:
        return
    os.environ["CUDA_HOME"] = toolkit.home
    mod = sys.modules.get("torch.utils.cpp_extension")
    if mod is not None:
        mod.CUDA_HOME = toolkit.home


def build(p: BuildPlan, cache_root: Path, verbose: bool = False) -> Path:
    """Build (or find already built) the library for plan ``p``; returns its path.

    Raises RuntimeError with the compiler's output when the build fails; the message is also
    kept in ``error.txt`` of the build directory, and later calls fail at once with it (rather
    than spend minutes failing again in every process) until that directory is deleted.
    """
    build_dir = cache_root / p.key
    lib, damage = cached_build(build_dir)
    if lib is not None:
        return lib
    try:
        lock = file_lock(cache_root / f"{p.key}.lock")
    except OSError as e:
        what = f"its build there is damaged ({damage})" if damage else "it holds no build"
        raise RuntimeError(
            f"the extension cache {cache_root} cannot be written ({e}) and {what} for this "
            "torch/CUDA/source version; point FASTPROMPT_EXT_CACHE at a writable folder"
        ) from e
    with lock:
        lib, damage = cached_build(build_dir)  # another process may have built it meanwhile
        if lib is not None:
            return lib
        if damage is not None:
            warnings.warn(
                f"fastprompt: the cached C++ extension is damaged ({damage}); rebuilding it",
                RuntimeWarning,
                stacklevel=2,
            )
            _discard_build(build_dir)
        lib = library_path(build_dir)
        error = build_dir / "error.txt"
        if error.is_file():
            raise RuntimeError(
                f"an earlier build in {build_dir} failed (delete that folder to try again): "
                + error.read_text().strip()[-2000:]
            )
        build_dir.mkdir(parents=True, exist_ok=True)
        write_config_header(build_dir, p.isa, p.archs if p.with_cuda else None)
        _use_toolkit(p.toolkit)
        import torch.utils.cpp_extension as cpp_ext

        if p.toolkit is not None:
            cpp_ext.CUDA_HOME = p.toolkit.home
        root = Path(p.source_root)
        start = time.perf_counter()
        try:
            cpp_ext.load(
                name=EXT_NAME,
                sources=[str(root / s) for s in p.sources],
                extra_cflags=p.cflags,
                extra_cuda_cflags=p.cuda_cflags,
                extra_ldflags=p.ldflags,
                extra_include_paths=[str(root), str(root / "include"), str(build_dir)],
                build_directory=str(build_dir),
                verbose=verbose,
                with_cuda=p.with_cuda,
                is_python_module=False,
            )
        except Exception as e:
            (build_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
            raise RuntimeError(f"building {EXT_NAME} failed: {e}") from e
        seconds = time.perf_counter() - start
        record = {"seconds": round(seconds, 1), "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        record.update(asdict(p))
        record["library"] = file_digest(lib)
        _write_atomic(build_dir / "build.json", json.dumps(record, indent=2))
        (build_dir / "error.txt").unlink(missing_ok=True)
        return lib


def aot_record(lib: Path) -> dict:
    """What ``setup.py`` recorded beside an ahead-of-time build (empty when unreadable)."""
    try:
        return json.loads((lib.parent / f"_{EXT_NAME}.json").read_text())
    except (OSError, ValueError):
        return {}


def aot_library() -> tuple[Path | None, str]:
    """An ahead-of-time build in the package (``setup.py build_ext``), if usable here.

    Returns the library path (or None) and, when it is not usable, why.
    """
    import torch

    here = package_dir()
    libs = sorted(here.glob(f"_{EXT_NAME}*.so")) + sorted(here.glob(f"_{EXT_NAME}*.pyd"))
    if not libs:
        return None, "no ahead-of-time build"
    meta_path = here / f"_{EXT_NAME}.json"
    if not meta_path.is_file():
        return None, f"{libs[0].name} has no {meta_path.name} beside it"
    meta = json.loads(meta_path.read_text())
    if meta.get("torch") != torch.__version__:
        built = meta.get("torch")
        return None, f"{libs[0].name} was built for torch {built}, not {torch.__version__}"
    if meta.get("isa") != cpu_isa():
        return None, f"{libs[0].name} was built for {meta.get('isa')}, this CPU runs {cpu_isa()}"
    root = source_root()
    if root is not None and meta.get("sources") != source_hash(root, []):
        return None, f"{libs[0].name} is older than the csrc/ sources"
    damage = check_digest(libs[0], meta.get("library"))
    if damage is not None:
        return None, f"the ahead-of-time build is not usable: {damage}"
    return libs[0], "ahead-of-time build"
