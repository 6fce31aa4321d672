"""First check of the ``cpp`` backend's CUDA path on a GPU: errors against the fp32 reference, then
speed against cat + SDPA.

The CUDA path is a cascade over PyTorch's fused attention kernels orchestrated in C++
(``csrc/cascade/``); it has only been compile-checked and tested through its CPU twin. This script
is what a GPU session runs first, in one command, each row written as soon as it is measured:

1. the build (``fastprompt info``'s extension rows) and whether the CUDA kernels load;
2. errors at ViT-B/16 shapes (B 64, H 12, N 197, d 64; P 50 and 200; a shared set, per-image sets,
   a shared set cut by a length) in bf16 and fp32: max abs error of out, lse, dq, dk, dv and the
   prompt gradients against the fp32 reference, next to PyTorch's own same-dtype error (cat +
   SDPA), and the scored backward's terms and gate at a smaller batch;
3. times (median, 20th and 80th percentiles, ``triton.testing.do_bench`` or CUDA events) of the
   forward and forward + backward: cpp, cat + SDPA (PyTorch's default kernel choice), the torch
   backend.

    python benchmarks/bench_cpp_cuda.py --out benchmarks/results/<device>/cpp_cuda
    python benchmarks/bench_cpp_cuda.py --dry-run     # CPU, tiny shapes, the cascade's CPU twin

Rows go to ``rows.jsonl`` as they come and to ``report.md`` at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastprompt.bench import environment  # noqa: E402
from fastprompt.kernels import cpp  # noqa: E402
from fastprompt.ops import prompt_attention, prompt_attention_ref  # noqa: E402
from fastprompt.ops.scores import prompt_scores_ref  # noqa: E402
from fastprompt.outputs import Outputs, prepare_out  # noqa: E402

NAMES = ("out", "lse", "dq", "dk", "dv", "dprompt_k", "dprompt_v")
OUTPUTS = Outputs(
    tool="benchmarks/bench_cpp_cuda.py",
    rows="rows.jsonl",
    row_keys=frozenset({"step"}),
    others=("report.md",),
)


class _Cpp(torch.autograd.Function):
    """The extension's schemas under autograd (``cascade`` picks the CPU twin for a dry run)."""

    @staticmethod
    def forward(ctx, q, k, v, pk, pv, index, lengths, prefix):
        ops = torch.ops.fastprompt_ext
        out, lse = getattr(ops, f"{prefix}_fwd")(q, k, v, pk, pv, index, lengths, 0.125)
        ctx.save_for_backward(q, k, v, pk, pv, index, lengths, out, lse)
        ctx.prefix = prefix
        return out, lse

    @staticmethod
    def backward(ctx, dout, _):
        q, k, v, pk, pv, index, lengths, out, lse = ctx.saved_tensors
        bwd = getattr(torch.ops.fastprompt_ext, f"{ctx.prefix}_bwd")
        g = bwd(dout, q, k, v, pk, pv, index, lengths, out, lse, 0.125, None, None)
        return g[0], g[1], g[2], g[3].to(pk.dtype), g[4].to(pv.dtype), None, None, None


def _inputs(b, h, n, d, t, p, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(device, dtype).permute(2, 0, 3, 1, 4)
    pk = torch.randn(t, h, p, d, generator=g).to(device, dtype)
    pv = torch.randn(t, h, p, d, generator=g).to(device, dtype)
    dout = torch.randn(b, h, n, d, generator=g).to(device, dtype)
    return (*qkv.unbind(0), pk, pv), dout


def _cat_sdpa(q, k, v, pk, pv, index, lengths):
    sets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if index is None else index
    keys, values = torch.cat([pk[sets], k], 2), torch.cat([pv[sets], v], 2)
    mask = None
    if lengths is not None:
        p = pk.shape[2]
        valid = torch.arange(p, device=q.device) < lengths[sets].unsqueeze(1)
        mask = torch.cat([valid, valid.new_ones(q.shape[0], k.shape[2])], 1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.125)
    return out, None


def _grads(fn, tensors, dout):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*tensors)
    return (out, lse, *torch.autograd.grad(out, tensors, dout))


