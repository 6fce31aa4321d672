"""Registers, spills and stack of every CUDA kernel per architecture (nvcc ``-Xptxas -v``).

Needs only the CUDA toolkit (no GPU, no torch build of the extension): the kernel files are compiled
one architecture at a time with the extension's own nvcc flags. Optionally also times the full
extension builds (``--full-build``: CPU-only, and CPU + CUDA for the listed archs), which is what a
first use or ``setup.py build_ext`` costs on this machine.

    python benchmarks/cuda_ptxas_report.py                       # sm_80 and sm_90
    python benchmarks/cuda_ptxas_report.py --archs 8.0 9.0 --full-build

Writes ``cuda_ptxas.md`` and ``cuda_ptxas.json`` under ``benchmarks/results/static/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastprompt.kernels.cpp import _build, _ptxas  # noqa: E402
from fastprompt.measure import git_commit  # noqa: E402
from fastprompt.outputs import Outputs, prepare_out  # noqa: E402

OUTPUTS = Outputs(
    tool="benchmarks/cuda_ptxas_report.py",
    report="cuda_ptxas.json",
    keys=frozenset({"nvcc", "kernels"}),
    more=None,
    others=("cuda_ptxas.md",),
)


def _full_builds(archs: list[str]) -> dict[str, float]:
    """Seconds for a clean CPU-only build and a clean CPU + CUDA build of the extension.

    Each runs in its own process: a build loads its library, and one process can hold only one.
    """
    script = (
        "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from fastprompt.kernels.cpp import _build as b;"
        "p = b.plan(skip_cuda=sys.argv[2] == '1', force_cuda=True, arch_list=sys.argv[3]);"
        "t = time.perf_counter(); b.build(p, Path(sys.argv[4]));"
        "print(round(time.perf_counter() - t, 1))"
    )
    times = {}
    for label, skip in (("cpu_only", "1"), ("cpu_and_cuda", "0")):
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run(
                [sys.executable, "-c", script, str(ROOT), skip, ";".join(archs), tmp],
                capture_output=True,
                text=True,
                check=True,
            )
        times[label] = float(res.stdout.strip().splitlines()[-1])
        print(f"full build {label}: {times[label]} s", file=sys.stderr)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(_build.DEFAULT_CUDA_ARCHS))
    parser.add_argument("--full-build", action="store_true", help="also time whole builds")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "static"))
    args = parser.parse_args(argv)

    toolkit, how = _build.find_cuda_toolkit()
    if toolkit is None:
        print(f"no CUDA toolkit: {how}", file=sys.stderr)
        return 1
    problem = prepare_out(args.out, OUTPUTS)
    if problem:
        parser.error(problem)
    import torch

    rows, seconds = [], {}
    for arch in args.archs:
        usage, secs = _ptxas.compile_usage(arch, toolkit)
        rows += _ptxas.as_dicts(usage)
        seconds[arch] = secs
        print(f"sm_{arch.replace('.', '')}: {len(usage)} kernels, {secs}", file=sys.stderr)
    report = {
        "nvcc": toolkit.version,
        "toolkit": toolkit.home,
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "commit": git_commit(ROOT),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "nvcc_flags": _build.nvcc_flags(["<arch>"]),
        "register_budget": _ptxas.REGISTER_BUDGET,
        "compile_seconds": seconds,
        "kernels": rows,
    }
    if args.full_build:
        report["full_build_seconds"] = _full_builds(args.archs)
    out = Path(args.out)
    (out / "cuda_ptxas.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "cuda_ptxas.md").write_text(_markdown(report) + "\n")
    print(f"wrote {out / 'cuda_ptxas.md'} and cuda_ptxas.json")
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack_bytes"]]
    return 1 if bad else 0


def _markdown(report: dict) -> str:
    lines = [
        "# CUDA kernels: registers, spills, shared memory (ptxas -v)",
        "",
        f"nvcc {report['nvcc']}, torch {report['torch']}, commit {report['commit']}, "
        f"{report['date']}, {report['cpu_count']}-core host `{report['host']}`. "
        f"Flags: `{' '.join(report['nvcc_flags'])}`.",
        "",
        "The cascade's own kernels (the attention itself runs on PyTorch's fused kernels): "
        "blocks of 256 threads, grid-stride loops on grid axis x; the first template argument "
        "is the dtype, the merge's second the elements per vector load (16 bytes, or 1 where "
        "the memory is not aligned for it). No shared memory. Register budget "
        f"{report['register_budget']} per thread (4 blocks, 32 warps per SM); no kernel may "
        "spill.",
        "",
    ]
    archs = sorted({r["arch"] for r in report["kernels"]})
    kernels = list(dict.fromkeys((r["file"], r["kernel"]) for r in report["kernels"]))
    by_key = {(r["file"], r["kernel"], r["arch"]): r for r in report["kernels"]}
    head = "| file | kernel | " + " | ".join(f"regs {a} | spill {a}" for a in archs)
    lines += [head + " |"]
    lines += ["|" + "---|" * (2 + 2 * len(archs))]
    for file, kernel in kernels:
        cells = []
        for a in archs:
            r = by_key.get((file, kernel, a))
            if r is None:
                cells += ["-", "-"]
            else:
                spill = r["spill_stores"] + r["spill_loads"] + r["stack_bytes"]
                cells += [str(r["registers"]), str(spill)]
        lines.append(f"| {file} | `{kernel}` | " + " | ".join(cells) + " |")
    lines += ["", "Compile seconds per file and arch (nvcc, one job):", ""]
    for arch, secs in report["compile_seconds"].items():
        files = ", ".join(f"{k} {v}" for k, v in secs.items())
        lines.append(f"- sm_{arch.replace('.', '')}: {files}")
    if "full_build_seconds" in report:
        fb = report["full_build_seconds"]
        lines += [
            "",
            f"Whole extension, clean build with ninja on this host: CPU only {fb['cpu_only']} s; "
            f"CPU + CUDA ({', '.join(report['compile_seconds'])}) {fb['cpu_and_cuda']} s.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
