"""Run bad-input cases: ``python tests/badinput/runner.py WORK RESULTS [NAME ...]``.

Imports fastprompt once, builds the shared fixtures in ``WORK/fx``, forks one process per case
(:func:`harness.run_cases`) and writes ``{name: outcome}`` as JSON to ``RESULTS``. With no names,
every case runs.
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv: list[str]) -> int:
    work, results, names = argv[0], argv[1], set(argv[2:])
    t0 = time.monotonic()
    import harness
    from fixtures import build, warm

    import fastprompt.cli  # noqa: F401 - imported once here, inherited by every case

    cases = [c for c in harness.load_cases() if not names or c.name in names]
    fx = os.path.join(work, "fx")
    build(fx)
    warm()
    t1 = time.monotonic()
    out = harness.run_cases(cases, fx, os.path.join(work, "cases"))
    timing = {"setup_s": round(t1 - t0, 1), "cases_s": round(time.monotonic() - t1, 1)}
    with open(results, "w") as f:
        json.dump({"results": out, "timing": timing}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
