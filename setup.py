"""Optional ahead-of-time build of the ``csrc/`` extension; metadata lives in pyproject.toml.

``pip install -e .`` stays pure Python (the extension then compiles on first use, see
``fastprompt/kernels/cpp/_build.py``). To compile it now instead::

    FASTPROMPT_BUILD_EXT=1 pip install -e . --no-build-isolation   # torch must be importable
    python setup.py build_ext --inplace

Knobs: ``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0"; default: the visible GPUs', else 8.0 and 9.0),
``MAX_JOBS`` (parallel compile jobs, read by torch's ninja build), ``FASTPROMPT_SKIP_CUDA_BUILD=1``
(CPU kernels only), ``FASTPROMPT_FORCE_CUDA=1`` (compile the CUDA kernels without a visible GPU).

This file runs before the package is importable: it loads ``fastprompt/_config.py`` by path to
read its switches as the package does (a value that is no switch is refused).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EXT = "fastprompt.kernels.cpp._fastprompt_ext"


def _load(relative: str, name: str):
    """A module of the package by path (stdlib + torch only; no package import)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _load_build_module():
    """fastprompt/kernels/cpp/_build.py by path."""
    return _load("fastprompt/kernels/cpp/_build.py", "_fastprompt_build")


def _flag(name: str) -> bool:
    """A ``FASTPROMPT_*`` switch, read as the package reads it (a bad value is refused)."""
    return _load("fastprompt/_config.py", "_fastprompt_config").flag(name)


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (``fastprompt/kernels/cpp/_csrc``) so that an installed,
    non-editable copy can still compile the extension on first use."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        dst = Path(self.build_lib) / "fastprompt" / "kernels" / "cpp" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst)


def _extension_kwargs() -> dict:
    build = _load_build_module()
    plan = build.plan(
        skip_cuda=_flag("FASTPROMPT_SKIP_CUDA_BUILD"),
        force_cuda=_flag("FASTPROMPT_FORCE_CUDA"),
        arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST") or None,
        root=ROOT / "csrc",
    )
    if plan.toolkit is not None:
        os.environ["CUDA_HOME"] = plan.toolkit.home  # before torch guesses it from PATH
    from torch.utils import cpp_extension

    if plan.toolkit is not None:
        cpp_extension.CUDA_HOME = plan.toolkit.home
    config_dir = ROOT / "build" / "fastprompt_config"
    config_dir.mkdir(parents=True, exist_ok=True)
    build.write_config_header(config_dir, plan.isa, plan.archs if plan.with_cuda else None)
    sources = [str(Path("csrc") / s) for s in plan.sources]
    includes = [str(ROOT / "csrc"), str(ROOT / "csrc" / "include"), str(config_dir)]
    library_dirs = [flag[2:] for flag in plan.ldflags if flag.startswith("-L")]
    kind = cpp_extension.CUDAExtension if plan.with_cuda else cpp_extension.CppExtension
    ext = kind(
        EXT,
        sources,
        include_dirs=includes,
        library_dirs=library_dirs,
        extra_compile_args={"cxx": plan.cflags, "nvcc": plan.cuda_cflags},
        extra_link_args=[flag for flag in plan.ldflags if not flag.startswith("-L")],
    )
    print(f"fastprompt: building {EXT} ({plan.isa}; CUDA: {plan.cuda_reason})", file=sys.stderr)

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            start = time.perf_counter()
            super().run()
            import torch

            meta = {
                "torch": torch.__version__,
                "isa": plan.isa,
                "with_cuda": plan.with_cuda,
                "cuda_reason": plan.cuda_reason,
                "archs": plan.archs,
                "sources": build.source_hash(ROOT / "csrc", []),
                "seconds": round(time.perf_counter() - start, 1),
            }
            lib = Path(self.get_ext_fullpath(EXT))
            meta["library"] = build.file_digest(lib)  # checked before every load
            lib.with_name("_fastprompt_ext.json").write_text(json.dumps(meta, indent=2))
            print(f"fastprompt: built {lib.name} in {meta['seconds']} s", file=sys.stderr)

    commands = {"build_ext": BuildExt, "build_py": BuildPyWithSources}
    return {"ext_modules": [ext], "cmdclass": commands}


def _wants_extension() -> bool:
    return _flag("FASTPROMPT_BUILD_EXT") or any(arg.startswith("build_ext") for arg in sys.argv)


if _wants_extension():
    setup(**_extension_kwargs())
else:
    setup(cmdclass={"build_py": BuildPyWithSources})
