"""Prompt Condensation's cost: the scoring pass against one training epoch, and condensed latency.

For a VPT-deep model (ViT-B/16, 200 prompts per block by default) and one dataset in memory:

- one training epoch of the loop ``fastprompt train`` runs (:class:`fastprompt.train.Trainer`:
  forward, backward, SGD step per batch) against one scoring pass over the same batches
  (:func:`fastprompt.score_prompts`: forward + backward per batch, the scores fused into the
  prompt-attention backward) for ``taylor``, ``taylor_normed`` and ``gate``. The goal is a ratio
  of at most 1.1: scoring is one forward + backward per batch, as training is. Timed in turn
  within each repetition, medians reported.
- inference latency of the condensed models (``taylor_normed`` selection, global) at 10/30/50 %
  kept, against the full model and the prompt-free backbone (fastprompt's fused path inside
  ``frozen_prompts()``, as ``fastprompt evaluate`` runs it).

    python benchmarks/bench_train_condense.py [--quick] [--images 64] [--batch 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import timm
import torch

import fastprompt
from fastprompt.bench import environment, summarize, time_fn
from fastprompt.cli.train_checks import check_counts, check_device
from fastprompt.outputs import Outputs, prepare_out
from fastprompt.train import Trainer, get_recipe

SCORES = ("taylor", "taylor_normed", "gate")
OUTPUTS = Outputs(
    tool="benchmarks/bench_train_condense.py",
    report="condense_cost.json",
    keys=frozenset({"env", "config", "cost", "times", "latency", "minutes"}),
    others=("condense_cost.md",),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--images", type=int, default=64, help="training set size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0, help="VPT prompt dropout")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--latency-batch", type=int, default=None, help="default --batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, 8 images, 1 rep")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    problem = check_device(args.device) or check_counts(
        args, ("prompts", "images", "batch", "reps", "latency_batch")
    )
    if not problem and not all(0 < k <= 1 for k in args.keep):
        problem = f"--keep takes shares of the prompts in (0, 1], got {args.keep}"
    if not problem and not 0 <= args.dropout < 1:
        problem = f"--dropout must be in [0, 1), got {args.dropout}"
    problem = problem or (args.out and prepare_out(args.out, OUTPUTS))
    if problem:
        parser.error(problem)
    kw = {}
    if args.quick:
        args.model, args.prompts, args.images, args.batch, args.reps = (
            "vit_tiny_patch16_224",
            8,
            8,
            4,
            1,
        )
        kw = {"img_size": 32, "patch_size": 8, "depth": 2}
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10, **kw).to(device)
    size = model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(min(args.batch, args.images - i), 3, *size, generator=g).to(device),
            torch.randint(0, 10, (min(args.batch, args.images - i),), generator=g).to(device),
        )
        for i in range(0, args.images, args.batch)
    ]
    prompted = fastprompt.vpt(model, args.prompts, dropout=args.dropout)
    recipe = get_recipe("vpt").override(epochs=10, warmup_epochs=0, batch_size=args.batch)
    trainer = Trainer(prompted, recipe, progress=False)

    jobs = {"train epoch": lambda: trainer.train_epoch(data, 1)}
    for score in SCORES:
        jobs[f"score {score}"] = lambda s=score: fastprompt.score_prompts(
            prompted, data, s, progress=False
        )
    for fn in jobs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    t_start = time.time()
    for _ in range(args.reps):
        for name, fn in jobs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
            print(name, f"{times[name][-1]:.3f} s", flush=True)
    epoch = statistics.median(times["train epoch"])
    cost = [
        {"pass": name, "median_s": statistics.median(t), "vs_epoch": statistics.median(t) / epoch}
        for name, t in times.items()
    ]

    scores = fastprompt.score_prompts(prompted, data, "taylor_normed", progress=False)
    x = data[0][0][: args.latency_batch or args.batch]
    reps = max(args.reps, 3)

    def latency(net) -> dict:
        net.eval()
        frozen = net.frozen_prompts() if hasattr(net, "frozen_prompts") else _null()
        with frozen, torch.inference_mode():
            return summarize(time_fn(lambda: net(x), device, reps))

    prompted.eval()
    full = latency(prompted)
    free = latency(prompted.model)
    lat = [{"keep": 0.0, "model": "prompt-free", "blocks": [], **free}]
    for keep in args.keep:
        condensed = fastprompt.condense(prompted, fastprompt.select_prompts(scores, keep))
        lat.append(
            {
                "keep": keep,
                "model": "condensed",
                "blocks": list(condensed.config.layer_counts),
                **latency(condensed),
            }
        )
    lat.append({"keep": 1.0, "model": "full", "blocks": [args.prompts] * len(model.blocks), **full})
    env = environment(device)
    lines = [
        f"Prompt Condensation cost: {args.model}, VPT-deep {args.prompts} prompts/block, "
        f"{args.images} images in batches of {args.batch}, prompt dropout {args.dropout}; "
        f"{env['device']}; torch {env['torch']}, timm {env['timm']}, commit {env['commit']}, "
        f"{env['date']}. Median of {args.reps} runs, timed in turn.",
        "",
        "| pass | seconds | vs one training epoch |",
        "|---|---|---|",
        *(f"| {c['pass']} | {c['median_s']:.2f} | {c['vs_epoch']:.2f}x |" for c in cost),
        "",
        f"Condensed latency (taylor_normed, global), batch {x.shape[0]}, fused path inside "
        "frozen_prompts(); median [p20, p80] of "
        f"{reps} runs:",
        "",
        "| kept | prompts per block | ms | vs full | vs prompt-free |",
        "|---|---|---|---|---|",
    ]
    for row in lat:
        kept = "prompt-free" if row["model"] == "prompt-free" else f"{100 * row['keep']:.0f} %"
        lines.append(
            f"| {kept} | {row['blocks'] or '-'} | {1e3 * row['median_s']:.1f} "
            f"[{1e3 * row['p20_s']:.1f}, {1e3 * row['p80_s']:.1f}] "
            f"| {row['median_s'] / full['median_s']:.2f}x "
            f"| {row['median_s'] / free['median_s']:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        report = {
            "env": env,
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "cost": cost,
            "times": times,
            "latency": lat,
            "minutes": (time.time() - t_start) / 60,
        }
        with open(os.path.join(args.out, "condense_cost.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "condense_cost.md"), "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}/condense_cost.json and .md")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
