"""The bad-input harness as pytest tests: one test per case, all cases run by one runner
process that forks a process per case (see harness.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import load_cases  # noqa: E402

CASES = {c.name: c for c in load_cases()}


@pytest.fixture(scope="session")
def outcomes(request, tmp_path_factory):
    """Run the selected cases (those pytest will run) in one runner process."""
    chosen = sorted(
        {
            item.callspec.params["name"]
            for item in request.session.items
            if getattr(item, "originalname", None) == "test_bad_input"
        }
    )
    work = tmp_path_factory.mktemp("badinput")
    results = work / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(HERE))])}
    env.setdefault("TRITON_INTERPRET", "1")
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "runner.py"), str(work), str(results), *chosen],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(results.read_text())["results"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(outcomes, name):
    out = outcomes[name]
    assert out["ok"], f"{name}: {out['why']}\nerror: {out['error']}\n{out.get('details', '')}"
