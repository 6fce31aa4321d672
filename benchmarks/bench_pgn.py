"""PGN's cost: inference and a training step against the prompt-free model and against IIP.

For each backbone (ViT-B/32 and ViT-B/16 by default, random init), in one process, timed in turn
within every repetition: the prompt-free model, IIP with L prompts (the paper's baseline: the same
pipeline without a generator), and PGN with L prompts (the official ResNet-10, library of M). The
training step is forward + backward to what trains (PGN: generator, library, head; IIP: prompts,
head; prompt-free: the head). The generator's own share is timed on its own (forward, and forward +
backward for training). The goal: PGN ≤ 1.15× IIP per training step.

    python benchmarks/bench_pgn.py [--models vit_base_patch32_224 vit_base_patch16_224]
        [--batch 8] [--reps 5] [--device cpu] [--out benchmarks/results/<device>/pgn]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import timm
import torch

import fastprompt
from fastprompt.bench import environment, summarize, time_interleaved
from fastprompt.cli.train_checks import check_counts, check_device
from fastprompt.outputs import Outputs, prepare_out
from fastprompt.sources.generators import generator_input

OUTPUTS = Outputs(
    tool="benchmarks/bench_pgn.py",
    report="pgn_speed.json",
    keys=frozenset({"env", "rows"}),
    others=("pgn_speed.md",),
)


def _step(model, x, params):
    def run():
        out = model(x)
        return torch.autograd.grad(out.float().logsumexp(-1).mean(), params)

    return run


def measure(name: str, batch: int, reps: int, device: torch.device, prompts: int, library: int):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=100).to(device).eval()
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)
    # One live wrapper per timm model: IIP and PGN each wrap their own copy of the same weights.
    iip = fastprompt.pgn(copy.deepcopy(model), prompts, library, generator=None)
    pgn = fastprompt.pgn(copy.deepcopy(model), prompts, library)
    gen = pgn.source.generator

    def generator_only(images):
        return gen(generator_input(images, pgn.config.resolution))

    iip.eval(), pgn.eval()
    with torch.inference_mode():
        infer = time_interleaved(
            {
                "free": lambda: model(x),
                "iip": lambda: iip(x),
                "pgn": lambda: pgn(x),
                "generator": lambda: generator_only(x),
            },
            device,
            reps,
        )
    iip.train(), pgn.train()
    train = time_interleaved(
        {
            "free": _step(model, x, list(model.get_classifier().parameters())),
            "iip": _step(iip, x, list(iip.trainable_parameters().values())),
            "pgn": _step(pgn, x, list(pgn.trainable_parameters().values())),
            "generator": _step(generator_only, x, list(gen.parameters())),
        },
        device,
        reps,
    )
    row = {"model": name, "batch": batch, "prompts": prompts, "library": library}
    for kind, times in (("infer", infer), ("train", train)):
        row[kind] = {k: summarize(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        row[f"{kind}_pgn_vs_iip"] = med["pgn"] / med["iip"]
        row[f"{kind}_pgn_vs_free"] = med["pgn"] / med["free"]
        row[f"{kind}_iip_vs_free"] = med["iip"] / med["free"]
        row[f"{kind}_generator_share"] = med["generator"] / med["pgn"]
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["vit_base_patch32_224", "vit_base_patch16_224"])
    p.add_argument("--batch", type=int, default=None, help="default 64 on a GPU, 8 on a CPU")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--library", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    problem = check_device(args.device) or check_counts(
        args, ("batch", "reps", "prompts", "library")
    )
    if problem:
        p.error(problem)
    device = torch.device(args.device)
    folder = (
        f"cpu-{torch.get_num_threads()}core"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    )
    out = args.out or os.path.join("benchmarks", "results", folder, "pgn")
    problem = prepare_out(out, OUTPUTS)
    if problem:
        p.error(problem)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    rows = [measure(m, batch, args.reps, device, args.prompts, args.library) for m in args.models]
    env = environment(device)
    lines = [
        f"PGN vs IIP vs prompt-free, L={args.prompts}, M={args.library}, ResNet-10 generator, "
        f"batch {batch}, fp32, {env['device']}; torch {env['torch']}, timm {env['timm']}, "
        f"commit {env['commit']}, {env['date']}. Medians of {args.reps} interleaved repetitions.",
        "",
        "| model | kind | prompt-free ms | IIP ms | PGN ms | PGN / IIP | PGN / free | "
        "generator share of PGN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for kind in ("infer", "train"):
            t = r[kind]
            lines.append(
                f"| {r['model']} | {'inference' if kind == 'infer' else 'training step'} | "
                f"{1e3 * t['free']['median_s']:.1f} | {1e3 * t['iip']['median_s']:.1f} | "
                f"{1e3 * t['pgn']['median_s']:.1f} | {r[f'{kind}_pgn_vs_iip']:.3f} | "
                f"{r[f'{kind}_pgn_vs_free']:.3f} | {100 * r[f'{kind}_generator_share']:.1f} % |"
            )
    report = "\n".join(lines)
    print(report)
    with open(os.path.join(out, "pgn_speed.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2)
    with open(os.path.join(out, "pgn_speed.md"), "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
