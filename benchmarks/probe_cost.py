"""What the backends' self-check (``fastprompt.backends.probe``) costs on a device.

Runs each available backend's probe for the given dtypes and head dims twice: the first run
includes compiling and autotuning what the probe launches, the second only the probe itself.

    python benchmarks/probe_cost.py [--device cuda] [--dtypes bfloat16 float16 float32]
        [--head-dims 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from fastprompt.backends import BACKENDS, Call, probe
from fastprompt.bench import environment
from fastprompt.cli.train_checks import check_device
from fastprompt.outputs import Outputs, prepare_out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["bfloat16", "float16", "float32"],
        choices=["bfloat16", "float16", "float32", "float64"],
    )
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    problem = check_device(args.device)
    if not problem and any(d < 1 for d in args.head_dims):
        problem = f"--head-dims must be >= 1, got {args.head_dims}"
    if not problem and args.out:
        # A name ending in a separator is a folder too, also one not made yet.
        if os.path.isdir(args.out) or not os.path.basename(args.out):
            problem = f"--out {args.out} is a folder; it names the JSON file to write"
        else:
            # The file's folder, under the rule every benchmark's --out follows.
            outputs = Outputs(
                tool="benchmarks/probe_cost.py",
                report=os.path.basename(args.out),
                keys=frozenset({"device", "rows"}),
                more=frozenset({"env"}),
            )
            problem = prepare_out(os.path.dirname(args.out) or ".", outputs)
    if problem:
        parser.error(problem)
    device = torch.device(args.device)
    rows = []
    for backend in BACKENDS:
        for name in args.dtypes:
            dtype = getattr(torch, name)
            for d in args.head_dims:
                call = Call(device, dtype, d)
                if backend.not_supported_reasons(call):
                    continue
                times = []
                for _ in range(2):
                    _sync(device)
                    start = time.perf_counter()
                    result = probe.run(backend, call)
                    _sync(device)
                    times.append(time.perf_counter() - start)
                row = {"backend": backend.name, "dtype": name, "head_dim": d, "ok": result.ok}
                row |= {"first_s": times[0], "again_s": times[1], "detail": result.detail}
                rows.append(row)
                print(
                    f"{backend.name:8s} {name:9s} d{d:<4d} first {times[0]:7.3f} s, "
                    f"again {times[1]:7.3f} s  {'ok' if result.ok else 'FAILED'}: {result.detail}",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": str(device), "env": environment(device), "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
