"""Static GPU report of the Triton kernels: compiled for sm_80 (A100) and sm_90 (H100), no GPU.

Every kernel of a forward + backward, every autotuning config, fp16 and bf16, head dims
32/64/80/96/128, each also with the Prompt Condensation score epilogue (dK/dV) and, in bf16, with
indexed sets and lengths (plus fp32 at d = 64 through TF32 / 3xTF32 for information), compiled
with Triton's own compiler from the launchers' real plans (see
``fastprompt/kernels/triton/_aot.py``). Records registers, spill bytes, shared memory against the
target's limit, wgmma vs mma.sync instruction counts and theoretical warps per SM; marks which
configs the autotuner may pick (the pruner's verdict).

    python benchmarks/static_report.py [--jobs 2] [--out benchmarks/results/static]

``--subset`` compiles only the riskiest admissible config of each tuned kernel (what the test
runs) and prints JSON rows on stdout.
"""

from __future__ import annotations

import os

# Interpreted kernels cannot be compiled: this process must see real jit functions.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from fastprompt.kernels.triton._capability import AUTO_HEAD_DIMS
from fastprompt.outputs import Outputs, prepare_out

OUTPUTS = Outputs(
    tool="benchmarks/static_report.py",
    report="static_report.json",
    keys=frozenset({"env", "rows"}),
    others=("static_report.md",),
)

ARCHS = (80, 90)
DTYPES = ("float16", "bfloat16")
DIMS = AUTO_HEAD_DIMS  # every head dim chosen automatically
# Variant: (plan keywords, kernels it changes; None: all). The score epilogue is compile-time
# code of the dK/dV kernel only.
VARIANTS = {
    "": ({}, None),
    "indexed+lengths": ({"t": 3, "indexed": True, "lengths": True}, None),
    "scores": ({"scores": 2}, ("dkdv",)),
}


def jobs(quick: bool = False) -> list[tuple]:
    """(arch, dtype, d, variant, fp32 precision) for the full report: every head dim in fp16 and
    bf16, indexed sets with lengths in bf16 and the score epilogue in both (the variants the
    pruner's spill table covers), and fp32 at d = 64 for information."""
    out = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for d in DIMS if not quick else (64, 128):
                out.append((arch, dtype, d, "", None))
                if dtype == "bfloat16":
                    out.append((arch, dtype, d, "indexed+lengths", None))
                out.append((arch, dtype, d, "scores", None))
        for precision in ("highest", "high"):  # tf32x3, tf32
            out.append((arch, "float32", 64, "", precision))
    return out


def run_job(job: tuple) -> list[dict]:
    from fastprompt.kernels.triton import _aot

    arch, dtype, d, variant, precision = job
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    name = variant or ("tf32x3" if precision == "highest" else "tf32" if precision else "")
    kw, roles = VARIANTS[variant]
    rows = _aot.compile_plan(arch, getattr(torch, dtype), d, variant=name, roles=roles, **kw)
    return [r.as_dict() for r in rows]


def riskiest(d: int, wgmma: bool):
    """Selector of the admissible config with the largest register estimate, and the first."""
    from fastprompt.kernels.triton import _tuning

    def select(role, every, ok):
        worst = max(ok, key=lambda c: _tuning.fp32_per_thread(role, c, d, wgmma))
        return list(dict.fromkeys([ok[0], worst]))

    return select


def subset() -> list[dict]:
    """What the static test compiles: the default and the riskiest admissible config of each
    tuned kernel at d = 128 bf16 on both targets (dK/dV with the score epilogue too), and the
    default at d = 80 fp16 (the two-chunk head dim) on sm_90."""
    from fastprompt.kernels.triton import _aot

    rows = []
    tuned = ("fwd", "dkdv", "dq")
    for arch in ARCHS:
        select = riskiest(128, arch >= 90)
        rows += _aot.compile_plan(arch, torch.bfloat16, 128, select=select, roles=tuned)
        rows += _aot.compile_plan(
            arch, torch.bfloat16, 128, "scores", select=select, roles=("dkdv",), scores=2
        )
    rows += _aot.compile_plan(
        90, torch.float16, 80, select=lambda role, every, ok: ok[:1], roles=tuned
    )
    return [r.as_dict() for r in rows]


