"""The prompt_attention op on any device: every backend against PyTorch's own attention.

Implementations (``--impls``; those that cannot run here are reported as skipped, with why):

- ``auto``: ``prompt_attention`` with no ``backend=``: what users get (measured dispatch on a GPU);
- ``cascade``, ``torch``, ``cpp``, ``triton``: one backend each; ``triton_default``: Triton with
  each kernel's first admissible config instead of autotuning;
- ``cat_sdpa``, ``cat_sdpa_flash``, ``cat_sdpa_efficient``, ``cat_sdpa_cudnn``: the naive way —
  concatenate the prompt K/V to each sequence's, then ``F.scaled_dot_product_attention``
  (PyTorch's choice of kernel, or one forced with ``sdpa_kernel``);
- ``sdpa_floor``: ``F.scaled_dot_product_attention`` on K/V concatenated beforehand, untimed: what
  attention over P + N keys costs without any prompt handling (a floor, not an option).

Each (dtype, P, sets, mode) row has the median time and the 20th/80th percentiles, the ratio to
``cat_sdpa`` of the same row group, the error of the output (and in ``fwd+bwd`` of every gradient,
relative to its magnitude) against the fp32 reference, and on CUDA the peak memory of one call.
Inputs are laid out as timm's: q/k/v views of one (B, N, 3, H, d) buffer; the incoming gradient
(B, N, H, d). Timing: ``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed); on a CPU the
implementations run in turn within each repetition (load hits all alike), median of ``--reps``.
Rows are appended to ``rows.jsonl`` as they are measured; ``report.md`` holds the table.
``--key-bias table|full`` adds an image-key bias as Swin's windows carry it: its relative-position
bias (1, H, N, N), or that plus the shift mask per window (B, H, N, N); ``cat_sdpa`` then builds
the mask over [prompt keys; keys] per call, as the naive way must.

    python benchmarks/bench_op.py --device cpu                      # ViT-B/16 shapes, B 8
    python benchmarks/bench_op.py --device cpu --shape 32 16 49 32 --key-bias full  # Swin-B
    python benchmarks/bench_op.py --device cuda --dtypes bfloat16 float32
    python benchmarks/bench_op.py --tiny --out /tmp/op               # seconds, any device
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastprompt import backends  # noqa: E402
from fastprompt.bench import environment  # noqa: E402
from fastprompt.cli.train_checks import check_device  # noqa: E402
from fastprompt.ops import prompt_attention, prompt_attention_ref  # noqa: E402
from fastprompt.outputs import Outputs, device_folder, prepare_out  # noqa: E402

IMPLS = (
    "auto",
    "cascade",
    "torch",
    "cpp",
    "triton",
    "triton_default",
    "cat_sdpa",
    "cat_sdpa_flash",
    "cat_sdpa_efficient",
    "cat_sdpa_cudnn",
    "sdpa_floor",
)
BASELINE = "cat_sdpa"
OUTPUTS = Outputs(
    tool="benchmarks/bench_op.py",
    report="report.json",
    keys=frozenset({"env", "rows"}),
    rows="rows.jsonl",
    row_keys=frozenset({"dtype", "prompts", "sets", "mode", "impl"}),
    others=("report.md",),
)


def _sdpa_context(kind: str):
    if kind == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[kind]
    return sdpa_kernel([chosen])


def _expanded(table, index, b):
    return table.expand(b, -1, -1, -1) if index is None else table[index]


def _mask(bias, q, p):
    """The additive mask over [prompt keys; keys]: zero for the prompts, then ``bias``."""
    if bias is None:
        return None
    b, h, n, _ = q.shape
    image = bias.to(q.dtype).expand(b, h, n, bias.shape[-1])
    return torch.cat([image.new_zeros(b, h, n, p), image], -1)


def _cat_sdpa(kind: str) -> Callable:
    def run(q, k, v, pk, pv, index, bias):
        b = q.shape[0]
        keys = torch.cat([_expanded(pk, index, b), k], 2)
        values = torch.cat([_expanded(pv, index, b), v], 2)
        with _sdpa_context(kind):
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=_mask(bias, q, pk.shape[2])
            )

    return run


def _backend(name: str | None) -> Callable:
    def run(q, k, v, pk, pv, index, bias):
        return prompt_attention(q, k, v, pk, pv, index, backend=name, key_bias=bias)[0]

    return run


def _triton_default() -> Callable:
    from fastprompt.kernels.triton import _tuning

    if not hasattr(_tuning, "deterministic"):
        raise RuntimeError("fastprompt.kernels.triton._tuning has no deterministic() switch")
    run_triton = _backend("triton")

    def run(*args):
        saved = _tuning.deterministic
        _tuning.deterministic = lambda: True  # each kernel's first admissible config
        try:
            return run_triton(*args)
        finally:
            _tuning.deterministic = saved

    return run


def _impl(name: str) -> Callable:
    if name == "auto":
        return _backend(None)
    if name in backends.NAMES:
        return _backend(name)
    if name == "triton_default":
        return _triton_default()
    if name.startswith("cat_sdpa"):
        return _cat_sdpa(name.removeprefix("cat_sdpa").lstrip("_") or "default")
    raise ValueError(name)


def _why_not(
    name: str, device: torch.device, dtype: torch.dtype, d: int, biased: bool = False
) -> str | None:
    backend = {"auto": None, "triton_default": "triton"}.get(name, name)
    if backend == "triton" and device.type == "cpu":
        return "Triton runs on a CPU only in its interpreter: a test, not a benchmark"
    if backend in backends.NAMES:
        call = backends.Call(device, dtype, d, frozenset({"key_bias"} if biased else ()))
        reasons = backends.get(backend).not_supported_reasons(call)
        return "; ".join(reasons) or None
    if name in ("cat_sdpa_flash", "cat_sdpa_efficient", "cat_sdpa_cudnn") and device.type != "cuda":
        return "a CUDA kernel"
    return None


def _inputs(b, h, n, d, t, p, dtype, device, key_bias="none", seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(device, dtype)
    pk = torch.randn(t, h, p, d, generator=g).to(device, dtype)
    pv = torch.randn(t, h, p, d, generator=g).to(device, dtype)
    dout = torch.randn(b, n, h, d, generator=g).to(device, dtype).transpose(1, 2)
    index = None if t == 1 else torch.arange(b, device=device) % t
    size = {"none": None, "table": (1, h, n, n), "full": (b, h, n, n)}[key_bias]
    bias = None if size is None else torch.randn(size, generator=g).to(device)
    return qkv, pk, pv, index, dout, bias


def _call(fn, qkv, pk, pv, index, dout, backward, bias=None):
    """One forward (no autograd) or forward + backward to q/k/v and the prompts."""
    if not backward:
        with torch.no_grad():
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return fn(q, k, v, pk, pv, index, bias), None
    leaves = [x.detach().requires_grad_() for x in (qkv, pk, pv)]
    q, k, v = leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
    out = fn(q, k, v, leaves[1], leaves[2], index, bias)
    grads = torch.autograd.grad(out, leaves, dout)
    return out, grads


def _floor(qkv, pk, pv, index, dout, backward, bias=None):
    """SDPA on K/V (and the mask) concatenated beforehand (outside the timed call)."""
    b = qkv.shape[0]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    keys = torch.cat([_expanded(pk, index, b), k], 2).detach()
    values = torch.cat([_expanded(pv, index, b), v], 2).detach()
    q = q.detach()
    mask = _mask(bias, q, pk.shape[2])

    def call():
        if not backward:
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), None
        leaves = [x.requires_grad_() for x in (q.clone(), keys.clone(), values.clone())]
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
        return out, torch.autograd.grad(out, leaves, dout)

    return call


def _errors(got, ref):
    """Max abs error of out; of the gradients, the max over them of error / max |reference|."""
    out, grads = got
    ref_out, ref_grads = ref
    err = {"err_out": float((out.float() - ref_out).abs().max())}
    if grads is not None and ref_grads is not None:
        rel = [
            float((g.float() - r).abs().max() / r.abs().max().clamp_min(1e-30))
            for g, r in zip(grads, ref_grads)
        ]
        err["err_grads_rel"] = max(rel)
    return err


def _time(calls: dict[str, Callable], device: torch.device, reps: int) -> dict[str, list[float]]:
    """Milliseconds per call: (p20, median, p80) per implementation."""
    times: dict[str, list[float]] = {}
    if not calls:  # every implementation skipped here: the rows say why
        return times
    if device.type == "cuda":
        import triton.testing

        for name, call in calls.items():
            times[name] = list(triton.testing.do_bench(call, quantiles=[0.2, 0.5, 0.8]))
        return times
    samples = {name: [] for name in calls}
    order = list(calls)
    for rep in range(reps):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            start = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    for name, s in samples.items():
        s = sorted(s)
        q = statistics.quantiles(s, n=5, method="inclusive") if len(s) > 1 else [s[0]] * 4
        times[name] = [q[0], statistics.median(s), q[3]]
    return times


def _peak_mib(call, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(args) -> list[dict]:
    device = torch.device(args.device)
    b, h, n, d = args.shape
    rows_file = Path(args.out) / "rows.jsonl"
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for p in args.prompts:
            for sets in args.sets:
                t = 1 if sets == "shared" else b
                qkv, pk, pv, index, dout, bias = _inputs(
                    b, h, n, d, t, p, dtype, device, args.key_bias
                )
                for mode in args.modes:
                    backward = mode == "fwd+bwd"
                    ref_in = [x.float() for x in (qkv, pk, pv)]
                    ref = _call(
                        lambda *a: prompt_attention_ref(*a[:6], key_bias=a[6])[0],
                        *ref_in,
                        index,
                        dout.float(),
                        backward,
                        bias,
                    )
                    calls, skipped = {}, {}
                    for name in args.impls:
                        why = _why_not(name, device, dtype, d, bias is not None)
                        if why is None:
                            try:
                                fn = _impl(name) if name != "sdpa_floor" else None
                                if fn is None:
                                    call = _floor(qkv, pk, pv, index, dout, backward, bias)
                                else:
                                    call = (
                                        lambda fn: (
                                            lambda: _call(
                                                fn, qkv, pk, pv, index, dout, backward, bias
                                            )
                                        )
                                    )(fn)
                                got = call()  # warm-up: compile, autotune, measured dispatch
                                calls[name] = (
                                    call,
                                    _errors(got, ref) if name != "sdpa_floor" else {},
                                )
                            except Exception as e:  # a kernel refusing this shape/dtype
                                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        if why is not None:
                            skipped[name] = why
                    times = _time({k: c for k, (c, _) in calls.items()}, device, args.reps)
                    base = times.get(BASELINE, [None] * 3)[1]
                    common = dict(
                        dtype=dtype_name,
                        prompts=p,
                        sets=sets,
                        mode=mode,
                        shape=[b, h, n, d],
                        key_bias=args.key_bias,
                    )
                    for name, (call, errs) in calls.items():
                        p20, median, p80 = times[name]
                        emit(
                            {
                                **common,
                                "impl": name,
                                "ms_p20": p20,
                                "ms_median": median,
                                "ms_p80": p80,
                                "speed_vs_cat_sdpa": (base / median) if base else None,
                                "peak_mib": _peak_mib(call, device),
                                **errs,
                            }
                        )
                    for name, why in skipped.items():
                        emit({**common, "impl": name, "skipped": why})
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    first = rows[0] if rows else {}
    lines = [
        f"prompt_attention on {env['device']}, torch {env['torch']}, triton {env.get('triton')}, "
        f"CUDA {env.get('cuda')}, commit {env.get('commit')}, {env.get('date')}; shape (B, H, N, "
        f"d) {first.get('shape', '-')}, key bias {first.get('key_bias', 'none')}. speed: cat + "
        "SDPA's median time over the row's (above 1: the row is faster).",
        "",
        "| dtype | P | sets | mode | impl | ms median [p20, p80] | speed vs cat+SDPA | err out "
        "| err grads (rel) | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['dtype']} | {r['prompts']} | {r['sets']} | {r['mode']} | {r['impl']} "
        if "skipped" in r:
            lines.append(head + f"| skipped: {r['skipped']} | | | | |")
            continue
        ratio = "" if r["speed_vs_cat_sdpa"] is None else f"{r['speed_vs_cat_sdpa']:.2f}"
        grads = "" if "err_grads_rel" not in r else f"{r['err_grads_rel']:.2e}"
        err = "" if "err_out" not in r else f"{r['err_out']:.2e}"
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            head + f"| {r['ms_median']:.3f} [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}] | {ratio} "
            f"| {err} | {grads} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def _check_counts(args) -> str | None:
    """What is wrong with a count given on the command line, or None."""
    if args.reps is not None and args.reps < 1:
        return f"--reps must be >= 1, got {args.reps}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if any(p < 0 for p in args.prompts or []):
        return f"--prompts must be >= 0, got {args.prompts}"
    if args.shape is not None and any(x < 1 for x in args.shape):
        return f"--shape B H N d must all be >= 1, got {args.shape}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, nargs="+", default=None, help="default 50 200")
    parser.add_argument(
        "--sets", nargs="+", default=["shared", "per-image"], choices=["shared", "per-image"]
    )
    parser.add_argument(
        "--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"]
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=None,
        metavar=("B", "H", "N", "d"),
        help="default 64 12 197 64 on a GPU, 8 12 197 64 on a CPU",
    )
    parser.add_argument(
        "--key-bias",
        default="none",
        choices=["none", "table", "full"],
        help="an image-key bias: (1, H, N, N) as Swin's relative-position bias, or (B, H, N, N) "
        "with its shift mask (N_k = N)",
    )
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument(
        "--reps", type=int, default=None, help="CPU repetitions (median), default 7"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="B 2 H 2 N 17 d 16, P 3, 2 reps, where --shape, --prompts, --reps do not say",
    )
    parser.add_argument("--out", default=None, help="default benchmarks/results/<device>/op")
    args = parser.parse_args(argv)
    problem = check_device(args.device) or _check_counts(args)
    if problem:
        parser.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:  # what the options given say still holds
        args.shape = args.shape or [2, 2, 17, 16]
        args.prompts, args.reps = args.prompts or [3], args.reps or 2
    args.prompts, args.reps = args.prompts or [50, 200], args.reps or 7
    if args.shape is None:
        args.shape = [64, 12, 197, 64] if args.device.startswith("cuda") else [8, 12, 197, 64]
    device = torch.device(args.device)
    env = environment(device)
    if args.out is None:
        args.out = device_folder(env, "op")
    problem = prepare_out(args.out, OUTPUTS)
    if problem:
        parser.error(problem)
    rows = run(args)
    text = markdown(rows, env)
    Path(args.out, "report.md").write_text(text)
    Path(args.out, "report.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