def _err(a, e):
    return None if a is None or e is None else (a.double() - e.double()).abs().max().item()


def _cases(dry):
    b, h, n, d = (2, 2, 9, 16) if dry else (64, 12, 197, 64)
    for p in (3,) if dry else (50, 200):
        yield dict(b=b, h=h, n=n, d=d, t=1, p=p, sets="shared", index=None, lengths=None)
        yield dict(b=b, h=h, n=n, d=d, t=b, p=p, sets="per-image", index="arange", lengths=None)
        yield dict(b=b, h=h, n=n, d=d, t=1, p=p, sets="shared, cut", index=None, lengths="half")


def _materialise(case, device):
    index = torch.arange(case["b"], device=device) if case["index"] == "arange" else None
    lengths = torch.tensor([case["p"] // 2], device=device) if case["lengths"] == "half" else None
    return index, lengths


def check_errors(prefix, device, dtypes, dry, emit):
    for dtype in dtypes:
        for case in _cases(dry):
            index, lengths = _materialise(case, device)
            inputs, dout = _inputs(
                case["b"], case["h"], case["n"], case["d"], case["t"], case["p"], dtype, device
            )
            ref = _grads(
                lambda *a: prompt_attention_ref(*a, index, lengths, 0.125),
                [x.float() for x in inputs],
                dout.float(),
            )
            got = _grads(lambda *a: _Cpp.apply(*a, index, lengths, prefix), inputs, dout)
            same = _grads(lambda *a: _cat_sdpa(*a, index, lengths), inputs, dout)
            row = {"step": "errors", "dtype": str(dtype), **case}
            for i, name in enumerate(NAMES):
                row[name] = {"cpp": _err(got[i], ref[i]), "pytorch": _err(same[i], ref[i])}
            emit(row)
    _check_scores(prefix, device, dtypes, dry, emit)


def _check_scores(prefix, device, dtypes, dry, emit):
    b, h, n, d, t, p = (2, 2, 9, 16, 2, 3) if dry else (8, 12, 197, 64, 8, 50)
    for dtype in dtypes:
        inputs, dout = _inputs(b, h, n, d, t, p, dtype, device, seed=1)
        q, k, v, pk, pv = inputs
        index = torch.arange(b, device=device) % t
        u = torch.randn(2, t, h, p, d, device=device)
        ops = torch.ops.fastprompt_ext
        out, lse = getattr(ops, f"{prefix}_fwd")(q, k, v, pk, pv, index, None, 0.125)
        res = getattr(ops, f"{prefix}_bwd")(
            dout, q, k, v, pk, pv, index, None, out, lse, 0.125, u, u
        )
        pk_seq = pk.float()[index].clone().requires_grad_()
        pv_seq = pv.float()[index].clone().requires_grad_()
        qf, kf, vf = q.float(), k.float(), v.float()
        ref_out, ref_lse = prompt_attention_ref(
            qf, kf, vf, pk_seq, pv_seq, torch.arange(b, device=device), None, 0.125
        )
        gk, gv = torch.autograd.grad(ref_out, (pk_seq, pv_seq), dout.float())
        delta = (dout.float() * ref_out).sum(-1)
        terms, gate = prompt_scores_ref(
            qf, pk.float(), pv.float(), ref_lse, delta, gk, gv, u, u, 0.125, index
        )
        emit(
            {
                "step": "scores",
                "dtype": str(dtype),
                "shape": [b, h, n, d, t, p],
                "terms_error": _err(res[5], terms),
                "terms_scale": terms.abs().max().item(),
                "gate_error": _err(res[6], gate),
                "gate_scale": gate.abs().max().item(),
            }
        )


def _time(fn, device, reps):
    if device == "cuda":
        try:
            from triton.testing import do_bench

            q20, q50, q80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8], rep=reps * 10)
            return {"median": q50, "p20": q20, "p80": q80}
        except ImportError:
            pass
    times = []
    for _ in range(3):
        fn()
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median": statistics.median(times), "p20": qs[0], "p80": qs[3]}


