"""How the extension is found, planned and loaded: no compiler, toolkit discovery, cache keys,
ahead-of-time builds. Nothing here compiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastprompt.kernels.cpp import _build

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
    monkeypatch.setattr(_build, "_is_toolkit", lambda root: False)
    toolkit, how = _build.find_cuda_toolkit()
    assert toolkit is None and "CUDA_HOME" in how and "no CUDA toolkit" in how


def test_plan_honours_skip_and_force(monkeypatch):
    skipped = _build.plan(skip_cuda=True, force_cuda=True, arch_list=None)
    assert not skipped.with_cuda and "FASTPROMPT_SKIP_CUDA_BUILD" in skipped.cuda_reason
    assert all(not s.endswith(".cu") for s in skipped.sources)
    assert "-cpu-" in skipped.key and skipped.isa in skipped.key
    toolkit, _ = _build.find_cuda_toolkit()
    import torch

    if toolkit is None or torch.version.cuda is None:
        pytest.skip("needs a CUDA toolkit and a CUDA build of torch")
    forced = _build.plan(skip_cuda=False, force_cuda=True, arch_list="8.0;9.0+PTX")
    assert forced.with_cuda and forced.archs == ["8.0", "9.0+PTX"]
    assert "-gencode=arch=compute_90,code=compute_90" in forced.cuda_cflags
    assert "-Xptxas" in forced.cuda_cflags and forced.key != skipped.key
    if not torch.cuda.is_available():
        plain = _build.plan(skip_cuda=False, force_cuda=False, arch_list=None)
        assert not plain.with_cuda and "FASTPROMPT_FORCE_CUDA" in plain.cuda_reason


def test_cache_key_follows_the_sources(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "a.cpp").write_text("int a;")
    first = _build.source_hash(src, ["-O3"])
    assert _build.source_hash(src, ["-O2"]) != first
    (src / "a.cpp").write_text("int b;")
    assert _build.source_hash(src, ["-O3"]) != first


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


def test_file_lock_serialises(tmp_path):
    with _build.file_lock(tmp_path / "x.lock"):
        assert (tmp_path / "x.lock").exists()


def test_a_failed_build_is_not_retried_in_every_process(tmp_path):
    plan = _build.plan(skip_cuda=True, force_cuda=False, arch_list=None)
    (tmp_path / plan.key).mkdir()
    (tmp_path / plan.key / "error.txt").write_text("RuntimeError: boom\n")
    with pytest.raises(RuntimeError, match=r"delete that folder to try again.*boom"):
        _build.build(plan, tmp_path)
