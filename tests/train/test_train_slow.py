"""Slow end-to-end checks: ``--compile`` with the default (inductor) backend through the CLI, and
the digits example in its quick form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_helpers import TINY_MODEL

from fastprompt.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_compiled_cli_run(tiny_csv, tmp_path):
    args = ["train", *TINY_MODEL, "--data", str(tiny_csv), "--val", str(tiny_csv)]
    args += ["--prompts", "3", "--epochs", "2", "--batch-size", "8", "--workers", "0"]
    args += ["--compile", "--no-progress", "--quiet", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert (
        len(rows) == 2
        and json.loads((tmp_path / "run" / "run.json").read_text())["config"]["compile"]
    )


@pytest.mark.slow
def test_digits_train_example_quick(tmp_path):
    pytest.importorskip("sklearn")
    script = os.path.join(ROOT, "examples", "digits_train.py")
    out, report = str(tmp_path / "runs"), str(tmp_path / "report")
    env = {**os.environ, "PYTHONPATH": ROOT}  # this checkout's fastprompt, not an installed one
    done = subprocess.run(
        [sys.executable, script, "--quick", "--out", out, "--report", report],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "digits_train.json").read_text())
    assert report["vpt_resume"] == {
        "tensors_bitwise_equal": True,
        "metrics_equal": True,
        "epochs": 4,
    }
    for run in ("vpt", "pgn", "condensed"):
        assert 0.0 <= report[run]["final_val_acc"] <= 1.0
