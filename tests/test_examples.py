"""The digits example runs end to end (a few epochs) and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_digits_condensation_quick(tmp_path):
    script = os.path.join(ROOT, "examples", "digits_condensation.py")
    subprocess.run(
        [sys.executable, script, "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "digits_condensation.json").read_text())
    scores = [r["score"] for r in report["rows"]]
    assert scores == ["taylor", "taylor_normed", "gate", "cls_sim", "random", "leave_one_out"]
    assert report["rows"][-1]["spearman_vs_loo"] == pytest.approx(1.0)
