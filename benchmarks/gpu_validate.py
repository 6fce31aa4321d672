"""Validate fastprompt on a lent GPU in one command that fits its time: every step under its own
timeout, its rows written as it goes, one summary table at the end.

Steps, in order (each a subprocess; a step's timeout is cut to what is left of ``--budget``; a
missing tool skips its step and says so; a failing step never stops the next):

1. ``env``: ``fastprompt info``, versions, ``nvidia-smi``;
2. ``precompile``: every Triton build the op step may launch (bf16 and fp32, d 64, every config
   the autotuner may pick on this GPU) compiled in parallel into Triton's disk cache
   (``fastprompt.kernels.triton.precompile``), so later steps do not wait on the compiler; its
   report in ``precompile.json``;
3. ``op``: ``benchmarks/bench_op.py``: bf16 and fp32, B 64, H 12, N 197, d 64, P 50 and 200,
   shared and per-image sets, forward and forward + backward: the automatic choice, every
   backend, Triton's default config, cat + SDPA (default, flash, efficient, cuDNN) and SDPA on
   pre-concatenated K/V, each with its error against the fp32 reference and peak memory;
4. ``model``: ``fastprompt bench --device cuda`` on ViT-B/16 with 200 prompts in bf16: inference
   and a training step against the prompt-free model and naive VPT;
5. ``tests``: the GPU tests that matter first (bf16 at d 64/80/96, determinism, large grids);
6. while time remains: the rest of the GPU tests, Swin-B with 50 deep prompts in bf16 (issue 20's
   first GPU figures), the fp32 model benchmark.

Everything lands in ``OUT`` (default ``benchmarks/results/<device>/validate``): ``steps.jsonl``
(one line per step as it ends), each step's log, the op rows (``op/rows.jsonl``), the model
report, the test report, and ``summary.md``. ``--dry-run`` runs the same steps on the CPU with tiny
shapes in seconds (CI runs it).

    benchmarks/gpu_validate.sh [OUT]          # the same as python benchmarks/gpu_validate.py --out
    python benchmarks/gpu_validate.py --dry-run --out /tmp/validate
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLI = [PY, "-c", "import sys; from fastprompt.cli import main; sys.exit(main(sys.argv[1:]))"]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: float
    needs: tuple[str, ...] = ()  # modules that must be importable
    essential: bool = True  # run before the "while time remains" steps
    skip: str = ""  # why it does not run at all (a dry run)


def _gpu_tests_first() -> str:
    return (
        "(bf16 and (64 or 80 or 96)) or deterministic or large_grids"
        " or test_matches_the_reference or test_each_pytorch_kernel_on_the_gpu"
    )


def _precompile_code(out: Path, dry_run: bool) -> str:
    """The precompile step: every Triton build the op step's bf16 and fp32 calls (d 64, the
    validation's shapes) may launch, for this GPU, with its own deadline inside the step's so that
    its report (``precompile.json``) is always written. A dry run compiles one small kernel ahead
    of time for sm_90, which checks the same code path without a GPU."""
    if dry_run:
        args = (
            "[torch.bfloat16], [64], [Shape(batch=2, heads=2, n=16, p=4)], arch=90, "
            "roles=('reduce',), jobs=1, timeout=120"
        )
    else:
        args = "[torch.bfloat16, torch.float32], [64], timeout=150"
    return (
        "import json, sys, torch\n"
        "from fastprompt.kernels import triton as t\n"
        "from fastprompt.kernels.triton._precompile import Shape\n"
        f"r = t.precompile({args})\n"
        f"open({str(out / 'precompile.json')!r}, 'w').write(json.dumps(r.as_dict(), indent=1))\n"
        "print(r.summary()); sys.exit(1 if r.failures else 0)\n"
    )


def steps(out: Path, dry_run: bool) -> list[Step]:
    """What runs, in order."""
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
        op_args = ["--dtypes", "bfloat16", "float32", "--prompts", "50", "200"]
        model = ["--model", "vit_base_patch16_224", "--prompts", "200"]
    pytest_gpu = [PY, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    swin = ["--model", "swin_base_patch4_window7_224", "--prompts", "50"]

    def bench(dtype: str, args: list[str], name: str) -> list[str]:
        """``fastprompt bench`` on the device, without FLOP counts, its report in OUT/name."""
        common = ["--device", device, "--dtype", dtype, "--no-flops"]
        return [*CLI, "bench", *common, *args, "--out", str(out / name)]

    # A dry run checks every command line once and skips what only repeats one on a GPU.
    again = "dry run: the same command as an earlier step" if dry_run else ""
    return [
        Step("env", [*CLI, "info"], 90),
        Step("precompile", [PY, "-c", _precompile_code(out, dry_run)], 180, needs=("triton",)),
        Step(
            "op",
            [
                PY,
                str(ROOT / "benchmarks" / "bench_op.py"),
                "--device",
                device,
                *op_args,
                "--out",
                str(out / "op"),
            ],
            300,
        ),
        Step("model_bf16", bench("bfloat16", model, "model_bf16"), 240),
        Step(
            "tests_first",
            [
                *pytest_gpu,
                f"--junitxml={out / 'tests_first.xml'}",
                "-k",
                _gpu_tests_first(),
                "tests/ops/test_conformance.py",
                "tests/kernels",
            ],
            240,
            needs=("pytest",),
        ),
        Step(
            "tests_rest",
            [
                *pytest_gpu,
                f"--junitxml={out / 'tests_rest.xml'}",
                "-k",
                f"not ({_gpu_tests_first()})",
                "tests",
            ],
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


def _run_step(step: Step, out: Path, left: float, env: dict) -> dict:
    missing = [m for m in step.needs if importlib.util.find_spec(m) is None]
    record = {"step": step.name, "command": " ".join(step.command)}
    if step.skip:
        return {**record, "status": "skipped", "why": step.skip}
    if missing:
        return {**record, "status": "skipped", "why": f"{', '.join(missing)} not installed"}
    timeout = min(step.timeout, left)
    if timeout < 10:
        return {**record, "status": "skipped", "why": "no time left"}
    log = out / f"{step.name}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                step.command,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                env=env,
            )
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    seconds = round(time.monotonic() - start, 1)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {**record, "status": status, "seconds": seconds, "log": log.name, "last": tail[0]}


def summary(out: Path, records: list[dict], wall: float) -> str:
    """The table at the end: steps, then the op's headline ratios, the model's, the tests'."""
    lines = ["# GPU validation summary", "", f"wall time {wall:.0f} s", ""]
    lines += ["| step | status | seconds | last line |", "|---|---|---|---|"]
    for r in records:
        last = str(r.get("last", r.get("why", ""))).replace("|", "/")[:120]
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '')} | {last} |")
    rows_file = out / "op" / "rows.jsonl"
    if rows_file.is_file():
        rows = [json.loads(x) for x in rows_file.read_text().splitlines() if x.strip()]
        lines += ["", "## op: the automatic choice and each backend against cat + SDPA", ""]
        lines += ["| dtype | P | sets | mode | impl | ms | x cat+SDPA | err out |"]
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
    for name in ("model_bf16", "model_swin", "model_fp32"):
        report = out / name / "report.md"
        if report.is_file():
            lines += ["", f"## {name}", "", report.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="default benchmarks/results/<device>/validate")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all steps")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (CI)")
    parser.add_argument("--steps", nargs="+", default=None, help="only these steps")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_validate: no CUDA device visible to torch (--dry-run runs on the CPU)")
        return 1
    if args.out is None:
        device = "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name(0)
        args.out = str(ROOT / "benchmarks" / "results" / device.replace(" ", "_") / "validate")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if not args.dry_run:
        env.pop("TRITON_INTERPRET", None)
    begin = time.monotonic()
    _environment(out, args.dry_run)
    plan = [s for s in steps(out, args.dry_run) if args.steps is None or s.name in args.steps]
    records = []
    for step in sorted(plan, key=lambda s: not s.essential):
        left = args.budget - (time.monotonic() - begin)
        record = _run_step(step, out, left, env)
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