def summary(rows: list[dict]) -> list[str]:
    """Worst admitted fp16/bf16 figures per kernel and target."""
    lines = [
        "| kernel | target | configs admitted per head dim | max regs | max spill B "
        "| max smem KB (limit) | min warps/SM | admitted builds using wgmma |",
        "|---|---|---|---|---|---|---|---|",
    ]
    half = [r for r in rows if r["dtype"] in DTYPES]
    for kernel in ("fwd", "dkdv", "dq", "preprocess", "reduce"):
        for arch in ARCHS:
            sel = [r for r in half if r["kernel"] == kernel and r["arch"] == arch]
            ok = [r for r in sel if r["admissible"]]
            if not ok:
                continue
            per_d = []
            for d in DIMS:
                cfgs = {_cfg(r) for r in ok if r["d"] == d}
                listed = {_cfg(r) for r in sel if r["d"] == d}
                per_d.append(f"d{d}: {len(cfgs)}/{len(listed)}")
            if kernel not in ("fwd", "dkdv", "dq"):
                wgmma = "no dot"
            elif arch < 90:
                wgmma = "n/a (sm_80)"
            else:
                wgmma = f"{sum(r['wgmma'] > 0 for r in ok)} of {len(ok)}"
            lines.append(
                f"| {kernel} | sm_{arch} | {', '.join(per_d)} "
                f"| {max(r['regs'] for r in ok)} | {max(r['spill_bytes'] for r in ok)} "
                f"| {max(r['smem'] for r in ok) / 1024:.0f} ({ok[0]['smem_limit'] // 1024}) "
                f"| {min(r['warps_per_sm'] for r in ok)} | {wgmma} |"
            )
    return lines


def _cfg(r: dict) -> tuple:
    return r["block_m"], r["block_n"], r["warps"], r["stages"]


def defaults(rows: list[dict]) -> list[str]:
    """The config each tuned kernel runs untuned (deterministic mode), bf16, per target and d."""
    from fastprompt.kernels.triton import _tuning

    lines = [
        "| kernel | target | d | BLOCK_M×N, warps, stages | regs | spill B | smem KB | wgmma "
        "| warps/SM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kernel in ("fwd", "dkdv", "dq"):
        for arch in ARCHS:
            for d in DIMS:
                first = _tuning.admissible(
                    kernel, _tuning.CONFIGS[kernel], d, 2, arch, _tuning.SMEM_LIMIT[arch]
                )[0]
                match = [
                    r
                    for r in rows
                    if r["kernel"] == kernel
                    and r["arch"] == arch
                    and r["d"] == d
                    and r["dtype"] == "bfloat16"
                    and r["variant"] == ""
                    and _cfg(r) == tuple(first)
                ]
                if not match:
                    continue
                r = match[0]
                wg = "n/a" if arch < 90 else ("yes" if r["wgmma"] else "no")
                lines.append(
                    f"| {kernel} | sm_{arch} | {d} | {r['block_m']}×{r['block_n']}, {r['warps']}, "
                    f"{r['stages']} | {r['regs']} | {r['spill_bytes']} | {r['smem'] / 1024:.0f} "
                    f"| {wg} | {r['warps_per_sm']} |"
                )
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| target | kernel | dtype | d | variant | BLOCK_M×N | warps | stages | regs | spill B "
        "| smem KB | est KB | wgmma | mma.sync | warps/SM | admitted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        est = "" if r["smem_estimate"] is None else f"{r['smem_estimate'] / 1024:.0f}"
        bn = "" if r["block_n"] is None else f"×{r['block_n']}"
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['d']} | {r['variant']} "
            f"| {r['block_m'] or ''}{bn} | {r['warps']} | {r['stages'] or ''} | {r['regs']} "
            f"| {r['spill_bytes']} | {r['smem'] / 1024:.1f} | {est} | {r['wgmma']} "
            f"| {r['mma_sync']} | {r['warps_per_sm']} | {'yes' if r['admissible'] else 'no'} |"
        )
    return lines


def relabel(rows: list[dict]) -> list[dict]:
    """Mark each build admissible or not by the current pruner (no compiling)."""
    from fastprompt.kernels.triton import _tuning

    for r in rows:
        if r["kernel"] in _tuning.CONFIGS:
            elt = 4 if r["dtype"] == "float32" else 2
            cfg = _tuning.Cfg(r["block_m"], r["block_n"], r["warps"], r["stages"])
            limit = _tuning.SMEM_LIMIT[r["arch"]]
            every = _tuning.CONFIGS[r["kernel"]]
            r["admissible"] = cfg in _tuning.admissible(
                r["kernel"], every, r["d"], elt, r["arch"], limit
            )
            r["smem_estimate"] = _tuning.smem_estimate(r["kernel"], cfg, r["d"], elt)
    return rows


