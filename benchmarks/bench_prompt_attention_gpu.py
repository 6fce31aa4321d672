"""GPU benchmark of the prompt_attention op: Triton vs cat + SDPA (flash) vs cat + FlexAttention.

ViT-B/16 shapes by default: B 64, H 12, N 197, d 64, P in {10, 50, 100, 200}, one shared prompt
set, q/k/v as views of a (B, N, 3, H, d) buffer like timm's; forward, and forward + backward to
q, k, v and the prompts. Time: ``triton.testing.do_bench`` quantiles 0.2/0.5/0.8 (CUDA events,
L2 flushed between repetitions); TFLOP/s on the median with the attention FLOPs of the prompted
sequence (forward 4·B·H·N·(N+P)·d, backward 2.5× that); peak memory of one call above what was
allocated before it. Writes JSON and Markdown with device and versions.

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


def _cat(q, k, v, pk, pv):
    b = q.shape[0]
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    return keys, values


def _sdpa_flash(q, k, v, pk, pv):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    keys, values = _cat(q, k, v, pk, pv)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, keys, values)


def _flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, pk, pv):
        keys, values = _cat(q, k, v, pk, pv)
        return compiled(q, keys, values)

    return run


def _triton(q, k, v, pk, pv):
    return prompt_attention(q, k, v, pk, pv, backend="triton")[0]


def _inputs(b, h, n, d, p, dtype, dev):
    qkv = torch.randn(b, n, 3, h, d, device=dev, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = (x.detach().requires_grad_() for x in qkv.unbind(0))
    pk, pv = (torch.randn(1, h, p, d, device=dev, dtype=dtype, requires_grad=True) for _ in "kv")
    # the gradient arriving from timm's head merge has the (B, N, H, d) layout
    dout = torch.randn(b, n, h, d, device=dev, dtype=dtype).transpose(1, 2)
    return (q, k, v, pk, pv), dout


def _peak_mib(call) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--impls", nargs="+", default=["triton", "sdpa_flash", "flex"])
    parser.add_argument("--out", default=None, help="default benchmarks/results/<device>/op")
    args = parser.parse_args()
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    b, h, n, d = args.batch, args.heads, args.tokens, args.head_dim
    impls = {"triton": _triton, "sdpa_flash": _sdpa_flash, "flex": _flex()}
    impls = {k: v for k, v in impls.items() if k in args.impls and v is not None}
    rows = []
    for p in args.prompts:
        inputs, dout = _inputs(b, h, n, d, p, dtype, dev)
        flop_fwd = 4 * b * h * n * (n + p) * d
        for name, fn in impls.items():
            for mode in ("fwd", "fwd+bwd"):

                def call(fn=fn, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            return fn(*inputs)
                    out = fn(*inputs)
                    return torch.autograd.grad(out, inputs, dout)

                call()  # compile / autotune outside the timing
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
                        "peak_mib": _peak_mib(call),
                    }
                )
                print(rows[-1], flush=True)
    base = {(r["prompts"], r["mode"]): r["ms_median"] for r in rows if r["impl"] == "sdpa_flash"}
    for r in rows:
        ref = base.get((r["prompts"], r["mode"]))
        r["speed_vs_sdpa_flash"] = ref / r["ms_median"] if ref else None
    env = environment(dev)
    out = args.out or os.path.join("benchmarks", "results", env["device"].replace(" ", "_"), "op")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"prompt_attention_{args.dtype}")
    with open(stem + ".json", "w") as f:
        record = {"env": env, "shape": [b, h, n, d], "dtype": args.dtype, "rows": rows}
        json.dump(record, f, indent=2)
    lines = [
        f"prompt_attention on {env['device']}, {args.dtype}, B{b} H{h} N{n} d{d}, shared set; "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"commit {env['commit']}, {env['date']}",
        "",
        "| P | impl | mode | ms median [p20, p80] | × cat+SDPA flash | TFLOP/s | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["speed_vs_sdpa_flash"] is None else f"{r['speed_vs_sdpa_flash']:.2f}"
        lines.append(
            f"| {r['prompts']} | {r['impl']} | {r['mode']} | {r['ms_median']:.3f} "
            f"[{r['ms_p20']:.3f}, {r['ms_p80']:.3f}] | {ratio} | {r['tflops']:.1f} "
            f"| {r['peak_mib']:.0f} |"
        )
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
