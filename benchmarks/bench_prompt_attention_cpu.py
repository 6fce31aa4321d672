"""prompt_attention on the CPU: the C++ extension vs the torch backend vs the fp32 reference.

ViT-B/16 shapes (B 8, H 12, N 197, d 64), P in {50, 200}, a shared prompt set (T = 1) and
per-image sets (T = B, prompt_index = arange(B)); forward (inference, no autograd) and forward +
backward (q/k/v as views of one (B, N, 3, H, d) leaf as in timm, prompt K/V leaves); fp32 and
bf16. Within every repetition the implementations run one after the other in a rotating order, so
a change in machine load hits all of them alike; figures are the median and the 20th/80th
percentiles of the repetitions, ratios are medians of the per-repetition ratios against the torch
backend of the same repetition.

    python benchmarks/bench_prompt_attention_cpu.py                 # full run (~10 min, 2 cores)
    python benchmarks/bench_prompt_attention_cpu.py --quick         # 3 reps, P 200, fp32 only
    python benchmarks/bench_prompt_attention_cpu.py --threads 1 --cpu-time   # on a busy machine

``--cpu-time`` (with one thread) times the calling thread's CPU time instead of the wall clock:
on a shared machine, time spent preempted by other processes is then not counted.

Writes ``report.json`` and ``report.md`` to
``benchmarks/results/cpu-<cores>core/prompt_attention_cpu`` (``--out`` to change). The C++
backend goes through ``fastprompt.ops.prompt_attention(...,
backend="cpp")`` once the op knows it; until then through its contract functions under an
autograd.Function equivalent to the op's (the report says which).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastprompt.kernels import cpp  # noqa: E402
from fastprompt.measure import git_commit  # noqa: E402
from fastprompt.ops import prompt_attention, prompt_attention_ref  # noqa: E402
from fastprompt.outputs import Outputs, cpu_folder, prepare_out  # noqa: E402

OUTPUTS = Outputs(
    tool="benchmarks/bench_prompt_attention_cpu.py",
    report="report.json",
    keys=frozenset({"meta", "results"}),
    others=("report.md",),
)


def _impls() -> tuple[dict[str, Callable], str]:
    def torch_backend(q, k, v, pk, pv, index):
        return prompt_attention(q, k, v, pk, pv, index, backend="torch")

    def cpp_backend(q, k, v, pk, pv, index):
        return prompt_attention(q, k, v, pk, pv, index, backend="cpp")

    def reference(q, k, v, pk, pv, index):
        return prompt_attention_ref(q, k, v, pk, pv, index)

    how = "fastprompt.ops.prompt_attention(backend='cpp')"
    return {"cpp": cpp_backend, "torch": torch_backend, "reference": reference}, how


def _inputs(b, h, n, d, t, p, dtype, grad):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(dtype).requires_grad_(grad)
    pk = torch.randn(t, h, p, d, generator=g).to(dtype).requires_grad_(grad)
    pv = torch.randn(t, h, p, d, generator=g).to(dtype).requires_grad_(grad)
    index = None if t == 1 else torch.arange(b)
    dout = torch.randn(b, h, n, d, generator=g).to(dtype)
    return qkv, pk, pv, index, dout


def _step(fn, qkv, pk, pv, index, dout, backward):
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if not backward:
        with torch.no_grad():
            fn(q, k, v, pk, pv, index)
        return
    out, _ = fn(q, k, v, pk, pv, index)
    torch.autograd.backward(out, dout)
    qkv.grad = pk.grad = pv.grad = None


def _stats(xs: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(xs, n=5) if len(xs) >= 2 else [xs[0]] * 4
    return {"median": statistics.median(xs), "p20": qs[0], "p80": qs[3]}


def run_case(impls, case, reps, warmup, clock=time.perf_counter):
    b, h, n, d, t, p, dtype, backward = case
    qkv, pk, pv, index, dout = _inputs(b, h, n, d, t, p, dtype, backward)
    names = list(impls)
    for _ in range(warmup):
        for name in names:
            _step(impls[name], qkv, pk, pv, index, dout, backward)
    times = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = clock()
            _step(impls[name], qkv, pk, pv, index, dout, backward)
            times[name].append((clock() - start) * 1e3)
    result = {name: _stats(ts) for name, ts in times.items()}
    for name in names:
        ratios = [tt / tc for tt, tc in zip(times["torch"], times[name])]
        result[name]["speedup_vs_torch"] = statistics.median(ratios)
    return result, times


def _meta(args, how) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": version("timm"),
        "triton": version("triton"),
        "commit": git_commit(ROOT),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "reps": args.reps,
        "warmup": args.warmup,
        "cpp_called_through": how,
        "cpp_build": cpp.build_info().get("build"),
        "clock": "thread CPU time" if args.cpu_time else "wall clock",
        "loadavg_start": os.getloadavg(),
    }


def _markdown(report) -> str:
    m = report["meta"]
    lines = [
        "# prompt_attention on the CPU: C++ extension vs torch backend vs reference",
        "",
        f"{m['device']}, {m['torch_threads']} torch threads; torch {m['torch']}, commit "
        f"{m['commit']}, {m['date']}; {m['reps']} interleaved repetitions, {m['clock']} "
        f"(median [p20, p80] ms); load average {m['loadavg_start'][0]:.1f} at start, "
        f"{m['loadavg_end'][0]:.1f} at end. C++ called through {m['cpp_called_through']}.",
        "",
        "| dtype | P | sets | pass | C++ ms | torch ms | reference ms | torch / C++ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        r = row["times"]

        def cell(name, r=r):
            s = r[name]
            return f"{s['median']:.1f} [{s['p20']:.1f}, {s['p80']:.1f}]"

        lines.append(
            f"| {row['dtype']} | {row['P']} | {row['sets']} | {row['pass']} | {cell('cpp')} | "
            f"{cell('torch')} | {cell('reference')} | {r['cpp']['speedup_vs_torch']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="3 reps, P 200, fp32")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time thread CPU time (needs --threads 1)"
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / cpu_folder("prompt_attention_cpu")),
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.prompts, args.dtypes = 3, 1, [200], ["float32"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and torch.get_num_threads() != 1:
        parser.error("--cpu-time measures one thread: add --threads 1")
    for name in ("reps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.warmup < 0 or any(p < 0 for p in args.prompts):
        parser.error(f"--warmup and --prompts must be >= 0, got {args.warmup}, {args.prompts}")
    problem = prepare_out(args.out, OUTPUTS)
    if problem:
        parser.error(problem)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    why = cpp.availability()
    if why is not None:
        print(why, file=sys.stderr)
        return 1
    impls, how = _impls()
    meta = _meta(args, how)
    b, h, n, d = 8, 12, 197, 64
    results = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for p in args.prompts:
            for t, sets in ((1, "shared"), (b, "per-image")):
                for backward in (False, True):
                    case = (b, h, n, d, t, p, dtype, backward)
                    stats, raw = run_case(impls, case, args.reps, args.warmup, clock)
                    row = {
                        "dtype": dtype_name,
                        "P": p,
                        "sets": sets,
                        "pass": "fwd+bwd" if backward else "fwd",
                        "shape": [b, h, n, d],
                        "times": stats,
                        "raw_ms": raw,
                    }
                    results.append(row)
                    print(
                        f"{dtype_name:8s} P{p:<3d} {sets:9s} {row['pass']:7s} "
                        f"cpp {stats['cpp']['median']:7.1f}  torch {stats['torch']['median']:7.1f}"
                        f"  ref {stats['reference']['median']:7.1f}  torch/cpp "
                        f"{stats['cpp']['speedup_vs_torch']:.2f}",
                        flush=True,
                    )
    meta["loadavg_end"] = os.getloadavg()
    report = {"meta": meta, "results": results}
    out = Path(args.out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report) + "\n")
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
