"""The GPU validation's CPU dry run: every step's command runs (tiny shapes), rows and the summary
are written as they come; and the GPU plan holds what issue 18 asks for, within its budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_validate  # noqa: E402


def test_the_gpu_plan_fits_its_budget(tmp_path):
    plan = gpu_validate.steps(tmp_path, dry_run=False)
    names = [s.name for s in plan]
    assert names[:5] == ["env", "precompile", "op", "model_bf16", "tests_first"]
    essential = sum(s.timeout for s in plan if s.essential)
    assert essential <= 20 * 60  # each is also cut to what is left of --budget (540 s)
    op = next(s for s in plan if s.name == "op").command
    assert {"bfloat16", "float32", "50", "200", "cuda"} <= set(op)
    assert not any(s.skip for s in plan)
    swin = next(s for s in plan if s.name == "model_swin")
    assert not swin.essential and "swin_base_patch4_window7_224" in swin.command
    # precompile builds what the op step launches: its dtypes, head dim 64
    precompile = next(s for s in plan if s.name == "precompile").command[-1]
    assert "t.precompile([torch.bfloat16, torch.float32], [64]" in precompile
    assert "timeout=150" in precompile  # inside the step's own 180 s: the report is written


def test_the_dry_run_writes_rows_and_a_summary(tmp_path):
    out = tmp_path / "validate"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_validate.py"),
            "--dry-run",
            "--out",
            str(out),
            "--steps",
            "precompile",
            "op",
            "tests_rest",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    status = {r["step"]: r["status"] for r in records}
    assert status == {"precompile": "ok", "op": "ok", "tests_rest": "skipped"}
    precompiled = json.loads((out / "precompile.json").read_text())
    assert precompiled["arch"] == 90 and precompiled["builds"] and not precompiled["timed_out"]
    rows = [json.loads(x) for x in (out / "op" / "rows.jsonl").read_text().splitlines()]
    measured = {r["impl"] for r in rows if "skipped" not in r}
    assert {"auto", "cascade", "torch", "cat_sdpa", "sdpa_floor"} <= measured
    assert all(r["err_out"] < 0.05 for r in rows if "err_out" in r)
    summary = (out / "summary.md").read_text()
    assert "| op | ok |" in summary and "x cat+SDPA" in summary
    assert (out / "environment.json").is_file()
