"""The GPU validation's CPU dry run: every step's command runs (tiny shapes), rows and the summary
are written as they come; and the GPU plan holds what issue 18 asks for, within its budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_validate  # noqa: E402

from fastprompt.backends import NAMES as BACKENDS  # noqa: E402

ESSENTIAL = ["env", "precompile", "tests_first", "op", "model_bf16"]


def test_the_gpu_plan_fits_its_budget(tmp_path):
    """The correctness tests come right after the precompile, before the benchmarks, and every
    essential step gets its share of the default budget, also when each uses all of it."""
    plan = gpu_validate.steps(tmp_path, dry_run=False)
    assert [s.name for s in plan if s.essential] == ESSENTIAL
    essential = [s for s in plan if s.essential]
    shares = {s.name: s.timeout for s in essential}
    assert sum(shares.values()) + gpu_validate.SETUP <= gpu_validate.BUDGET - 15  # a margin
    assert min(shares.values()) >= 30 and shares["tests_first"] >= 120
    for used in ("all", "little"):  # each step runs to its timeout, or ends in 5 s
        left = gpu_validate.BUDGET - gpu_validate.SETUP
        for i, step in enumerate(essential):
            timeout = gpu_validate.step_timeout(step, left, essential[i + 1 :])
            assert timeout >= step.timeout, (used, step.name, timeout)
            left -= timeout if used == "all" else 5
        assert left >= 0
    rest = [s for s in plan if not s.essential]
    assert gpu_validate.step_timeout(rest[0], 50, rest[1:]) == 50  # cut to what is left
    op = next(s for s in plan if s.name == "op").command
    assert {"bfloat16", "float32", "200", "cuda", "auto", "cat_sdpa"} <= set(op)
    assert "50" not in op and "triton_default" not in op  # trimmed to fit
    assert not any(s.skip for s in plan)
    swin = next(s for s in plan if s.name == "model_swin")
    assert not swin.essential and "swin_base_patch4_window7_224" in swin.command
    # precompile builds what the op step launches (its dtypes, head dim 64, P 200) and the C++
    # extension, within a deadline inside its share, so that its report is written
    code = next(s for s in plan if s.name == "precompile").command[-1]
    assert "t.precompile([torch.bfloat16, torch.float32], [64]" in code and "p=200" in code
    assert f"timeout={gpu_validate.PRECOMPILE_DEADLINE}" in code and "cpp.availability()" in code
    assert gpu_validate.PRECOMPILE_DEADLINE <= shares["precompile"] - 15


def test_tests_first_selects_what_matters_first(tmp_path):
    """Collected with its own selection (the gpu tests are collected here, then skipped): Triton's
    bf16 accuracy at d 64/80/96, determinism, grids past 65,535, the reference conformance on
    CUDA; PyTorch's own kernels do not take most of its time."""
    step = next(s for s in gpu_validate.steps(tmp_path, dry_run=False) if s.name == "tests_first")
    assert step.command[step.command.index("-k") :] == ["-k", gpu_validate.TESTS_FIRST, "tests"]
    k = ["-m", "gpu", "-k", gpu_validate.TESTS_FIRST, "tests"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *k],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    selected = {line.strip() for line in result.stdout.splitlines() if "::" in line}
    triton = "tests/kernels/test_triton_gpu.py::"
    conformance = "tests/ops/test_conformance.py::"
    expected = {
        *(f"{triton}test_half_precision_within_pytorchs_own_error[{d}-bf16]" for d in (64, 80, 96)),
        f"{triton}test_bitwise_deterministic_also_across_autotuner_caches",
        f"{triton}test_more_than_65535_sequence_heads",
        f"{conformance}test_backward_is_deterministic_on_the_gpu[triton]",
        f"{conformance}test_large_grids_on_the_gpu[triton-batch]",
        f"{conformance}test_half_precision_on_the_gpu[triton-96-bf16]",
        *(f"{conformance}test_matches_the_reference[{b}-indexed-lengths-cuda]" for b in BACKENDS),
    }
    assert expected <= selected, sorted(expected - selected)
    assert not [t for t in selected if "fp16" in t or t.endswith("-cpu]")]
    pytorchs = [t for t in selected if "test_each_pytorch_kernel_on_the_gpu" in t]
    assert 0 < len(pytorchs) <= len(selected) // 4, (len(pytorchs), len(selected))


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
            "tests_first",
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
    assert status == {"precompile": "ok", "tests_first": "ok", "op": "ok", "tests_rest": "skipped"}
    precompiled = json.loads((out / "precompile.json").read_text())
    assert precompiled["arch"] == 90 and precompiled["builds"] and not precompiled["timed_out"]
    rows = [json.loads(x) for x in (out / "op" / "rows.jsonl").read_text().splitlines()]
    measured = {r["impl"] for r in rows if "skipped" not in r}
    assert {"auto", "cascade", "torch", "cat_sdpa", "sdpa_floor"} <= measured
    assert all(r["err_out"] < 0.05 for r in rows if "err_out" in r)
    summary = (out / "summary.md").read_text()
    assert "| op | ok |" in summary and "| speed vs cat+SDPA |" in summary
    # The ratio's direction is said: bench's own ratios are times, this one a speed.
    assert "cat + SDPA's time over the row's (above 1: the row is faster)" in summary
    assert "tests_first: 0 passed, 0 failed, 0 errors, " in summary  # on a CPU all skip
    assert (out / "environment.json").is_file()


