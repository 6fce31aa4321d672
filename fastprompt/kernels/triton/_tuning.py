"""Launch configurations of the prompt-attention kernels: the autotuning lists and their pruning.

Each tuned kernel has a config list in preference order (the first admissible one is the fixed
choice when ``torch.use_deterministic_algorithms(True)`` asks for bitwise reproducibility across
processes: timing-based autotuning could pick another block size, hence another summation order,
in another run). Configs are pruned before tuning so that nothing the tuner may pick fails to
launch or spills: an estimate of shared memory against the device's per-block limit, and the
largest head dim at which each config compiled without spills (:data:`SPILL_FREE_UP_TO`, read
off the static report), and on sm_90 forward tiles wgmma can take (:func:`uses_wgmma`).
``benchmarks/static_report.py`` compiles every listed config for sm_80 and sm_90 and
``tests/kernels/test_static_resources.py`` checks every admitted one. The tuning key holds the
compute capability (Triton's own has no device); :mod:`._precompile` compiles what the tuner may
try, in parallel, before it does.

Under the Triton interpreter every kernel gets one small config: no benchmarking, tiny tiles, and
the tests' shapes still reach full blocks, partial last blocks and multi-block loops.

Block names are the same in every kernel: ``BLOCK_M`` query rows, ``BLOCK_N`` key rows.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
from triton.runtime.autotuner import Autotuner

from fastprompt import _config
from fastprompt.kernels.triton._common import (
    bucket,
    device_guard,
    matmul_precision,
    split_head_dim,
)


class Cfg(NamedTuple):
    """One launch configuration: tile sizes, warps and pipeline stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int

    def triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n},
            num_warps=self.warps,
            num_stages=self.stages,
        )


# Preference order: the first is the default when tuning is off. The lists hold what is worth
# timing on A100/H100 for ViT shapes (N ~ 197-577, P <= ~200, d 32-128): tiles of 64+ rows on the
# accumulating dot's M side let sm_90 use wgmma; the 8-warp and small tiles keep sm_80, whose
# mma.sync holds loop-invariant operands in registers, from spilling at d = 128.
CONFIGS: dict[str, tuple[Cfg, ...]] = {
    # forward: a program owns BLOCK_M queries and walks keys BLOCK_N at a time
    "fwd": (
        Cfg(64, 64, 4, 3),
        Cfg(128, 64, 8, 3),
        Cfg(64, 32, 4, 4),
        Cfg(128, 32, 4, 3),
        Cfg(128, 128, 8, 2),
        Cfg(64, 64, 8, 3),
        Cfg(32, 64, 4, 3),
    ),
    # dK/dV: a program owns BLOCK_N keys (prompt or image) and walks queries BLOCK_M at a time
    "dkdv": (
        Cfg(32, 64, 4, 3),
        Cfg(32, 128, 8, 3),
        Cfg(16, 64, 4, 4),
        # 64 keys over 8 warps: half the registers of the 4-warp tiles; at d = 128 the ones that
        # keep wgmma on sm_90 without spilling in the score epilogue
        Cfg(32, 64, 8, 3),
        Cfg(16, 64, 8, 4),
        Cfg(64, 128, 8, 2),
        Cfg(64, 64, 4, 3),
        Cfg(32, 32, 8, 3),
        Cfg(64, 32, 8, 2),
        Cfg(16, 32, 4, 4),
    ),
    # dQ: a program owns BLOCK_M queries and walks keys BLOCK_N at a time
    "dq": (
        Cfg(64, 32, 4, 3),
        Cfg(128, 32, 8, 3),
        Cfg(128, 64, 8, 2),
        Cfg(64, 64, 4, 3),
        Cfg(32, 32, 4, 3),
        Cfg(32, 64, 4, 3),
    ),
}

INTERPRETER_CONFIG = Cfg(32, 32, 1, 1)

# Autotuning key of every tuned kernel (tensor dtypes are added by Triton's autotuner). ARCH, the
# device's compute capability, keeps a config tuned (and pruned) on one GPU from being reused on
# another of a different kind in the same process: Triton's key has no device.
KEY = ["D0", "D1", "P_BUCKET", "N_BUCKET", "K_BUCKET", "PRECISION", "ARCH"]

