"""Validate fastprompt on a lent GPU in one command that fits its time: every step under its own
timeout, in its own process group (a timeout ends the step's compilers and workers too), its rows
written as it goes, one summary table at the end.

The essential steps, in order, and their shares of the default ``--budget`` of 540 s (planned for
an H100 with 16 CPU cores; the device allows 600 s per command):

==============  =====  ==========================================================================
step            share  what
==============  =====  ==========================================================================
(setup)         ~10    ``environment.json`` (versions, capability) and ``nvidia-smi.txt``
``env``         30     ``fastprompt info``
``precompile``  130    every Triton build the op step may launch (bf16 and fp32, d 64, P 200,
                       every config the autotuner may pick on this GPU) compiled in parallel into
                       Triton's disk cache, with its own deadline of 110 s so that its report
                       (``precompile.json``) is always written; beside it the C++ extension
                       builds (or loads), so that no later step waits on a compiler
``tests_first`` 150    the GPU tests that matter first (:data:`TESTS_FIRST`): Triton's bf16
                       accuracy at d 64/80/96, determinism, grids past 65,535, every backend
                       against the reference on CUDA, a few of PyTorch's own kernels; in
                       parallel workers where pytest-xdist is installed
``op``          110    ``benchmarks/bench_op.py``: bf16 and fp32, B 64, H 12, N 197, d 64, P 200,
                       shared and per-image sets, forward and forward + backward: the automatic
                       choice, each backend, cat + SDPA and SDPA on pre-concatenated K/V
                       (:data:`OP_IMPLS`), each with its error against the fp32 reference and
                       peak memory
``model_bf16``  90     ``fastprompt bench --device cuda`` on ViT-B/16 with 200 prompts in bf16:
                       inference and a training step against the prompt-free model and naive VPT
==============  =====  ==========================================================================

The shares sum to 510 s; with the setup, 20 s of the 540 are left as margin. A step's timeout is
its share, or more when earlier steps ended early (what is left less the shares of the essential
steps still to come), never more than what is left: every essential step gets at least its share
unless an earlier one ran past its own. A missing tool skips its step and says so; a failing step
never stops the next. While time remains after them: the rest of the GPU tests (``tests_rest``),
Swin-B with 50 deep prompts in bf16 (``model_swin``), the fp32 model benchmark (``model_fp32``).
The full op matrix (P 50 too, Triton's default config, each SDPA kernel forced) is
``benchmarks/bench_op.py --device cuda`` run on its own.

Everything lands in ``OUT`` (default ``benchmarks/results/<device>/validate``): ``steps.jsonl``
(one line per step as it ends), each step's log, the op rows (``op/rows.jsonl``), each model
step's rows as they are measured (``model_*/rows.jsonl``) and its report, the tests' JUnit XML,
and ``summary.md`` (a model step cut by its timeout is summarised from its rows). ``OUT`` follows
the rule of every measuring tool's ``--out`` (:func:`fastprompt.outputs.prepare_out`): before the
first step, an earlier run's files there (this script's, and its op and model steps' in their
folders) are removed, so that a rerun, also one with other ``--steps``, shows only its own; a
person's files of those names are left alone and the run is refused, naming them. ``--dry-run``
runs the same steps on the CPU with tiny shapes in seconds (CI runs it).

    benchmarks/gpu_validate.sh [OUT]          # the same as python benchmarks/gpu_validate.py --out
    python benchmarks/gpu_validate.py --dry-run --out /tmp/validate
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLI = [PY, "-c", "import sys; from fastprompt.cli import main; sys.exit(main(sys.argv[1:]))"]

BUDGET = 540  # seconds, the default --budget
SETUP = 10  # seconds, about: environment.json and nvidia-smi, before the first step
MIN_STEP = 10  # seconds: a step given less than this is skipped ("no time left")
PRECOMPILE_DEADLINE = 110  # seconds: precompile's own, inside its share (130)

# The op step's implementations: what users get, each backend, and the naive way.
OP_IMPLS = ("auto", "cascade", "torch", "cpp", "triton", "cat_sdpa", "sdpa_floor")

# The GPU tests that matter first (pytest -k over the gpu-marked tests): the Triton kernels'
# bf16 accuracy at the head dims the models use, determinism, grids past CUDA's 65,535 cap, every
# backend against the reference on CUDA, and a sample of the adapters on PyTorch's own kernels
# (bf16, two cases: the rest come with tests_rest).
TESTS_FIRST = " or ".join(
    [
        "(test_half_precision and bf16 and (64 or 80 or 96))",
        "deterministic",
        "test_more_than_65535_sequence_heads",
        "test_large_grids",
        "(test_matches_the_reference and cuda)",
        "(test_each_pytorch_kernel_on_the_gpu and bf16 and (shared or indexed))",
    ]
)


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: float  # its share of the budget, in seconds
    needs: tuple[str, ...] = ()  # modules that must be importable
    essential: bool = True  # run before the "while time remains" steps
    skip: str = ""  # why it does not run at all (a dry run)

    def why_not(self) -> str | None:
        """Why it does not run (a dry run's skip, a missing module), else None."""
        missing = [m for m in self.needs if importlib.util.find_spec(m) is None]
        return self.skip or (f"{', '.join(missing)} not installed" if missing else None)


def step_timeout(step: Step, left: float, later: list[Step]) -> float:
    """Seconds ``step`` may run with ``left`` seconds of the budget left and ``later`` steps to
    come: an essential step its share, or what is left less the later essential steps' shares if
    that is more (time an earlier step did not use); never more than what is left."""
    if not step.essential:
        return min(step.timeout, left)
    reserved = sum(s.timeout for s in later if s.essential and s.why_not() is None)
    return min(left, max(step.timeout, left - reserved))


def _precompile_code(out: Path, dry_run: bool) -> str:
    """The precompile step: every Triton build the op step's bf16 and fp32 calls (d 64, P 200) may
    launch, for this GPU, with its own deadline inside the step's so that its report
    (``precompile.json``) is always written; beside it, in another process, the C++ extension
    builds or loads (the tests and the op step use it; a build takes a minute or more). A dry run
    compiles one small kernel ahead of time for sm_90, which checks the same code path without a
    GPU."""
    if dry_run:
        args = (
            "[torch.bfloat16], [64], [Shape(batch=2, heads=2, n=16, p=4)], arch=90, "
            "roles=('reduce',), jobs=1, timeout=120"
        )
    else:
        args = (
            "[torch.bfloat16, torch.float32], [64], "
            "[Shape(p=200), Shape(p=200, sets=64, indexed=True)], "
            f"timeout={PRECOMPILE_DEADLINE}"
        )
    cpp = (
        "from fastprompt.kernels import cpp; why = cpp.availability(); "
        "print('C++ extension:', why or 'loaded', flush=True); raise SystemExit(1 if why else 0)"
    )
    return (
        "import json, subprocess, sys, torch\n"
        f"ext = subprocess.Popen([sys.executable, '-c', {cpp!r}])\n"
        "from fastprompt.kernels import triton as t\n"
        "from fastprompt.kernels.triton._precompile import Shape\n"
        f"r = t.precompile({args})\n"
        f"open({str(out / 'precompile.json')!r}, 'w').write(json.dumps(r.as_dict(), indent=1))\n"
        "print(r.summary(), flush=True)\n"
        "sys.exit(1 if r.failures or ext.wait() else 0)\n"
    )


def _pytest(out: Path, name: str, selection: str, parallel: bool) -> list[str]:
    """pytest over the gpu-marked tests, its JUnit XML in OUT; in parallel workers (compiling
    kernels is most of the time) and under a per-test timeout where the plugins are installed."""
    cmd = [PY, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    if parallel and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "120"]
    return [*cmd, f"--junitxml={out / f'{name}.xml'}", "-k", selection, "tests"]


def steps(out: Path, dry_run: bool) -> list[Step]:
    """What runs, in order (the essential steps first)."""
    device = "cpu" if dry_run else "cuda"
    if dry_run:
        op_args = ["--tiny", "--dtypes", "bfloat16", "float32"]
        model = [
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--batch",
            "2",
            "--prompts",
            "4",
            "--reps",
            "1",
            "--no-memory",
        ]
    else:
        op_args = ["--dtypes", "bfloat16", "float32", "--prompts", "200"]
        model = ["--model", "vit_base_patch16_224", "--prompts", "200"]
    swin = ["--model", "swin_base_patch4_window7_224", "--prompts", "50"]

    def bench(dtype: str, args: list[str], name: str) -> list[str]:
        """``fastprompt bench`` on the device, without FLOP counts, its report in OUT/name."""
        common = ["--device", device, "--dtype", dtype, "--no-flops"]
        return [*CLI, "bench", *common, *args, "--out", str(out / name)]

    op = [PY, str(ROOT / "benchmarks" / "bench_op.py"), "--device", device, *op_args]
    op += ["--impls", *OP_IMPLS, "--out", str(out / "op")]
    # A dry run checks every command line once and skips what only repeats one on a GPU.
    again = "dry run: the same command as an earlier step" if dry_run else ""
    return [
        Step("env", [*CLI, "info"], 30),
        Step("precompile", [PY, "-c", _precompile_code(out, dry_run)], 130, needs=("triton",)),
        Step(
            "tests_first",
            _pytest(out, "tests_first", TESTS_FIRST, parallel=True),
            150,
            needs=("pytest",),
        ),
        Step("op", op, 110),
        Step("model_bf16", bench("bfloat16", model, "model_bf16"), 90),
        Step(
            "tests_rest",
            _pytest(out, "tests_rest", f"not ({TESTS_FIRST})", parallel=True),
            420,
            needs=("pytest",),
            essential=False,
            skip=again,
        ),
        Step(
            "model_swin",
            bench("bfloat16", swin, "model_swin"),
            240,
            essential=False,
            skip="dry run: model_bf16's command with another model" if dry_run else "",
        ),
        Step("model_fp32", bench("float32", model, "model_fp32"), 240, essential=False, skip=again),
    ]


# The folders of the steps that run another measuring tool with its own --out.
SUBFOLDERS = {"op": "bench_op", "model_bf16": "bench", "model_swin": "bench", "model_fp32": "bench"}


def outputs():
    """What this script writes into OUT itself (:class:`fastprompt.outputs.Outputs`): its steps'
    rows recognise an earlier run's folder, or its ``environment.json`` one cut short before the
    first step ended."""
    from fastprompt.outputs import Outputs

    names = [s.name for s in steps(Path("."), dry_run=False)]
    return Outputs(
        tool="benchmarks/gpu_validate.py",
        report="environment.json",
        keys=frozenset({"device", "torch", "commit"}),
        more=None,
        rows="steps.jsonl",
        row_keys=frozenset({"step", "command", "status"}),
        others=(
            "summary.md",
            "nvidia-smi.txt",
            "precompile.json",
            *(f"{n}.log" for n in names),
            *(f"{n}.xml" for n in names if n.startswith("tests_")),
        ),
    )


def _subfolder_outputs(tool: str):
    """The Outputs of the tool a step runs (``bench_op`` or ``fastprompt bench``)."""
    if tool == "bench":
        from fastprompt.cli.bench_checks import BENCH_OUTPUTS

        return BENCH_OUTPUTS
    spec = importlib.util.spec_from_file_location(tool, ROOT / "benchmarks" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OUTPUTS


def prepare(out: Path) -> str | None:
    """Make OUT ready before anything runs (the rule every ``--out`` follows), or say why not: an
    earlier run's files go, in OUT and in its steps' folders, whichever steps this run takes;
    every folder is checked before anything is removed."""
    from fastprompt.outputs import prepare_out, refusal

    folders = [(str(out), outputs())]
    folders += [
        (str(out / name), _subfolder_outputs(tool))
        for name, tool in SUBFOLDERS.items()
        if (out / name).is_dir()
    ]
    for folder, what in folders:
        problem = refusal(folder, what)
        if problem:
            return problem
    for folder, what in folders:
        problem = prepare_out(folder, what)
        if problem:
            return problem
    for folder, _ in folders[1:]:
        with contextlib.suppress(OSError):  # a step's folder left empty: its step makes it
            os.rmdir(folder)
    return None


def _environment(out: Path, dry_run: bool) -> None:
    import torch

    from fastprompt.bench import environment

    device = torch.device("cpu" if dry_run else "cuda")
    env = environment(device)
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["device_count"] = torch.cuda.device_count()
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)


def _end_group(proc: subprocess.Popen) -> None:
    """End everything left in the step's process group (its workers, compilers): asked to stop,
    a few seconds for the step itself to go, then killed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # nothing left in the group
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def _run_step(step: Step, out: Path, timeout: float, env: dict) -> dict:
    """Run one step for at most ``timeout`` seconds, in its own process group (session), its
    output in OUT/<name>.log; nothing it started outlives it."""
    record = {"step": step.name, "command": " ".join(step.command)}
    log = out / f"{step.name}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            step.command,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
        finally:
            _end_group(proc)
    seconds = round(time.monotonic() - start, 1)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {**record, "status": status, "seconds": seconds, "log": log.name, "last": tail[0]}


def _op_table(rows_file: Path) -> list[str]:
    rows = [json.loads(x) for x in rows_file.read_text().splitlines() if x.strip()]
    lines = ["", "## op: the automatic choice and each backend against cat + SDPA", ""]
    lines += ["speed: cat + SDPA's time over the row's (above 1: the row is faster).", ""]
    lines += ["| dtype | P | sets | mode | impl | ms | speed vs cat+SDPA | err out |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r or r["impl"] not in ("auto", "cascade", "torch", "triton", "cpp"):
            continue
        ratio = r.get("speed_vs_cat_sdpa")
        lines.append(
            f"| {r['dtype']} | {r['prompts']} | {r['sets']} | {r['mode']} | {r['impl']} "
            f"| {r['ms_median']:.3f} | {'' if ratio is None else f'{ratio:.2f}'} "
            f"| {r.get('err_out', float('nan')):.2e} |"
        )
    return lines


def _model_rows_table(rows_file: Path) -> list[str]:
    """The rows a model step finished before its timeout (``fastprompt bench``'s rows.jsonl)."""
    rows = [json.loads(x) for x in rows_file.read_text().splitlines() if x.strip()]
    lines = [f"cut short: the {len(rows)} rows it finished (rows.jsonl)", ""]
    lines += ["| prompts | variant | infer ms | infer vs naive | train ms | train vs naive "]
    lines[-1] += "| train vs free | peak MiB |"
    lines += ["|---|---|---|---|---|---|---|---|"]

    def ms(r: dict, kind: str) -> str:
        return f"{1e3 * r[kind]['median_s']:.2f}" if kind in r else "-"

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.3f}" if r.get(key) is not None else "-"

    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "-"
        lines.append(
            f"| {r['prompts']} | {r['variant']} | {ms(r, 'infer')} | "
            f"{ratio(r, 'infer_vs_naive')} | {ms(r, 'train')} | {ratio(r, 'train_vs_naive')} | "
            f"{ratio(r, 'train_vs_free')} | {peak} |"
        )
    return lines


def _test_counts(xml: Path) -> str:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as e:
        return f"no readable report ({type(e).__name__})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    passed = total["tests"] - total["failures"] - total["errors"] - skipped
    return (
        f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {skipped} skipped"
    )


def summary(out: Path, records: list[dict], wall: float) -> str:
    """The table at the end: steps, the tests' counts, then the op's headline ratios, the
    models' (from a step's rows where its timeout cut it before its report)."""
    lines = ["# GPU validation summary", "", f"wall time {wall:.0f} s", ""]
    lines += ["| step | status | seconds | last line |", "|---|---|---|---|"]
    # Only the files of steps that ran in this run: what else OUT holds is not this run's.
    ran = {r["step"] for r in records if r["status"] != "skipped"}
    for r in records:
        last = str(r.get("last", r.get("why", ""))).replace("|", "/")[:120]
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '')} | {last} |")
    for name in ("tests_first", "tests_rest"):
        if name in ran and (out / f"{name}.xml").is_file():
            lines += ["", f"{name}: {_test_counts(out / f'{name}.xml')}"]
    if "op" in ran and (out / "op" / "rows.jsonl").is_file():
        lines += _op_table(out / "op" / "rows.jsonl")
    status = {r["step"]: r["status"] for r in records}
    for name in sorted(
        ran & {"model_bf16", "model_swin", "model_fp32"}, key=list(SUBFOLDERS).index
    ):
        report, rows = out / name / "report.md", out / name / "rows.jsonl"
        cut = status.get(name, "").startswith("timed out")  # a report there is an older run's
        if rows.is_file() and (cut or not report.is_file()):
            lines += ["", f"## {name}", "", *_model_rows_table(rows)]
        elif report.is_file():
            lines += ["", f"## {name}", "", report.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="default benchmarks/results/<device>/validate")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for all steps")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (CI)")
    parser.add_argument("--steps", nargs="+", default=None, help="only these steps")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_validate: no CUDA device visible to torch (--dry-run runs on the CPU)")
        return 1
    known = [s.name for s in steps(Path(args.out or "."), args.dry_run)]
    unknown = [name for name in args.steps or [] if name not in known]
    if unknown:
        parser.error(f"--steps takes {', '.join(known)}; got {', '.join(unknown)}")
    if args.out is None:
        device = "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name(0)
        args.out = str(ROOT / "benchmarks" / "results" / device.replace(" ", "_") / "validate")
    out = Path(args.out).resolve()
    problem = prepare(out)
    if problem:
        parser.error(problem)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if not args.dry_run:
        env.pop("TRITON_INTERPRET", None)
    begin = time.monotonic()
    _environment(out, args.dry_run)
    plan = [s for s in steps(out, args.dry_run) if args.steps is None or s.name in args.steps]
    plan.sort(key=lambda s: not s.essential)
    records = []
    for i, step in enumerate(plan):
        record = {"step": step.name, "command": " ".join(step.command)}
        why = step.why_not()
        timeout = step_timeout(step, args.budget - (time.monotonic() - begin), plan[i + 1 :])
        if why is None and timeout < MIN_STEP:
            why = "no time left"
        if why is not None:
            record.update(status="skipped", why=why)
        else:
            record = _run_step(step, out, timeout, env)
        records.append(record)
        with open(out / "steps.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"gpu_validate: {step.name}: {record['status']} ({record.get('seconds', 0)} s)",
            flush=True,
        )
    wall = time.monotonic() - begin
    text = summary(out, records, wall)
    (out / "summary.md").write_text(text)
    print(text)
    bad = [r["step"] for r in records if r["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
