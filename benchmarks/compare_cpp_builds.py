"""Two builds of the C++ extension's CPU kernels, side by side: forward and backward times at
Swin-B's window shapes and a ViT-B/16 shape, one thread, in CPU time.

Two libraries registering the same operator namespace cannot share a process, so each
measurement is a fresh process that loads one library (``torch.ops.load_library``) and times
``fastprompt_ext::prompt_attention_fwd/bwd`` directly; the builds alternate, ``--rounds`` times
each. One thread and process CPU time keep out what this 2-core VM's wall clock adds (the other
core's load, scheduling); page faults still count, as they are part of the kernels' cost. A
build's library is ``fastprompt_ext.so`` in its cache folder (``fastprompt info`` names the
current one) or the output of ``setup.py``.

    python benchmarks/compare_cpp_builds.py OLD.so NEW.so --out benchmarks/results/cpu-2core/x
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastprompt.outputs import Outputs, prepare_out  # noqa: E402

OUTPUTS = Outputs(
    tool="benchmarks/compare_cpp_builds.py",
    # The environment and commit, as every script records them (results before it have none).
    report="report.json",
    keys=frozenset({"env", "old", "new"}),
    more=frozenset({"rounds", "reps"}),
    rows="rows.jsonl",
    row_keys=frozenset({"build"}),
    others=("report.md",),
)

# (name, sequences B, heads H, tokens N, head dim d, prompts P, a per-sequence key bias):
# Swin-B's stage-0 and stage-2 windows at batch 8, and ViT-B/16 at batch 2 with 200 prompts.
SHAPES = (
    ("swin-stage0", 512, 4, 49, 32, 50, True),
    ("swin-stage2", 32, 16, 49, 32, 50, True),
    ("vit-b16-p200", 2, 12, 197, 64, 200, False),
)

_CHILD = """
import json, statistics, sys, time, torch
torch.ops.load_library(sys.argv[1])
torch.set_num_threads(1)
ops = torch.ops.fastprompt_ext
reps, out = int(sys.argv[2]), {}
for name, b, h, n, d, p, biased in json.loads(sys.argv[3]):
    torch.manual_seed(0)
    q, k, v = torch.randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    pk, pv = torch.randn(1, h, p, d), torch.randn(1, h, p, d)
    bias, scale = torch.randn(b, h, n, n) if biased else None, d ** -0.5
    o, lse = ops.prompt_attention_fwd(q, k, v, pk, pv, None, None, scale, bias)
    dout = torch.randn_like(o)
    calls = {
        "fwd": lambda: ops.prompt_attention_fwd(q, k, v, pk, pv, None, None, scale, bias),
        "bwd": lambda: ops.prompt_attention_bwd(
            dout, q, k, v, pk, pv, None, None, o, lse, scale, None, None, bias
        ),
    }
    for mode, fn in calls.items():
        fn()
        times = []
        for _ in range(reps):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        out[f"{name} {mode}"] = statistics.median(times) * 1e3
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path, help="the baseline build's library")
    ap.add_argument("new", type=Path, help="the build under test")
    ap.add_argument("--rounds", type=int, default=3, help="processes per build, alternating")
    ap.add_argument("--reps", type=int, default=15, help="timed calls per process (median)")
    ap.add_argument("--out", type=Path, help="folder for rows.jsonl, report.md and report.json")
    args = ap.parse_args(argv)
    for which in ("old", "new"):
        lib = getattr(args, which)
        if not lib.is_file():
            ap.error(f"{which}: no library at {lib} (a build's fastprompt_ext.so)")
    if args.rounds < 1 or args.reps < 1:
        ap.error(f"--rounds and --reps must be >= 1, got {args.rounds}, {args.reps}")
    problem = args.out and prepare_out(str(args.out), OUTPUTS)
    if problem:
        ap.error(problem)
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for which in ("old", "new"):
            lib = str(getattr(args, which))
            cmd = [sys.executable, "-c", _CHILD, lib, str(args.reps), json.dumps(SHAPES)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"{which} ({lib}) failed:\n{result.stderr.strip()}")
            runs[which].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(which, runs[which][-1], flush=True)
    import torch

    from fastprompt.bench import environment

    env = environment(torch.device("cpu"))
    lines = [
        f"CPU kernels, two builds: old {args.old}, new {args.new}; one thread, process CPU time, "
        f"median of {args.reps} calls per process, {args.rounds} processes per build "
        f"(alternating); the range is over processes. torch {env['torch']}, fastprompt "
        f"{env['fastprompt']}, commit "
        f"{env['commit']}, {env['date']}.",
        "",
        "| shape | mode | old ms | new ms | new / old |",
        "|---|---|---|---|---|",
    ]
    for key in runs["old"][0]:
        old = [r[key] for r in runs["old"]]
        new = [r[key] for r in runs["new"]]
        ratio = statistics.median(new) / statistics.median(old)
        shape, mode = key.split()
        lines.append(
            f"| {shape} | {mode} | {min(old):.2f}–{max(old):.2f} | {min(new):.2f}–{max(new):.2f} "
            f"| {ratio:.3f} |"
        )
    print("\n".join(lines))
    if args.out:
        with open(args.out / "rows.jsonl", "w") as f:
            for which, rows in runs.items():
                for row in rows:
                    f.write(json.dumps({"build": which, **row}) + "\n")
        (args.out / "report.md").write_text("\n".join(lines) + "\n")
        report = {"env": env, "old": str(args.old), "new": str(args.new)}
        report |= {"rounds": args.rounds, "reps": args.reps}
        (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
