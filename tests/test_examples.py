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
    total = 4 * 10  # blocks × prompts per block in the example
    for row in report["rows"]:
        for keep in (10, 30, 50):
            assert 0.0 <= row[f"acc_{keep}"] <= 1.0 and 0.0 <= row[f"acc_{keep}_ft"] <= 1.0
            assert sum(row[f"blocks_{keep}"]) == round(keep / 100 * total)
        if row["score"] not in ("random", "leave_one_out"):
            assert -1.0 <= row["spearman_vs_loo"] <= 1.0


@pytest.mark.slow
def test_digits_pgn_quick(tmp_path):
    script = os.path.join(ROOT, "examples", "digits_pgn.py")
    subprocess.run(
        [sys.executable, script, "--quick", "--shots", "10", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=ROOT,
    )
    report = json.loads((tmp_path / "digits_pgn.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert methods == ["linear probe", "IIP", "VPT-shallow", "PGN", "generator alone"]
    for row in report["rows"]:
        assert len(row["acc"]) == 1 and 0.0 <= row["mean"] <= 1.0 and row["trainable"] > 0
    spec = report["specialisation"]
    assert 0.0 <= spec["shuffled_tv_mean"] <= 1.0 and 0.0 <= spec["nearest_class_mean_acc"] <= 1.0


@pytest.mark.slow
def test_digits_domains_quick(tmp_path):
    script = os.path.join(ROOT, "examples", "digits_domains.py")
    subprocess.run(
        [sys.executable, script, "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=ROOT,
    )
    run = tmp_path / "pgn"
    report = json.loads((run / "domains.json").read_text())
    assert (run / "domains.png").stat().st_size > 0
    assert 0.0 <= report["separation"] <= 1.0
    assert set(report["samples"]) == {"upright", "rot90", "inverted"}
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    per = last["val_datasets"]
    assert sum(m["samples"] for m in per.values()) == last["val_samples"]