# Per-block shared-memory limits (opt-in maximum) of the static report's targets, in bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# Largest head dim at which each config compiled without spills, in fp16 and bf16 and every
# variant (indexed sets, lengths, score epilogue), per target family: "mma" (sm_8x, sm_12x:
# mma.sync keeps loop-invariant operands in registers) and "wgmma" (sm_90, sm_10x). Read off the
# static report (Triton 3.8's ptxas; ``benchmarks/static_report.py --suggest``), then lowered where
# an older supported Triton (>= 3.2) spills a build 3.8 does not: the table holds for every one.
# A config absent from a family is never admitted there. The static test re-checks every admitted
# config against the report; tests/kernels/test_static_resources.py lists the older spills.
SPILL_FREE_UP_TO: dict[str, dict[str, dict[Cfg, int]]] = {
    # Lowered for Triton 3.2's ptxas (sm_80, every listed build compiled; 8-72 B spills): fwd
    # 64x32 w4 s4 from 96, dK/dV 32x64 w4 s3 and 32x128 w8 s3 from 80, 16x64 w4 s4 from 128,
    # 32x64 w8 s3 and 32x32 w8 s3 from 128 (they spill at d 80 and 96, not at 128), dQ 128x32 w8
    # s3 from 64.
    "mma": {
        "fwd": {
            Cfg(64, 64, 4, 3): 96,
            Cfg(64, 32, 4, 4): 32,
            Cfg(128, 32, 4, 3): 32,
            Cfg(128, 128, 8, 2): 64,
            Cfg(64, 64, 8, 3): 128,
        },
        "dkdv": {
            Cfg(32, 64, 4, 3): 64,
            Cfg(32, 128, 8, 3): 64,
            Cfg(16, 64, 4, 4): 80,
            Cfg(32, 64, 8, 3): 64,
            Cfg(16, 64, 8, 4): 128,
            Cfg(64, 128, 8, 2): 32,
            Cfg(32, 32, 8, 3): 64,
            Cfg(64, 32, 8, 2): 64,
            Cfg(16, 32, 4, 4): 128,
        },
        "dq": {
            Cfg(64, 32, 4, 3): 96,
            Cfg(128, 32, 8, 3): 32,
            Cfg(128, 64, 8, 2): 64,
            Cfg(64, 64, 4, 3): 64,
            Cfg(32, 32, 4, 3): 128,
            Cfg(32, 64, 4, 3): 80,
        },
    },
    "wgmma": {
        "fwd": {
            Cfg(64, 64, 4, 3): 128,
            Cfg(128, 64, 8, 3): 128,
            Cfg(64, 32, 4, 4): 128,
            Cfg(128, 32, 4, 3): 96,
            Cfg(128, 128, 8, 2): 128,
            Cfg(64, 64, 8, 3): 128,
            Cfg(32, 64, 4, 3): 128,
        },
        "dkdv": {
            Cfg(32, 64, 4, 3): 96,
            Cfg(32, 128, 8, 3): 96,
            Cfg(16, 64, 4, 4): 96,
            Cfg(32, 64, 8, 3): 128,
            Cfg(16, 64, 8, 4): 128,
            Cfg(64, 128, 8, 2): 64,
            Cfg(64, 64, 4, 3): 32,
            # 128 under Triton 3.8; Triton 3.2's ptxas gives it 255 registers and spills at d 80
            Cfg(32, 32, 8, 3): 64,
            Cfg(64, 32, 8, 2): 64,
        },
        "dq": {
            Cfg(64, 32, 4, 3): 128,
            Cfg(128, 32, 8, 3): 128,
            Cfg(128, 64, 8, 2): 128,
            Cfg(64, 64, 4, 3): 128,
            Cfg(32, 32, 4, 3): 128,
            Cfg(32, 64, 4, 3): 64,
        },
    },
}


# wgmma (sm_90) multiplies tiles of 64 rows per warpgroup of 4 warps: an accumulator of fewer
# rows (the accumulating dots' M side: queries in the forward and dQ, keys in dK/dV) runs on
# mma.sync instead. On the wgmma family the forward admits only tiles wgmma can take; dK/dV and dQ
# keep their narrow tiles, which the tuner may still find faster at small work.
WGMMA_ROWS = 64
WGMMA_ONLY = ("fwd",)


def uses_wgmma(role: str, cfg: Cfg) -> bool:
    """Whether a config's accumulating dots can run as wgmma on sm_90 (the static report checks
    it against the PTX)."""
    rows = cfg.block_n if role == "dkdv" else cfg.block_m
    return rows >= WGMMA_ROWS and cfg.warps % 4 == 0


def family(arch: int) -> str:
    """Register-pressure family of a compute capability (e.g. 80, 90)."""
    return "wgmma" if 90 <= arch < 120 else "mma"


def interpreting() -> bool:
    return _config.get().triton_interpret


