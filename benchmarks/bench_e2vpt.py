"""E²VPT inference: fastprompt's fused path against the official computation and the prompt-free
model, at the official per-task prompt counts.

ViT-B/16 (random init); E²VPT with (visual, key-value) prompts (10, 5) (the official default and
most VTAB-1k tasks), (32, 5) (caltech101), (5, 5) (FGVC, cifar100, dsprites), (10, 10)
(patch_camelyon) and (1, 1) (oxford_flowers102), shared key-value prompts, deep, masks on. Timed
side by side in one process:

- ``fastprompt``: the fused path inside ``frozen_prompts()`` (as deployed): the visual prompts'
  keys/values once per model, the key-value prompts joined to them, no prompt rows;
- ``official``: ``impl="naive"``, every visual prompt a token of every block (the official
  computation; its key-value prompts joined after the qkv projection);
- ``prompt-free``: the timm model. Goal: fastprompt / prompt-free ≤ 1.05 at (10, 5).

    python benchmarks/bench_e2vpt.py [--batch 32] [--device cuda] [--out DIR]
    python benchmarks/bench_e2vpt.py --tiny   # a tiny model: checks that the script runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import timm
import torch

import fastprompt
from fastprompt.bench import environment, summarize, time_interleaved
from fastprompt.cli.train_checks import check_counts, check_device
from fastprompt.outputs import Outputs, device_folder, prepare_out

COUNTS = [(10, 5), (32, 5), (5, 5), (10, 10), (1, 1)]
OUTPUTS = Outputs(
    tool="benchmarks/bench_e2vpt.py",
    report="e2vpt.json",
    keys=frozenset({"env", "batch", "rows"}),
    others=("e2vpt.md",),
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=None, help="default 64 on a GPU, 32 on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="default 10 on a GPU, 3 on a CPU")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny ViT, batch 4, 2 reps unless given (a smoke run)"
    )
    args = parser.parse_args(argv)
    problem = check_device(args.device) or check_counts(args, ("batch", "reps"))
    if problem:
        parser.error(problem)
    device = torch.device(args.device)
    env = environment(device)
    out = None
    if args.out or not args.tiny:
        out = args.out or device_folder(env)
        problem = prepare_out(out, OUTPUTS)
        if problem:
            parser.error(problem)
    gpu = device.type == "cuda"
    batch = args.batch or (4 if args.tiny else 64 if gpu else 32)
    reps = args.reps or (2 if args.tiny else 10 if gpu else 3)
    kw: dict = {}
    if args.tiny:
        args.model, kw = "vit_tiny_patch16_224", dict(img_size=32, depth=2)
    torch.manual_seed(0)
    free = timm.create_model(args.model, pretrained=False, num_classes=100, **kw).to(device).eval()
    x = torch.randn(batch, 3, *free.patch_embed.img_size, device=device)
    rows = []
    for visual, kv in COUNTS:
        fast = fastprompt.e2vpt(copy.deepcopy(free), visual, kv).eval()
        naive = fastprompt.e2vpt(copy.deepcopy(free), visual, kv, impl="naive").eval()
        naive.load_state_dict(fast.state_dict())
        with torch.inference_mode(), fast.frozen_prompts():
            fns = {"fastprompt": lambda: fast(x), "official": lambda: naive(x)}
            fns["free"] = lambda: free(x)
            times = time_interleaved(fns, device, reps)
        row = {"visual": visual, "key_value": kv}
        row.update({name: summarize(t) for name, t in times.items()})
        rows.append(row)
        print(row)
    lines = [
        f"{args.model} (random init), E2VPT inference, batch {batch}; {env['device']}; torch "
        f"{env['torch']}, timm {env['timm']}, commit {env['commit']}, {env['date']}. Median "
        f"latency over {reps} runs.",
        "",
        "| visual / key-value | prompt-free ms | official ms | fastprompt ms "
        "| fastprompt / prompt-free | fastprompt / official |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, o, p = (r[k]["median_s"] for k in ("fastprompt", "official", "free"))
        lines.append(
            f"| {r['visual']} / {r['key_value']} | {1e3 * p:.1f} | {1e3 * o:.1f} | {1e3 * f:.1f} | "
            f"{f / p:.3f} | {f / o:.3f} |"
        )
    report = "\n".join(lines)
    print(report)
    if out is not None:
        with open(os.path.join(out, "e2vpt.json"), "w") as fh:
            json.dump({"env": env, "batch": batch, "rows": rows}, fh, indent=2)
        with open(os.path.join(out, "e2vpt.md"), "w") as fh:
            fh.write(report + "\n")
    return {"env": env, "rows": rows}


if __name__ == "__main__":
    main()
