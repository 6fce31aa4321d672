"""Static GPU resources of the Triton kernels (compiled for sm_80 and sm_90, never run).

The committed report (``benchmarks/results/static/static_report.json``, written by
``benchmarks/static_report.py``) holds every listed config of every kernel; these tests check it
is current and that nothing the autotuner may pick spills or overflows shared memory in
fp16/bf16 (the score epilogue and indexed sets included), that the sm_90 forward configs it may
pick use wgmma, then re-compile a small subset with the installed Triton to check the report's
claims still hold (about 45 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from fastprompt.kernels.triton import _aot, _capability, _tuning

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "results" / "static" / "static_report.json"
HALF = ("float16", "bfloat16")
REGENERATE = "regenerate it with `python benchmarks/static_report.py` (30-60 min on 2 cores)"


def _report() -> dict:
    if not REPORT.exists():
        pytest.fail(f"{REPORT} is missing; {REGENERATE}")
    return json.loads(REPORT.read_text())


def test_report_is_current():
    env = _report()["env"]
    assert env["source_hash"] == _aot.source_hash(), (
        f"the kernels or their config lists changed since the static report was written "
        f"(report {env['source_hash']}, sources {_aot.source_hash()}); {REGENERATE}"
    )


def _key(row: dict) -> tuple:
    return row["kernel"], row["block_m"], row["block_n"], row["warps"], row["stages"]


@pytest.mark.parametrize("arch", sorted(_tuning.SMEM_LIMIT))
def test_nothing_the_autotuner_may_pick_spills_or_overflows_shared_memory(arch):
    rows = [r for r in _report()["rows"] if r["arch"] == arch and r["dtype"] in HALF]
    limit = _tuning.SMEM_LIMIT[arch]
    problems = []
    for dtype in HALF:
        for d in _capability.AUTO_HEAD_DIMS:
            built = [r for r in rows if r["dtype"] == dtype and r["d"] == d]
            by_cfg: dict[tuple, list[dict]] = {}
            for r in built:
                by_cfg.setdefault(_key(r), []).append(r)
            for role, configs in _tuning.CONFIGS.items():
                for c in _tuning.admissible(role, configs, d, 2, arch, limit):
                    found = by_cfg.get((role, c.block_m, c.block_n, c.warps, c.stages), [])
                    if not any(r["variant"] == "" for r in found):
                        problems.append(f"{role} {c} {dtype} d={d}: not in the report")
                    for r in found:
                        if r["spill_bytes"] or r["smem"] > limit:
                            problems.append(
                                f"{role} {c} {dtype} d={d} {r['variant']}: "
                                f"{r['spill_bytes']} B spilled, {r['smem']} B shared of {limit}"
                            )
            for r in built:
                if r["kernel"] not in _tuning.CONFIGS and (r["spill_bytes"] or r["smem"] > limit):
                    problems.append(f"{r['kernel']} {dtype} d={d}: spills or overflows")
    assert not problems, f"sm_{arch}:\n" + "\n".join(problems)


@pytest.mark.parametrize("arch", [a for a in sorted(_tuning.SMEM_LIMIT) if a >= 90])
def test_wgmma_is_where_the_pruner_counts_on_it(arch):
    """``uses_wgmma`` matches the PTX of every fp16/bf16 build, and every forward config the
    autotuner may pick on sm_90 uses wgmma (a 32-row tile cannot: wgmma takes 64 rows)."""
    rows = [r for r in _report()["rows"] if r["arch"] == arch and r["dtype"] in HALF]
    wrong, narrow = [], []
    for r in rows:
        if r["kernel"] not in _tuning.CONFIGS:
            continue
        cfg = _tuning.Cfg(r["block_m"], r["block_n"], r["warps"], r["stages"])
        if _tuning.uses_wgmma(r["kernel"], cfg) != (r["wgmma"] > 0):
            wrong.append(f"{r['kernel']} {cfg} {r['dtype']} d={r['d']}: {r['wgmma']} wgmma")
        admitted = _tuning.admissible(
            r["kernel"], _tuning.CONFIGS[r["kernel"]], r["d"], 2, arch, _tuning.SMEM_LIMIT[arch]
        )
        if r["kernel"] in _tuning.WGMMA_ONLY and cfg in admitted and not r["wgmma"]:
            narrow.append(f"{r['kernel']} {cfg} {r['dtype']} d={r['d']} {r['variant']}")
    assert not wrong, "uses_wgmma disagrees with the PTX:\n" + "\n".join(wrong)
    assert not narrow, "admitted without wgmma:\n" + "\n".join(narrow)


def test_installed_triton_still_compiles_the_riskiest_configs_without_spills():
    """Compile the default and the riskiest admissible config of each tuned kernel now."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--subset"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    if proc.returncode == 2:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert rows, "the subset compiled nothing"
    bad = [r for r in rows if r["spill_bytes"] or r["smem"] > r["smem_limit"]]
    assert not bad, "\n".join(
        f"sm_{r['arch']} {r['kernel']} {r['dtype']} d={r['d']} {r['block_m']}x{r['block_n']} "
        f"w{r['warps']} s{r['stages']}: {r['spill_bytes']} B spilled, {r['smem']} B shared"
        for r in bad
    )