def time_paths(prefix, device, dtypes, dry, reps, emit):
    impls = {
        "cpp": lambda index, lengths: lambda *a: _Cpp.apply(*a, index, lengths, prefix),
        "cat+sdpa": lambda index, lengths: lambda *a: _cat_sdpa(*a, index, lengths),
        "torch backend": lambda index, lengths: (
            lambda *a: prompt_attention(*a, index, lengths, 0.125, backend="torch")
        ),
    }
    for dtype in dtypes:
        for case in _cases(dry):
            index, lengths = _materialise(case, device)
            inputs, dout = _inputs(
                case["b"], case["h"], case["n"], case["d"], case["t"], case["p"], dtype, device
            )
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            for mode in ("fwd", "fwd+bwd"):
                row = {"step": "time", "dtype": str(dtype), "mode": mode, **case, "ms": {}}
                for name, make in impls.items():
                    fn = make(index, lengths)

                    def call(fn=fn, mode=mode):
                        if mode == "fwd":
                            with torch.no_grad():
                                fn(*leaves)
                        else:
                            out, _ = fn(*leaves)
                            torch.autograd.grad(out, leaves, dout)

                    row["ms"][name] = _time(call, device, reps)
                emit(row)


def _markdown(rows, env):
    lines = ["# cpp backend, CUDA path: first check", "", f"`{json.dumps(env)}`", ""]
    lines += ["## Errors vs the fp32 reference (max abs; PyTorch's same-dtype in brackets)", ""]
    lines += ["| dtype | P | sets | " + " | ".join(NAMES) + " |", "|" + "---|" * (3 + len(NAMES))]
    for r in rows:
        if r["step"] == "errors":
            cells = []
            for n in NAMES:
                c, t = r[n]["cpp"], r[n]["pytorch"]
                cells.append("-" if c is None else f"{c:.2e} [{'-' if t is None else f'{t:.2e}'}]")
            lines.append(f"| {r['dtype']} | {r['p']} | {r['sets']} | " + " | ".join(cells) + " |")
    lines += ["", "## Times (ms, median [p20, p80]); cat+sdpa / cpp", ""]
    lines += ["| dtype | P | sets | pass | cpp | cat+sdpa | torch backend | ratio |"]
    lines += ["|" + "---|" * 8]
    for r in rows:
        if r["step"] == "time":
            ms = r["ms"]
            cell = {k: f"{v['median']:.3f} [{v['p20']:.3f}, {v['p80']:.3f}]" for k, v in ms.items()}
            ratio = ms["cat+sdpa"]["median"] / ms["cpp"]["median"]
            lines.append(
                f"| {r['dtype']} | {r['p']} | {r['sets']} | {r['mode']} | {cell['cpp']} | "
                f"{cell['cat+sdpa']} | {cell['torch backend']} | {ratio:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpp_cuda"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, CPU twin")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device, prefix = ("cpu", "cascade_attention") if args.dry_run else ("cuda", "prompt_attention")
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device; --dry-run checks the script on the CPU")
    problem = prepare_out(args.out, OUTPUTS)
    if problem:
        parser.error(problem)
    out = Path(args.out)
    rows: list[dict] = []
    sink = open(out / "rows.jsonl", "w")  # appended to as rows come, closed at the end

    def emit(row):
        rows.append(row)
        sink.write(json.dumps(row) + "\n")
        sink.flush()
        print(json.dumps(row), flush=True)

    info = cpp.build_info()
    emit({"step": "build", **{k: str(v) for k, v in info.items()}})
    why = cpp.device_availability(device)
    if why is not None:
        emit({"step": "build", "unavailable": why})
        return 1
    dtypes = (torch.float32,) if args.dry_run else (torch.bfloat16, torch.float32)
    check_errors(prefix, device, dtypes, args.dry_run, emit)
    time_paths(prefix, device, dtypes, args.dry_run, 3 if args.dry_run else args.reps, emit)
    sink.close()
    (out / "report.md").write_text(_markdown(rows, environment(torch.device(device))))
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