def smem_estimate(role: str, cfg: Cfg, d: int, elt: int) -> int:
    """Bytes of shared memory a config needs: pipelined tiles × stages plus resident tiles. An
    upper bound (Q and dO stay in registers on sm_8x); fp32 counts 1.6× (3xTF32 keeps each
    operand's high and low parts, up to 1.57× measured). The static test checks every build."""
    bm, bn, s = cfg.block_m, cfg.block_n, cfg.stages
    if role == "fwd":  # K, V pipelined; Q resident (an smem operand of wgmma)
        est = (s * 2 * bn + bm) * d * elt
    elif role == "dq":  # K, V pipelined; Q, dO resident
        est = (s * 2 * bn + 2 * bm) * d * elt
    elif role == "dkdv":  # Q, dO pipelined; K, V resident; dSᵀ/Pᵀ through smem as dot operands
        est = (s * 2 * bm + 2 * bn) * d * elt + 2 * bm * bn * elt
    else:
        raise ValueError(f"unknown kernel role {role!r}")
    return est * 8 // 5 if elt == 4 else est


def fp32_per_thread(role: str, cfg: Cfg, d: int, wgmma: bool, elt: int = 2) -> float:
    """Rough register estimate per thread, in 32-bit words: fp32 accumulators and score tiles,
    plus, without wgmma (sm_8x), the dot operands mma.sync keeps in registers. Only ranks configs
    (the fallback when none is admitted); ptxas decides, the static report records it."""
    bm, bn = cfg.block_m, cfg.block_n
    half = elt / 4  # 32-bit words per operand element
    if role == "fwd":  # acc, scores, P as operand; + Q (resident), K/V (per step)
        words = bm * d + bm * bn + bm * bn * half
        operands = (bm * d + 2 * bn * d) * half
    elif role == "dq":  # acc, S and dP, dS as operand; + Q/dO (resident), K/V (per step)
        words = bm * d + 2 * bm * bn + bm * bn * half
        operands = (2 * bm * d + 2 * bn * d) * half
    elif role == "dkdv":  # dK/dV accs, Sᵀ and dPᵀ, Pᵀ/dSᵀ as operands; + K/V, Q/dO
        words = 2 * bn * d + 2 * bn * bm + 2 * bn * bm * half
        operands = (2 * bn * d + 2 * bm * d) * half
    else:
        raise ValueError(f"unknown kernel role {role!r}")
    if not wgmma:
        words += operands
    return words / (32 * cfg.warps)


def admissible(
    role: str,
    configs,
    d: int,
    elt: int,
    arch: int,
    smem_limit: int,
    n_q: int | None = None,
    n_keys: int | None = None,
) -> list:
    """Configs (``Cfg`` or ``triton.Config``) the autotuner may try on compute capability
    ``arch``, in preference order: shared memory within ``smem_limit``, no spill at head dim
    ``d`` per :data:`SPILL_FREE_UP_TO` (fp32, whose dot operands take twice the registers, counts
    as twice the head dim) and, for :data:`WGMMA_ONLY` kernels on sm_90, wgmma. With sizes
    (``n_q`` queries, ``n_keys`` = prompt + image keys of a sequence), tiles over twice the work
    they would tile are dropped.

    Never empty: if nothing is admitted, the config with the smallest register estimate among
    those that fit shared memory remains (it may spill; it launches).
    """

    def as_cfg(c) -> Cfg:
        if isinstance(c, Cfg):
            return c
        return Cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    limits = SPILL_FREE_UP_TO[family(arch)][role]
    d_eff = d if elt <= 2 else 2 * d
    wgmma_only = family(arch) == "wgmma" and role in WGMMA_ONLY
    fits = [
        c
        for c in configs
        if smem_estimate(role, as_cfg(c), d, elt) <= smem_limit
        and d_eff <= limits.get(as_cfg(c), 0)
        and (not wgmma_only or uses_wgmma(role, as_cfg(c)))
    ]
    if n_q is not None:
        keys = n_q if n_keys is None else n_keys
        small = [c for c in fits if as_cfg(c).block_m <= max(16, 2 * n_q)]
        small = [c for c in small if as_cfg(c).block_n <= max(16, 2 * keys)]
        fits = small or fits
    if fits:
        return fits
    # Nothing is known to be spill-free here: a config that fits shared memory, fewest registers.
    wgmma = family(arch) == "wgmma"
    in_smem = [c for c in configs if smem_estimate(role, as_cfg(c), d, elt) <= smem_limit]
    return [min(in_smem or configs, key=lambda c: fp32_per_thread(role, as_cfg(c), d, wgmma, elt))]


@functools.cache
def device_smem(index: int) -> int:
    """Per-block shared-memory limit (opt-in) of CUDA device ``index``, from Triton's driver."""
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


@functools.cache
def device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def arch_of(t: torch.Tensor) -> int:
    """Compute capability of ``t``'s CUDA device as an int (e.g. 90); 0 off CUDA."""
    return device_arch(_device_index(t)) if t.device.type == "cuda" else 0