def test_pruning_keeps_over_limit_tiles_off_a100():
    """The issue's example: a d = 128 dK/dV config at 64×128, 8 warps needs over 163 KB."""
    big = _tuning.Cfg(64, 128, 8, 3)
    assert _tuning.smem_estimate("dkdv", big, 128, 2) > _tuning.SMEM_LIMIT[80]
    assert big not in _tuning.admissible("dkdv", [big, *_tuning.CONFIGS["dkdv"]], 128, 2, 80,
                                         _tuning.SMEM_LIMIT[80])  # fmt: skip
    for role, configs in _tuning.CONFIGS.items():
        for arch in (80, 86, 89, 90):  # sm_86/89 allow 99 KB per block
            for d in _capability.AUTO_HEAD_DIMS:
                ok = _tuning.admissible(role, configs, d, 2, arch, 99 * 1024)
                assert ok and all(_tuning.smem_estimate(role, c, d, 2) <= 99 * 1024 for c in ok)


def test_shared_memory_estimate_is_an_upper_bound():
    """The pruner's estimate never undercounts what Triton allocated, in any build."""
    under = []
    for r in _report()["rows"]:
        if r["kernel"] in _tuning.CONFIGS:
            cfg = _tuning.Cfg(r["block_m"], r["block_n"], r["warps"], r["stages"])
            elt = 4 if r["dtype"] == "float32" else 2
            if _tuning.smem_estimate(r["kernel"], cfg, r["d"], elt) < r["smem"]:
                under.append(f"sm_{r['arch']} {r['kernel']} {cfg} {r['dtype']} d={r['d']}")
    assert not under, "\n".join(under)


# Builds an older supported Triton spills where the static report's (3.8) does not: (arch, kernel,
# config, head dim, what was seen). The report cannot show them, and its --suggest would admit them.
OLDER_TRITON_SPILLS = [
    (90, "dkdv", _tuning.Cfg(32, 32, 8, 3), 80, "Triton 3.2: 255 registers, spills"),
    (90, "dkdv", _tuning.Cfg(32, 32, 8, 3), 96, "Triton 3.2: 255 registers, spills"),
    # sm_80, every listed fp16/bf16 build (indexed sets and the score epilogue too) under 3.2:
    (80, "fwd", _tuning.Cfg(64, 32, 4, 4), 64, "Triton 3.2: 8 B, indexed sets"),
    (80, "fwd", _tuning.Cfg(64, 32, 4, 4), 96, "Triton 3.2: 8 B, indexed sets"),
    (80, "dq", _tuning.Cfg(128, 32, 8, 3), 64, "Triton 3.2: 8 B"),
    (80, "dkdv", _tuning.Cfg(32, 64, 4, 3), 80, "Triton 3.2: 32 B"),
    (80, "dkdv", _tuning.Cfg(32, 128, 8, 3), 80, "Triton 3.2: 24 B"),
    (80, "dkdv", _tuning.Cfg(32, 64, 8, 3), 80, "Triton 3.2: 16 B"),
    (80, "dkdv", _tuning.Cfg(32, 64, 8, 3), 96, "Triton 3.2: 16-24 B"),
    (80, "dkdv", _tuning.Cfg(32, 32, 8, 3), 80, "Triton 3.2: 16 B"),
    (80, "dkdv", _tuning.Cfg(32, 32, 8, 3), 96, "Triton 3.2: 16 B"),
    (80, "dkdv", _tuning.Cfg(16, 64, 4, 4), 96, "Triton 3.2: 8 B"),
    (80, "dkdv", _tuning.Cfg(16, 64, 4, 4), 128, "Triton 3.2: 16-72 B, 72 with scores"),
]


@pytest.mark.parametrize(
    "arch, role, cfg, d, seen",
    OLDER_TRITON_SPILLS,
    ids=[
        f"sm{a}-{r}-{c.block_m}x{c.block_n}w{c.warps}s{c.stages}-d{d}"
        for a, r, c, d, _ in OLDER_TRITON_SPILLS
    ],
)
def test_what_an_older_triton_spills_is_not_admitted(arch, role, cfg, d, seen):
    """The pruner's table holds for every supported Triton (>= 3.2), not only the report's."""
    admitted = _tuning.admissible(role, _tuning.CONFIGS[role], d, 2, arch, _tuning.SMEM_LIMIT[arch])
    assert cfg not in admitted, f"{role} {cfg} fp16/bf16 d={d} on sm_{arch} ({seen})"


def test_an_autotuner_can_be_built_while_compiling_ahead_of_time():
    # Triton 3.2 asks for the benchmarker when an Autotuner is built (at import of the kernel
    # modules, inside the stand-in driver); only running a benchmark is impossible there.
    from triton.runtime import driver

    with _aot.target(90):
        bench = driver.active.get_benchmarker()
        with pytest.raises(RuntimeError, match="cannot benchmark"):
            bench(lambda: None)
