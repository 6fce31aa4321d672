"""Compile, in parallel, every kernel build the Triton backend may launch, before it launches.

Triton compiles a kernel on its first launch with a new specialisation, and the autotuner
compiles every admissible config of a tuned kernel on its first call for a new key: on a GPU held
for minutes, hundreds of serial compiles. :func:`precompile` lists those builds -- for each dtype,
head dim and call shape, the forward and backward plans as the launchers build them, every config
the pruner admits on the target -- and compiles them in worker processes, ahead of time for the
target (the stand-in driver of :mod:`._aot`: the workers never touch a GPU). Each build lands in
Triton's on-disk cache under the key a real launch computes, so the launches and the autotuner
that follow load it instead of compiling. On a GPU, the builds are then loaded into this process
(``load``): a hit takes milliseconds, and a build that takes seconds there says the keys differ.

Triton specialises a build on the integer arguments equal to 1 or divisible by 16 and on 16-byte
pointer alignment, so the shapes must be those of the calls to come (B, T = 1 or not, and the
image-key and prompt counts, mostly); the layouts the model passes (q, k, v views of a (B, N, 3,
H, d) buffer) and contiguous tensors give the same builds when d is a multiple of 16.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["VALIDATION_SHAPES", "PrecompileReport", "Shape", "precompile"]

ROLES = ("fwd", "preprocess", "dkdv", "dq", "reduce")
_RESULT = "@@precompile "


@dataclass(frozen=True)
class Shape:
    """One call shape: B sequences of H heads, ``n`` queries (and ``n_k`` image keys, default n),
    P prompt keys in ``sets`` sets (read through ``prompt_index`` when ``indexed``; with
    ``lengths``), and ``scores`` Prompt Condensation vector pairs (0: the plain backward)."""

    batch: int = 64
    heads: int = 12
    n: int = 197
    p: int = 50
    sets: int = 1
    indexed: bool = False
    lengths: bool = False
    n_k: int | None = None
    scores: int = 0

    def inputs(self) -> dict:
        """Keyword arguments of :func:`._aot.model_inputs` (and ``scores`` of ``plan``)."""
        return {
            "batch": self.batch,
            "heads": self.heads,
            "n": self.n,
            "p": self.p,
            "t": self.sets,
            "indexed": self.indexed,
            "lengths": self.lengths,
            "n_k": self.n_k,
        }


# The GPU validation's op shapes (ViT-B/16: B 64, H 12, N 197; P 50 and 200; one shared set, and
# a set per image read through prompt_index).
VALIDATION_SHAPES = tuple(
    Shape(p=p, sets=sets, indexed=indexed)
    for p in (50, 200)
    for sets, indexed in ((1, False), (64, True))
)


@dataclass
class PrecompileReport:
    """What :func:`precompile` built.

    Attributes
    ----------
    target : str
        The architecture compiled for, and the device (or "ahead of time, no GPU").
    arch : int
        Compute capability as an int (80, 90, ...).
    jobs : int
        Worker processes used.
    seconds : float
        Wall time of the whole call (compiling and loading).
    builds : list of dict
        One per distinct build: ``role`` (fwd, preprocess, dkdv, dq, reduce), ``dtype``, ``d``,
        ``shape`` (the first :class:`Shape` that needed it), ``config`` ([BLOCK_M, BLOCK_N,
        warps, stages], None for untuned kernels), ``compile_s``, ``regs``, ``spill_bytes``,
        ``smem``, ``wgmma`` (None where ``cuobjdump`` is missing), ``load_s`` (seconds to load
        it into this process; GPU only, else None) and ``error`` (None, or why it failed or was
        not reached before ``timeout``).
    timed_out : bool
        The timeout stopped the workers before every build was done, or (on a GPU) the loading
        before every build was loaded (those keep ``load_s`` None).
    """

    target: str
    arch: int
    jobs: int
    seconds: float = 0.0
    builds: list[dict] = field(default_factory=list)
    timed_out: bool = False

    @property
    def failures(self) -> list[dict]:
        return [b for b in self.builds if b["error"]]

    def summary(self) -> str:
        """One line: builds, failures, spills, time, and the load time on a GPU."""
        spilled = sum(1 for b in self.builds if b.get("spill_bytes"))
        compile_s = sum(b["compile_s"] or 0.0 for b in self.builds)
        line = (
            f"precompiled {len(self.builds) - len(self.failures)} of {len(self.builds)} Triton "
            f"kernel builds for {self.target} in {self.seconds:.0f} s with {self.jobs} "
            f"processes ({compile_s:.0f} s of compiling); {len(self.failures)} failed, "
            f"{spilled} spill"
        )
        loads = [b["load_s"] for b in self.builds if b["load_s"] is not None]
        if loads:
            line += f"; loaded into this process in {sum(loads):.1f} s (slowest {max(loads):.2f} s)"
        return line + (" (timed out)" if self.timed_out else "")

    def as_dict(self) -> dict:
        return asdict(self)


def precompile(
    dtypes: Iterable[torch.dtype] = (torch.float16, torch.bfloat16),
    head_dims: Iterable[int] = (64,),
    shapes: Iterable[Shape] = VALIDATION_SHAPES,
    *,
    arch: int | None = None,
    configs: str = "admissible",
    roles: Sequence[str] = ROLES,
    jobs: int | None = None,
    load: bool = True,
    timeout: float | None = None,
) -> PrecompileReport:
    """Compile every Triton kernel build that calls of these dtypes, head dims and shapes may
    launch, in parallel worker processes, into Triton's on-disk cache.

    Parameters
    ----------
    dtypes : iterable of torch.dtype
        float16, bfloat16 (float32 compiles for the current ``torch.get_float32_matmul_precision``).
    head_dims : iterable of int
        Head dims (each one the backend supports).
    shapes : iterable of Shape
        The calls to come (default: the GPU validation's, :data:`VALIDATION_SHAPES`).
    arch : int, optional
        Compute capability to compile for (80, 90, ...). None: the current CUDA device's; without
        a GPU it must be given (then the shared-memory limit is the static report's for 80/90).
    configs : {"admissible", "first"}
        Every config the autotuner may pick there, or only the one used untuned (deterministic
        mode).
    roles : sequence of str
        Kernels to compile: any of "fwd", "preprocess", "dkdv", "dq", "reduce".
    jobs : int, optional
        Worker processes (default: the CPU count).
    load : bool
        On a GPU, load every build into this process afterwards (disk-cache hits), so that the
        first launches and the autotuner find them in memory.
    timeout : float, optional
        Seconds (from the call) after which unfinished builds are given up (reported with an
        error), and loading stops.

    Returns
    -------
    PrecompileReport
    """
    from fastprompt.kernels.triton import _tuning

    start = time.time()
    if configs not in ("admissible", "first"):
        raise ValueError(f"precompile: configs must be 'admissible' or 'first', got {configs!r}")
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"precompile: unknown roles {unknown}; expected some of {ROLES}")
    on_gpu = arch is None
    if on_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "precompile: no CUDA device; name the target (arch=80 or 90) to compile ahead of "
                "time"
            )
        index = torch.cuda.current_device()
        arch, smem = _tuning.device_arch(index), _tuning.device_smem(index)
        target = f"sm_{arch} ({torch.cuda.get_device_name(index)})"
    else:
        if arch not in _tuning.SMEM_LIMIT:
            raise ValueError(
                f"precompile: without a GPU, arch must be one of {sorted(_tuning.SMEM_LIMIT)} "
                f"(shared-memory limits known), got {arch!r}"
            )
        smem, target = _tuning.SMEM_LIMIT[arch], f"sm_{arch} (ahead of time, no GPU)"
    specs = _job_specs(list(dtypes), list(head_dims), list(shapes), arch, smem, configs, roles)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs) or 1))
    report = PrecompileReport(target=target, arch=arch, jobs=jobs)
    deadline = None if timeout is None else start + timeout
    report.builds, report.timed_out = _run_workers(specs, arch, jobs, deadline)
    if on_gpu and load:
        report.timed_out |= _load_here(report.builds, deadline)
    report.seconds = time.time() - start
    return report


def _job_specs(dtypes, head_dims, shapes, arch, smem, configs, roles) -> list[dict]:
    """Distinct builds, as JSON-able specs. Builds of different shapes that Triton would
    specialise alike are listed once (the first shape names them)."""
    from fastprompt.kernels.triton import _aot, _tuning

    precision = torch.get_float32_matmul_precision()
    specs, seen = [], set()
    for dtype in dtypes:
        elt = torch.empty((), dtype=dtype).element_size()
        for d in head_dims:
            for shape in shapes:
                for launch in _aot.plan(dtype, d, shape.scores, **shape.inputs()):
                    if launch.role not in roles:
                        continue
                    if launch.role in _tuning.CONFIGS:
                        args = dict(zip(launch.kernel.fn.arg_names, launch.args))
                        n_keys = args["P"] + args["N_K"]
                        ok = _tuning.admissible(
                            launch.role, _tuning.CONFIGS[launch.role], d, elt, arch, smem,
                            args["N_Q"], n_keys,
                        )  # fmt: skip
                        cfgs = [list(c) for c in (ok[:1] if configs == "first" else ok)]
                    else:
                        cfgs = [None]
                    for cfg in cfgs:
                        key = (launch.role, str(dtype), d, _signature(launch), str(cfg))
                        if key in seen:
                            continue
                        seen.add(key)
                        specs.append(
                            {
                                "role": launch.role,
                                "dtype": str(dtype).replace("torch.", ""),
                                "d": d,
                                "shape": asdict(shape),
                                "config": cfg,
                                "fp32_precision": precision,
                            }
                        )
    return specs


# Integer arguments the kernels declare ``do_not_specialize`` (autotuning key only, or runtime).
_UNSPECIALIZED = frozenset({"P_BUCKET", "N_BUCKET", "K_BUCKET", "ARCH", "SEQ_GROUP"})


def _signature(launch) -> tuple:
    """What Triton specialises a build on, roughly: integers equal to 1, divisible by 16 or past
    32 bits, pointer alignment to 16 bytes, tensor dtypes and the compile-time arguments."""
    from fastprompt.kernels.triton import _tuning

    fn = launch.kernel.fn if launch.role in _tuning.CONFIGS else launch.kernel
    sig = []
    for name, a in zip(fn.arg_names, launch.args):
        if name in _UNSPECIALIZED:
            continue
        if isinstance(a, torch.Tensor):
            sig.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            sig.append(a if isinstance(a, bool) else type(a).__name__)
        else:
            sig.append((a == 1, a % 16 == 0, a.bit_length() > 31))
    return tuple(sig), tuple(sorted((k, str(v)) for k, v in launch.kwargs.items()))


def _worker_env() -> dict:
    """This process's environment (Triton keys its cache on some variables), but never the
    interpreter, and with this copy of fastprompt first on the path."""
    env = dict(os.environ)
    if env.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off"):
        env.pop("TRITON_INTERPRET")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _run_workers(specs, arch, jobs, deadline) -> tuple[list[dict], bool]:
    """Hand the specs to ``jobs`` worker processes, one at a time as each finishes one."""
    todo: queue.Queue = queue.Queue()
    for i, spec in enumerate(specs):
        todo.put((i, spec))
    results: list[dict | None] = [None] * len(specs)
    timed_out = threading.Event()
    cmd = [sys.executable, "-m", "fastprompt.kernels.triton._precompile", str(arch)]

    def feed() -> None:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_worker_env(),
        )
        # stderr drained aside (Triton's warnings), so that the worker never blocks on it
        err: list[str] = []
        drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
        drain.start()
        watchdog = None
        if deadline is not None:
            watchdog = threading.Timer(max(0.0, deadline - time.time()), _expire, (proc, timed_out))
            watchdog.daemon = True
            watchdog.start()
        try:
            while not timed_out.is_set():
                try:
                    i, spec = todo.get_nowait()
                except queue.Empty:
                    break
                results[i] = _ask(proc, spec, err)
                if timed_out.is_set():
                    results[i] = _empty(spec, "not finished before the timeout")
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            proc.wait()

    threads = [threading.Thread(target=feed) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    builds = []
    for spec, result in zip(specs, results):
        if result is None:
            result = _empty(spec, "not reached before the timeout")
        builds.append(result)
    return builds, timed_out.is_set()


def _expire(proc, flag: threading.Event) -> None:
    flag.set()
    proc.kill()


def _ask(proc, spec: dict, err: list[str]) -> dict:
    """One spec to a worker, its result back (or why there is none)."""
    try:
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith(_RESULT):
                return json.loads(line[len(_RESULT) :])
    except (BrokenPipeError, OSError):
        pass
    proc.poll()
    tail = "".join(err)[-2000:].strip()
    return _empty(spec, f"worker exited ({proc.returncode}): {tail or 'no message'}")


def _empty(spec: dict, error: str | None) -> dict:
    return {
        **spec,
        "compile_s": None,
        "regs": None,
        "spill_bytes": None,
        "smem": None,
        "wgmma": None,
        "load_s": None,
        "error": error,
    }


def _load_here(builds: list[dict], deadline: float | None) -> bool:
    """Load each compiled build into this process on the current GPU (Triton's disk cache).
    True when the deadline stopped it: a disk-cache miss compiles here, serially."""
    for b in builds:
        if b["error"]:
            continue
        if deadline is not None and time.time() > deadline:
            return True
        t0 = time.time()
        try:
            kernel = _warm(b, torch.device("cuda", torch.cuda.current_device()))
            kernel._init_handles()
        except Exception as e:  # a failed load is reported, the others still load
            b["error"] = f"load: {type(e).__name__}: {e}"
            continue
        b["load_s"] = time.time() - t0
        # the driver's own figures where cuobjdump gave none (local memory bytes per thread)
        if b["regs"] is None:
            b["regs"], b["spill_bytes"] = int(kernel.n_regs), int(kernel.n_spills)
    return False


_PLANS: dict = {}


def _warm(spec: dict, device):
    """Compile (or load from the disk cache) one build on ``device``'s target: the launch of the
    spec's role in the plan of its dtype, head dim and shape, with its config."""
    from fastprompt.kernels.triton import _aot, _tuning

    torch.set_float32_matmul_precision(spec["fp32_precision"])
    shape = Shape(**spec["shape"])
    key = (spec["dtype"], spec["d"], shape, str(device))
    if key not in _PLANS:
        _PLANS.clear()  # one plan alive at a time: on a GPU its buffers are real
        dtype = getattr(torch, spec["dtype"])
        _PLANS[key] = _aot.plan(dtype, spec["d"], shape.scores, device=device, **shape.inputs())
    launch = next(x for x in _PLANS[key] if x.role == spec["role"])
    if spec["config"] is None:
        return launch.kernel.warmup(*launch.args, grid=(1,), **launch.kwargs)
    cfg = _tuning.Cfg(*spec["config"]).triton().all_kwargs()
    return launch.kernel.fn.warmup(*launch.args, grid=(1,), **launch.kwargs, **cfg)


def _worker(arch: int) -> int:
    """Compile the specs read from stdin (one JSON per line) for ``arch``; one result line each."""
    from fastprompt.kernels.triton import _aot

    readable = _aot._cuobjdump() is not None
    for line in sys.stdin:
        spec = json.loads(line)
        out = _empty(spec, None)
        t0 = time.time()
        try:
            with _aot.target(arch):
                compiled = _warm(spec, torch.device("cpu"))
            out["compile_s"] = time.time() - t0
            out["smem"] = int(compiled.metadata.shared)
            if readable:
                res = _aot.resources(compiled)
                out.update({k: res[k] for k in ("regs", "spill_bytes", "wgmma")})
        except Exception as e:  # reported per build; the worker goes on with the next
            out["error"] = f"{type(e).__name__}: {e}"
        print(_RESULT + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1])))