def key_args(q: torch.Tensor, k: torch.Tensor, pk: torch.Tensor) -> tuple[int, int, int, int]:
    """``P_BUCKET, N_BUCKET, K_BUCKET, ARCH``: the size buckets (prompt keys, queries, image
    keys) and the architecture that the tuned kernels take only for the autotuning key."""
    return bucket(pk.shape[2], 1024), bucket(q.shape[2], 4096), bucket(k.shape[2], 4096), arch_of(q)


def _prune(role: str, configs, named_args, **kwargs):
    q = named_args["Q"]
    index = _device_index(q)
    return admissible(
        role,
        configs,
        kwargs["D0"] + kwargs["D1"],
        q.element_size(),
        device_arch(index),
        device_smem(index),
        named_args["N_Q"],
        named_args["P"] + named_args["N_K"],
    )


def autotuned(role: str, fn):
    """``fn`` under Triton's autotuner with the role's pruned config list (one config when
    interpreting)."""
    if interpreting():
        return _Untuned(fn, INTERPRETER_CONFIG)
    return triton.autotune(
        configs=[c.triton() for c in CONFIGS[role]],
        key=KEY,
        prune_configs_by={"early_config_prune": functools.partial(_prune, role)},
    )(fn)


class _Untuned:
    """A kernel launched with one config, no autotuner (the interpreter).

    Triton's autotuner cannot be used there on older releases: Triton 3.2's asks for a GPU driver
    when it is built and hands every config field (``num_buffers_warp_spec``...) to the
    interpreted kernel. ``configs`` and ``cache`` mirror the autotuner's, for ``forced_configs``.
    """

    def __init__(self, fn, cfg: Cfg) -> None:
        self.fn = fn
        self.configs = [cfg.triton()]
        self.cache: dict = {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.fn[grid](*args, **kwargs, **self.configs[0].kwargs)

        return launch


def fixed_config(role: str, kernel, args: tuple, kwargs: dict) -> triton.Config:
    """The config a tuned kernel runs without timing: the first admissible one."""
    if len(kernel.configs) == 1:
        return kernel.configs[0]
    return _prune(role, kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)[0]


def run(launches, like: torch.Tensor) -> None:
    """Launch a plan on ``like``'s device. Under ``torch.use_deterministic_algorithms(True)``
    tuned kernels skip timing and take their fixed config (same tiling in every process)."""
    fixed = deterministic()
    with device_guard(like):
        for launch in launches:
            kernel = launch.kernel
            if fixed and isinstance(kernel, Autotuner):
                cfg = fixed_config(launch.role, kernel, launch.args, launch.kwargs)
                kernel.fn[launch.grid](*launch.args, **launch.kwargs, **cfg.all_kwargs())
            else:
                kernel[launch.grid](*launch.args, **launch.kwargs)


@contextlib.contextmanager
def forced_configs(kernels: dict, cfg: Cfg) -> Iterator[None]:
    """Run the given tuned kernels with exactly ``cfg`` (tests use it to cover other tilings)."""
    saved = {name: k.configs for name, k in kernels.items()}
    try:
        for k in kernels.values():
            k.configs = [cfg.triton()]
            k.cache.clear()
        yield
    finally:
        for name, k in kernels.items():
            k.configs = saved[name]
            k.cache.clear()


def deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def index_args(prompt_index, prompt_lengths, q) -> tuple:
    """(IDX, LENS, HAS_INDEX, HAS_LENGTHS). An absent tensor's pointer is q's: the kernels never
    read it (HAS_* is a compile-time flag), and nothing is allocated per call. The kernels read
    element b at ``IDX + b`` (and ``LENS + t``): a strided view (``index[::2]``, a column of a
    table) is made contiguous first, else they read its neighbours' values."""
    return (
        prompt_index.contiguous() if prompt_index is not None else q,
        prompt_lengths.contiguous() if prompt_lengths is not None else q,
        prompt_index is not None,
        prompt_lengths is not None,
    )


def common_meta(q, pk, scale: float, prompt_index, prompt_lengths) -> tuple[tuple, dict]:
    """(IDX, LENS) and the constexpr/keyword arguments every tuned kernel takes."""
    d0, d1 = split_head_dim(q.shape[-1])
    idx, lens, has_idx, has_lens = index_args(prompt_index, prompt_lengths, q)
    meta = {
        "HAS_INDEX": has_idx,
        "HAS_LENGTHS": has_lens,
        "D0": d0,
        "D1": d1,
        "PRECISION": matmul_precision(q.dtype, interpreting()),
        # The scale is folded into the exponent as one FMA: keep fusion on explicitly (Triton
        # 3.10 turns its default off).
        "enable_fp_fusion": True,
    }
    return (idx, lens), meta
