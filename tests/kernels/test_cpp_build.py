"""How the extension is found, planned and loaded: no compiler, toolkit discovery, cache keys,
ahead-of-time builds. Nothing here compiles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastprompt.kernels.cpp import _build, _toolchain

ROOT = Path(__file__).resolve().parents[2]


def _fake_toolkit(root: Path, version: str = "12.4") -> Path:
    """A directory that looks like a CUDA toolkit; its nvcc answers --version and --dryrun."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            case "$1" in
              --version) echo "Cuda compilation tools, release {version}, V{version}.1";;
              --dryrun) echo "#$ _HERE_={root}/bin" >&2;;
            esac
            """
        )
    )
    nvcc.chmod(0o755)
    return nvcc


def test_cuda_home_wins(tmp_path, monkeypatch):
    _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    toolkit, how = _build.find_cuda_toolkit()
    assert toolkit is not None and toolkit.version == "12.4" and how == "CUDA_HOME"
    assert Path(toolkit.home) == (tmp_path / "cuda").resolve()


def test_nvcc_wrapper_script_is_followed_to_its_toolkit(tmp_path, monkeypatch):
    """A PATH entry holding a wrapper (exec /opt/cuda-x/bin/nvcc) is not the toolkit root."""
    _fake_toolkit(tmp_path / "opt" / "cuda-12.4")
    bindir = tmp_path / "usr" / "bin"
    bindir.mkdir(parents=True)
    wrapper = bindir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {tmp_path}/opt/cuda-12.4/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    toolkit, how = _build.find_cuda_toolkit()
    assert toolkit is not None and "nvcc on PATH" in how
    assert Path(toolkit.home) == (tmp_path / "opt" / "cuda-12.4").resolve()


def test_no_toolkit_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_toolchain, "_is_toolkit", lambda root: False)
    toolkit, how = _build.find_cuda_toolkit()
    assert toolkit is None and "CUDA_HOME" in how and "no CUDA toolkit" in how


@pytest.mark.parametrize("variable", ["CUDA_HOME", "CUDA_PATH"])
def test_a_set_cuda_home_that_is_no_toolkit_is_not_replaced_by_another(
    tmp_path, monkeypatch, variable
):
    """CUDA_HOME at a wrong folder used to be passed over for the nvcc on PATH, silently."""
    _fake_toolkit(tmp_path / "on-path")
    monkeypatch.setenv(
        "PATH", f"{tmp_path / 'on-path' / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    )
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "cuda-12.4-typo"))
    toolkit, how = _build.find_cuda_toolkit()
    assert toolkit is None
    assert f"{variable}={tmp_path / 'cuda-12.4-typo'} is not a CUDA toolkit" in how
    assert f"point {variable} at one, or unset it" in how


def _toolkit_of(monkeypatch, tmp_path: Path, toolkit: str, torch_cuda: str) -> None:
    """A CUDA ``toolkit`` version found by CUDA_HOME, and a torch built for ``torch_cuda``."""
    import torch

    root = tmp_path / f"cuda-{toolkit}"
    _fake_toolkit(root, toolkit)
    monkeypatch.setenv("CUDA_HOME", str(root))
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_plan_honours_skip_and_force(monkeypatch, tmp_path):
    _toolkit_of(monkeypatch, tmp_path, "12.4", "12.1")
    skipped = _build.plan(skip_cuda=True, force_cuda=True, arch_list=None)
    assert not skipped.with_cuda and "FASTPROMPT_SKIP_CUDA_BUILD" in skipped.cuda_reason
    assert all(not s.endswith(".cu") for s in skipped.sources)
    assert "-cpu-" in skipped.key and skipped.isa in skipped.key
    forced = _build.plan(skip_cuda=False, force_cuda=True, arch_list="8.0;9.0+PTX")
    assert forced.with_cuda and forced.archs == ["8.0", "9.0+PTX"], forced.cuda_reason
    assert "-gencode=arch=compute_90,code=compute_90" in forced.cuda_cflags
    assert "-Xptxas" in forced.cuda_cflags and forced.key != skipped.key
    plain = _build.plan(skip_cuda=False, force_cuda=False, arch_list=None)
    assert not plain.with_cuda and "FASTPROMPT_FORCE_CUDA" in plain.cuda_reason


@pytest.mark.parametrize("arch_list", ["Hopper", "sm_90", "8.0;9"])
def test_an_arch_list_nvcc_cannot_take_is_refused_before_the_build(
    monkeypatch, tmp_path, arch_list
):
    """TORCH_CUDA_ARCH_LIST=Hopper used to become -gencode=arch=compute_Hopper, refused by nvcc
    only once a forced build had started; now the plan says why and keeps the CPU kernels."""
    _toolkit_of(monkeypatch, tmp_path, "12.4", "12.1")
    forced = _build.plan(skip_cuda=False, force_cuda=True, arch_list=arch_list)
    assert not forced.with_cuda and all(not s.endswith(".cu") for s in forced.sources)
    assert f"TORCH_CUDA_ARCH_LIST={arch_list!r}" in forced.cuda_reason
    assert 'give numbers such as "8.0;9.0"' in forced.cuda_reason


def test_a_toolkit_of_another_cuda_major_than_torchs_is_refused_with_what_to_do(
    monkeypatch, tmp_path
):
    """torch built for CUDA 12.4, nvcc 13.0 (PyTorch's own builder refuses the pair): the CPU
    kernels build, and the reason names both versions, the toolkit and the two ways out."""
    _toolkit_of(monkeypatch, tmp_path, "13.0", "12.4")
    forced = _build.plan(skip_cuda=False, force_cuda=True, arch_list=None)
    assert not forced.with_cuda and all(not s.endswith(".cu") for s in forced.sources)
    why = forced.cuda_reason
    assert (
        f"the CUDA 13.0 toolkit at {(tmp_path / 'cuda-13.0').resolve()} (found by CUDA_HOME)" in why
    )
    assert "does not match this torch's CUDA 12.4" in why and "the CPU ones are" in why
    assert "set CUDA_HOME to a CUDA 12.x toolkit, or install a torch built for CUDA 13" in why


def test_a_forced_cuda_build_that_cannot_be_made_says_why(monkeypatch, tmp_path, caplog):
    """FASTPROMPT_FORCE_CUDA=1 asked for the CUDA kernels: building without them is said, and a
    CUDA call refused by the CPU-only build gives the same reason."""
    from fastprompt.kernels import cpp

    _toolkit_of(monkeypatch, tmp_path, "13.0", "12.4")
    monkeypatch.setenv("FASTPROMPT_FORCE_CUDA", "1")
    monkeypatch.delenv("FASTPROMPT_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("FASTPROMPT_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "aot_library", lambda: (None, "no ahead-of-time build"))
    monkeypatch.setattr(_build, "find_cxx", lambda: "c++")
    monkeypatch.setattr(cpp.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(_build, "build", lambda plan, root, verbose: root / plan.key / "x.so")
    monkeypatch.setattr(cpp, "_INFO", {})
    with caplog.at_level("WARNING", logger="fastprompt"):
        cpp._locate_or_build()
    said = [r.getMessage() for r in caplog.records if "FASTPROMPT_FORCE_CUDA" in r.getMessage()]
    assert len(said) == 1 and "built without its CUDA kernels: the CUDA 13.0 toolkit" in said[0]
    assert "does not match this torch's CUDA 12.4" in cpp._INFO["cuda_reason"]


def test_a_cpu_only_build_says_why_it_refuses_cuda(monkeypatch):
    import torch

    from fastprompt.kernels import cpp

    why = cpp.availability()
    if why is not None:
        pytest.skip(f"the extension is not available here: {why}")
    if "cuda=yes" in torch.ops.fastprompt_ext.build_info():
        pytest.skip("this build has its CUDA kernels")
    monkeypatch.setitem(cpp._INFO, "cuda_reason", "the reason the plan gave")
    assert cpp.device_availability("cuda") == (
        "the extension was built without its CUDA kernels: the reason the plan gave"
    )


def test_cache_key_follows_the_sources(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "a.cpp").write_text("int a;")
    first = _build.source_hash(src, ["-O3"])
    assert _build.source_hash(src, ["-O2"]) != first
    (src / "a.cpp").write_text("int b;")
    assert _build.source_hash(src, ["-O3"]) != first


def test_setup_py_plans_the_same_build_without_importing_the_package():
    """``setup.py`` loads ``_build.py`` by path before the package can be imported; it loads the
    toolchain module beside it the same way, and plans the build the package would."""
    code = textwrap.dedent(
        """
        import importlib.abc, importlib.util, sys
        from pathlib import Path

        class NoPackage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "fastprompt":
                    raise ImportError(f"{name} was imported while setup.py runs")
                return None

        sys.meta_path.insert(0, NoPackage())
        root = Path(sys.argv[1])
        path = root / "fastprompt" / "kernels" / "cpp" / "_build.py"
        spec = importlib.util.spec_from_file_location("_fastprompt_build", path)
        build = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = build
        spec.loader.exec_module(build)
        print(build.plan(skip_cuda=True, force_cuda=False, arch_list=None, root=root / "csrc").key)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    plan = _build.plan(skip_cuda=True, force_cuda=False, arch_list=None, root=ROOT / "csrc")
    assert res.stdout.strip() == plan.key


def test_ahead_of_time_build_is_checked_before_use(tmp_path, monkeypatch):
    import torch

    sources = _build.source_root()
    monkeypatch.setattr(_build, "package_dir", lambda: tmp_path)
    monkeypatch.setattr(_build, "source_root", lambda: sources)
    assert _build.aot_library() == (None, "no ahead-of-time build")
    (tmp_path / "_fastprompt_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert "has no _fastprompt_ext.json" in _build.aot_library()[1]
    meta = {"torch": "0.0.1", "isa": _build.cpu_isa(), "sources": "x"}
    (tmp_path / "_fastprompt_ext.json").write_text(json.dumps(meta))
    assert "built for torch 0.0.1" in _build.aot_library()[1]
    meta["torch"] = torch.__version__
    (tmp_path / "_fastprompt_ext.json").write_text(json.dumps(meta))
    assert "older than the csrc/ sources" in _build.aot_library()[1]
    meta["sources"] = _build.source_hash(sources, [])
    (tmp_path / "_fastprompt_ext.json").write_text(json.dumps(meta))
    assert "no recorded size and hash" in _build.aot_library()[1]
    meta["library"] = {"size": 7, "sha256": "0" * 64}
    (tmp_path / "_fastprompt_ext.json").write_text(json.dumps(meta))
    assert "is 0 bytes, but 7 were built" in _build.aot_library()[1]
    meta["library"] = _build.file_digest(next(tmp_path.glob("_fastprompt_ext*.so")))
    (tmp_path / "_fastprompt_ext.json").write_text(json.dumps(meta))
    lib, how = _build.aot_library()
    assert lib is not None and how == "ahead-of-time build"


def test_missing_compiler_never_breaks_import(tmp_path):
    """No compiler, no cache, no AOT build: import works and the backend says why it cannot run."""
    code = textwrap.dedent(
        """
        import fastprompt
        from fastprompt.kernels import cpp
        why = cpp.availability()
        assert why is not None and "C++ compiler" in why, why
        assert cpp.build_info()["compiler"] is None
        print("ok")
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), FASTPROMPT_EXT_CACHE=str(tmp_path))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_jit_can_be_forbidden(tmp_path):
    code = (
        "from fastprompt.kernels import cpp; why = cpp.availability(); "
        "assert 'FASTPROMPT_EXT_JIT=0' in why, why"
    )
    env = dict(os.environ, FASTPROMPT_EXT_JIT="0", FASTPROMPT_EXT_CACHE=str(tmp_path))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]


def test_first_use_builds_go_under_the_cache_root_the_dispatch_cache_uses(monkeypatch, tmp_path):
    """XDG_CACHE_HOME=~/cache used to put builds in a folder literally named ~ in the working
    directory, while the dispatch cache expanded it."""
    from fastprompt import _config
    from fastprompt.kernels import cpp

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "~/cache")
    monkeypatch.delenv("FASTPROMPT_EXT_CACHE", raising=False)
    monkeypatch.delenv("FASTPROMPT_DISPATCH_CACHE", raising=False)
    assert cpp._cache_root() == tmp_path / "cache" / "fastprompt" / "ext"
    assert Path(_config.get().dispatch_cache).parent == cpp._cache_root().parent


def test_file_lock_serialises(tmp_path):
    with _build.file_lock(tmp_path / "x.lock"):
        assert (tmp_path / "x.lock").exists()


def test_a_failed_build_is_not_retried_in_every_process(tmp_path):
    plan = _build.plan(skip_cuda=True, force_cuda=False, arch_list=None)
    (tmp_path / plan.key).mkdir()
    (tmp_path / plan.key / "error.txt").write_text("RuntimeError: boom\n")
    with pytest.raises(RuntimeError, match=r"delete that folder to try again.*boom"):
        _build.build(plan, tmp_path)


# ----------------------------------------------------------------------------------------------
# The cache is verified before anything in it is loaded (each case in its own process: loading a
# damaged library would kill the process, and one process can load the library only once).
# ----------------------------------------------------------------------------------------------


def _cached_build_dir() -> Path:
    """The build folder of the library this process loaded (built on first use)."""
    from fastprompt.kernels import cpp

    why = cpp.availability()
    if why is not None:
        pytest.skip(f"the extension is not available here: {why}")
    info = cpp.build_info()
    if "first-use" not in str(info.get("how")):
        pytest.skip(f"the extension was not loaded from the first-use cache ({info.get('how')})")
    return Path(info["library"]).parent


def _copy_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A cache holding this process's build under the key a new process computes now."""
    from fastprompt import _config

    src = _cached_build_dir()
    settings = _config.get()
    key = _build.plan(settings.skip_cuda_build, settings.force_cuda, settings.cuda_arch_list).key
    cache = tmp_path / "cache"
    shutil.copytree(src, cache / key, ignore=shutil.ignore_patterns("*.o", "*.ninja*"))
    return cache, cache / key


# Stands in for the compiler (a real rebuild takes minutes): "building" copies the good library.
_FAKE_COMPILER = """
import shutil, sys
from pathlib import Path
import torch.utils.cpp_extension as cpp_extension
GOOD = sys.argv[1]
def load(name, build_directory, **kw):
    print("compiling", flush=True)
    shutil.copy(GOOD, Path(build_directory) / "fastprompt_ext.so")
cpp_extension.load = load
"""

_ATTENTION = """
import torch
from fastprompt.kernels import cpp
from fastprompt.ops import prompt_attention
q, pk = torch.randn(2, 2, 5, 8), torch.randn(1, 2, 3, 8)
out, lse = prompt_attention(q, q, q, pk, pk, backend="cpp")
assert torch.isfinite(out).all()
print("how:", cpp.build_info()["how"])
"""


def _run(code: str, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTPROMPT_EXT_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("size", [100_000, 20_000])
def test_a_truncated_cached_library_is_reported_and_rebuilt_never_loaded(tmp_path, size):
    cache, build_dir = _copy_cache(tmp_path)
    lib = build_dir / "fastprompt_ext.so"
    good = tmp_path / "good.so"
    shutil.copy(lib, good)
    with open(lib, "r+b") as f:
        f.truncate(size)
    info = _run("from fastprompt.kernels import cpp; print(cpp.build_info()['cache_state'])", cache)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "DAMAGED" in info.stdout and f"is {size} bytes" in info.stdout, info.stdout

    res = _run(_FAKE_COMPILER + _ATTENTION, cache, str(good))
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"  # SIGBUS is -7
    assert "compiling" in res.stdout and "replacing a damaged" in res.stdout, res.stdout
    assert "damaged" in res.stderr and "rebuilding" in res.stderr
    record = json.loads((build_dir / "build.json").read_text())
    assert _build.check_digest(lib, record["library"]) is None


def test_a_library_replaced_by_another_of_the_same_size_is_not_loaded(tmp_path):
    _, build_dir = _copy_cache(tmp_path)
    lib = build_dir / "fastprompt_ext.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    found, damage = _build.cached_build(build_dir)
    assert found is None and "SHA-256" in damage


def test_a_read_only_cache_with_a_valid_build_is_used(tmp_path):
    """No lock is needed to load a verified build (the lock file cannot be created there)."""
    cache, build_dir = _copy_cache(tmp_path)
    # As root, mode bits do not stop writes: make opening the lock fail as a read-only mount would.
    refuse_lock = """
import errno
from fastprompt.kernels.cpp import _build
def no_lock(path):
    raise OSError(errno.EROFS, "Read-only file system", str(path))
_build.file_lock = no_lock
"""
    for folder in (build_dir, cache):
        folder.chmod(0o555)
    try:
        res = _run(refuse_lock + _ATTENTION, cache)
    finally:
        for folder in (cache, build_dir):
            folder.chmod(0o755)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "how: cached first-use build" in res.stdout, res.stdout
    assert not list(cache.glob("*.lock"))


def test_a_read_only_cache_with_a_damaged_build_says_so(tmp_path):
    cache, build_dir = _copy_cache(tmp_path)
    with open(build_dir / "fastprompt_ext.so", "r+b") as f:
        f.truncate(20_000)
    code = """
import errno
from fastprompt.kernels.cpp import _build
def no_lock(path):
    raise OSError(errno.EROFS, "Read-only file system", str(path))
_build.file_lock = no_lock
from fastprompt.kernels import cpp
print(cpp.availability())
"""
    res = _run(code, cache)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cannot be written" in res.stdout and "is 20000 bytes" in res.stdout, res.stdout
    assert "FASTPROMPT_EXT_CACHE" in res.stdout