def _alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped by whoever adopted it, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("ends", ["timed out", "exits"])
def test_nothing_a_step_started_outlives_it(tmp_path, ends):
    """A step's workers and compilers (here a sleeping grandchild) end with it: at its timeout,
    and when it exits leaving them behind."""
    pidfile = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(g.pid))\n"
        f"time.sleep({120 if ends == 'timed out' else 0})\n"
    )
    step = gpu_validate.Step("fake", [sys.executable, "-c", code], 5)
    record = gpu_validate._run_step(step, tmp_path, 5, dict(os.environ))
    pid = int(pidfile.read_text())
    try:
        assert record["status"] == ("timed out after 5 s" if ends == "timed out" else "ok")
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the step's grandchild outlived it"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_model_step_cut_by_its_timeout_is_summarised_from_its_rows(tmp_path):
    rows = [
        {"prompts": 200, "variant": "naive", "infer": {"median_s": 0.02}, "infer_vs_naive": 1.0},
        {"prompts": 200, "variant": "fused", "infer": {"median_s": 0.01}, "infer_vs_naive": 0.5},
    ]
    (tmp_path / "model_bf16").mkdir()
    (tmp_path / "model_bf16" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "model_bf16" / "report.md").write_text("an earlier run's report")
    record = {"step": "model_bf16", "status": "timed out after 90 s", "seconds": 90.0}
    text = gpu_validate.summary(tmp_path, [record], 100)
    assert "an earlier run's report" not in text
    assert "## model_bf16" in text and "the 2 rows it finished" in text
    assert "| 200 | fused | 10.00 | 0.500 | - |" in text


def _earlier_run(out: Path) -> None:
    """What a run with tests_first and op left in OUT (their records, log, XML and rows)."""
    (out / "op").mkdir(parents=True)
    record = {"step": "tests_first", "command": "pytest", "status": "ok", "seconds": 1.0}
    (out / "steps.jsonl").write_text(json.dumps(record) + "\n")
    (out / "tests_first.log").write_text("1 passed\n")
    (out / "tests_first.xml").write_text('<testsuite tests="7" failures="0" errors="0"/>')
    row = {"dtype": "float32", "prompts": 4, "sets": 1, "mode": "fwd", "impl": "auto"}
    (out / "op" / "rows.jsonl").write_text(json.dumps({**row, "ms_median": 1.0}) + "\n")


def test_a_rerun_into_the_same_folder_shows_only_its_own_steps(tmp_path, capsys):
    """steps.jsonl was appended to (two runs' records in one file), and a rerun with other
    --steps put the earlier run's test counts and op rows into its summary as its own."""
    out = tmp_path / "validate"
    _earlier_run(out)
    (out / "notes.md").write_text("kept")  # another name: not the script's to remove
    assert gpu_validate.main(["--dry-run", "--out", str(out), "--steps", "env"]) == 0
    records = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == ["env"]
    summary = (out / "summary.md").read_text()
    assert "tests_first" not in summary and "## op" not in summary
    assert not (out / "tests_first.xml").exists() and not (out / "tests_first.log").exists()
    assert not (out / "op").exists()  # emptied, and removed
    assert (out / "notes.md").read_text() == "kept" and (out / "env.log").is_file()


@pytest.mark.parametrize("where", ["summary.md", "op/report.md"])
def test_a_persons_files_in_the_folder_are_refused_before_any_step(where, tmp_path, capsys):
    """A summary.md in a folder no run wrote was replaced; op/report.md, a person's beside an
    earlier run's files (which are kept too: every folder is checked before any is cleaned)."""
    out = tmp_path / "validate"
    _earlier_run(out)
    # The rows there would say the folder is the tool's own.
    (out / ("steps.jsonl" if where == "summary.md" else "op/rows.jsonl")).unlink()
    (out / where).write_text("my notes")
    with pytest.raises(SystemExit) as e:
        gpu_validate.main(["--dry-run", "--out", str(out), "--steps", "env"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert Path(where).name in err and "did not write; choose another --out" in err
    assert (out / where).read_text() == "my notes"
    assert not (out / "environment.json").exists()
    assert (out / "tests_first.xml").exists()
