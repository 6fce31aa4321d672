"""GPU benchmark of the prompt_attention op: Triton vs the reference (cat + SDPA) vs FlexAttention.

ViT-B/16 shapes: B 64, H 12, N 197, d 64, P in {10, 50, 100, 200}, fp16/bf16, forward and
forward+backward; time quantiles (0.2/0.5/0.8) from ``triton.testing.do_bench``, TFLOP/s and peak
memory. Writes JSON and Markdown under ``benchmarks/results/<device>/``.

    python benchmarks/bench_prompt_attention_gpu.py [--dtype bfloat16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from fastprompt.bench import environment
from fastprompt.ops import prompt_attention


def _reference(q, k, v, pk, pv):
    b = q.shape[0]
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    return F.scaled_dot_product_attention(q, keys, values)


def _flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention)

    def run(q, k, v, pk, pv):
        b = q.shape[0]
        keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
        values = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
        return compiled(q, keys, values)

    return run


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    b, h, n, d = args.batch, 12, 197, 64
    impls = {
        "triton": lambda *a: prompt_attention(*a, backend="triton")[0],
        "reference": _reference,
    }
    flex = _flex()
    if flex is not None:
        impls["flex"] = flex
    rows = []
    for p in args.prompts:
        qkv = torch.randn(b, n, 3, h, d, device=dev, dtype=dtype).permute(2, 0, 3, 1, 4)
        q, k, v = (t.requires_grad_() for t in (x.detach() for x in qkv.unbind(0)))
        pk, pv = (
            torch.randn(1, h, p, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(2)
        )
        dout = torch.randn(b, h, n, d, device=dev, dtype=dtype)
        flop_fwd = 4 * b * h * n * (n + p) * d
        for name, fn in impls.items():
            for mode in ("fwd", "fwd+bwd"):

                def call(fn=fn, mode=mode):
                    out = fn(q, k, v, pk, pv)
                    if mode == "fwd+bwd":
                        torch.autograd.grad(out, (q, k, v, pk, pv), dout)

                torch.cuda.reset_peak_memory_stats()
                q20, q50, q80 = triton.testing.do_bench(call, quantiles=[0.2, 0.5, 0.8])
                flop = flop_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
                rows.append(
                    {
                        "prompts": p,
                        "impl": name,
                        "mode": mode,
                        "ms_p20": q20,
                        "ms_median": q50,
                        "ms_p80": q80,
                        "tflops": flop / (q50 * 1e-3) / 1e12,
                        "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                    }
                )
                print(rows[-1])
    env = environment(dev)
    out = args.out or os.path.join(
        "benchmarks", "results", env["device"].replace(" ", "_"), "prompt_attention"
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"op_{args.dtype}.json"), "w") as f:
        json.dump(
            {"env": env, "shape": [b, h, n, d], "dtype": args.dtype, "rows": rows}, f, indent=2
        )
    lines = [
        f"prompt_attention on {env['device']}, {args.dtype}, B{b} H{h} N{n} d{d}; "
        f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}",
        "",
        "| P | impl | mode | ms median [p20, p80] | TFLOP/s | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompts']} | {r['impl']} | {r['mode']} | {r['ms_median']:.3f} "
            f"[{r['ms_p20']:.3f}, {r['ms_p80']:.3f}] | {r['tflops']:.1f} | {r['peak_mib']:.0f} |"
        )
    with open(os.path.join(out, f"op_{args.dtype}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