def suggest(rows: list[dict]) -> str:
    """SPILL_FREE_UP_TO as the report supports it: per family, kernel and config, the largest head
    dim up to which every fp16/bf16 build (every variant) compiled without spills."""
    from fastprompt.kernels.triton import _tuning

    table: dict = {}
    for arch in ARCHS:
        fam = _tuning.family(arch)
        for role, configs in _tuning.CONFIGS.items():
            for cfg in configs:
                ok_up_to = 0
                for d in sorted(DIMS):
                    sel = [
                        r
                        for r in rows
                        if r["arch"] == arch
                        and r["kernel"] == role
                        and r["d"] == d
                        and r["dtype"] in DTYPES
                        and (r["block_m"], r["block_n"], r["warps"], r["stages"]) == tuple(cfg)
                    ]
                    if not sel or any(r["spill_bytes"] for r in sel):
                        break
                    ok_up_to = d
                if ok_up_to:
                    table.setdefault(fam, {}).setdefault(role, {})[cfg] = ok_up_to
    lines = ["SPILL_FREE_UP_TO = {"]
    for fam, roles in table.items():
        lines.append(f'    "{fam}": {{')
        for role, cfgs in roles.items():
            lines.append(f'        "{role}": {{')
            lines += [f"            {c!r}: {d}," for c, d in cfgs.items()]
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


def _fp32_note(rows: list[dict]) -> list[str]:
    lines = []
    for variant in ("tf32x3", "tf32"):
        for arch in ARCHS:
            sel = [r for r in rows if r["variant"] == variant and r["arch"] == arch]
            sel = [r for r in sel if r["kernel"] in ("fwd", "dkdv", "dq")]
            if sel:
                spill = sum(r["spill_bytes"] > 0 for r in sel)
                lines.append(f"{variant} on sm_{arch}: {spill} of {len(sel)} builds spill")
    if not lines:
        return []
    return [
        "fp32 (d = 64, for information: fp32 is not chosen automatically; when asked for, it "
        "runs as 3xTF32, or TF32 where torch allows it): " + "; ".join(lines) + ".",
        "",
    ]


def write(rows: list[dict], env: dict, out: str) -> None:
    with open(os.path.join(out, "static_report.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    head = [
        "# Static GPU report of the Triton kernels (compiled, never run)",
        "",
        f"Triton {env['triton']}, torch {env['torch']}, commit {env['commit']}, {env['date']}; "
        f"kernel sources {env['source_hash']}; {env['compile_seconds']} s of compiling"
        + (f" ({env['compile_note']})" if env.get("compile_note") else "")
        + ". Targets "
        "sm_80 (A100: 163 KB shared memory per block) and sm_90 (H100: 227 KB). Spill B = stack "
        "frame + local memory per thread (0 = no spills); warps/SM = theoretical residency from "
        "registers and shared memory; wgmma / mma.sync = instruction counts in the PTX; "
        "admitted = the autotuner may pick it on that target (the pruner's verdict). "
        "Regenerate: `python benchmarks/static_report.py`.",
        "",
        *_fp32_note(rows),
        "## Worst admitted fp16/bf16 build per kernel and target",
        "",
        *summary(rows),
        "",
        "## Default config (first admitted: the choice without timing, e.g. in deterministic "
        "mode), bf16",
        "",
        *defaults(rows),
        "",
        "## Every build",
        "",
        *table(rows),
    ]
    with open(os.path.join(out, "static_report.md"), "w") as f:
        f.write("\n".join(head) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "static"))
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
    parser.add_argument("--quick", action="store_true", help="d 64 and 128 only")
    parser.add_argument("--subset", action="store_true", help="the test's subset, JSON on stdout")
    parser.add_argument(
        "--relabel", action="store_true", help="re-mark admissibility in an existing report"
    )
    parser.add_argument(
        "--suggest", action="store_true", help="print SPILL_FREE_UP_TO from an existing report"
    )
    args = parser.parse_args()
    path = os.path.join(args.out, "static_report.json")
    if args.relabel or args.suggest:
        with open(path) as f:
            report = json.load(f)
        if args.suggest:
            print(suggest(report["rows"]))
        if args.relabel:
            write(relabel(report["rows"]), report["env"], args.out)
        return 0

    from fastprompt.kernels.triton import _aot

    why = _aot.unavailable()
    if why is not None:
        print(f"static report skipped: {why}", file=sys.stderr)
        return 2
    if args.subset:
        json.dump(subset(), sys.stdout)
        return 0
    problem = prepare_out(args.out, OUTPUTS)
    if problem:
        parser.error(problem)
    start = time.time()
    todo = jobs(args.quick)
    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, job_rows in enumerate(pool.map(run_job, todo)):
            rows += job_rows
            print(f"[{i + 1}/{len(todo)}] {todo[i]}", file=sys.stderr, flush=True)
    from fastprompt.bench import environment

    env = environment(torch.device("cpu"))
    env.update(
        {
            "device": "none (ahead-of-time compilation)",
            "targets": [f"sm_{a}" for a in ARCHS],
            "source_hash": _aot.source_hash(),
            "compile_seconds": round(time.time() - start),
        }
    )
    write(relabel(rows), env, args.out)
    print(f"wrote {args.out} in {time.time() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
