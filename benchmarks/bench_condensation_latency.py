"""Latency of condensed VPT models, like Table 4 of the Prompt Condensation paper.

ViT-B/16 (random init), VPT-deep with P prompts per block, condensed to keep 10/20/30/40/50/100 %
with global and local selection; naive VPT vs fastprompt on the same condensed prompts, and the
prompt-free model, all in one process. The paper measures 64 images; that is the GPU default,
the CPU default is smaller.

    python benchmarks/bench_condensation_latency.py [--batch 64] [--device cuda] [--out DIR]

Selection uses ``taylor_normed`` scores from one batch of random images, so global selection
gives each block a different count as it would on real data; latency depends only on the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import timm
import torch

import fastprompt
from fastprompt.bench import environment, summarize, time_fn
from fastprompt.cli.train_checks import check_counts, check_device
from fastprompt.outputs import Outputs, device_folder, prepare_out

OUTPUTS = Outputs(
    tool="benchmarks/bench_condensation_latency.py",
    report="condensation_latency.json",
    keys=frozenset({"env", "batch", "prompts", "rows"}),
    others=("condensation_latency.md",),
)


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with a count or share given on the command line, or None."""
    problem = check_counts(args, ("prompts", "batch", "reps"))
    if problem:
        return problem
    if not all(0 < k <= 1 for k in args.keep):
        return f"--keep takes shares of the prompts in (0, 1], got {args.keep}"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch", type=int, default=None, help="default 64 on a GPU, 8 on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 1.0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    problem = check_device(args.device) or _check_args(args)
    if problem:
        parser.error(problem)
    device = torch.device(args.device)
    env = environment(device)
    out = args.out or device_folder(env)
    problem = prepare_out(out, OUTPUTS)
    if problem:
        parser.error(problem)
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 8)
    reps = args.reps or (10 if gpu else 3)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100).to(device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)
    prompted = fastprompt.vpt(model, args.prompts)
    y = torch.randint(0, 100, (min(batch, 4),), device=device)
    scores = fastprompt.score_prompts(prompted, [(x[: len(y)], y)], "taylor_normed", progress=False)

    def latency(net) -> dict:
        net.eval()
        # As deployed: a prompted model's prompt K/V once per model (fused path; the naive path
        # has nothing to cache).
        prompted_net = hasattr(net, "frozen_prompts")
        frozen = net.frozen_prompts() if prompted_net else contextlib.nullcontext()
        with torch.inference_mode(), frozen:
            return summarize(time_fn(lambda: net(x), device, reps))

    rows = [{"keep": 0.0, "scope": "-", "impl": "prompt-free", "blocks": [], **latency(model)}]
    for keep in args.keep:
        for scope in ("global", "local"):
            condensed = fastprompt.condense(
                prompted, fastprompt.select_prompts(scores, keep, scope)
            )
            counts = list(condensed.config.layer_counts)
            for impl in ("naive", "fused"):
                condensed.impl = impl
                rows.append(
                    {
                        "keep": keep,
                        "scope": scope,
                        "impl": impl,
                        "blocks": counts,
                        **latency(condensed),
                    }
                )
                print(rows[-1])
    free = rows[0]["median_s"]
    lines = [
        f"{args.model}, VPT-deep {args.prompts} prompts/block condensed; batch {batch}; "
        f"{env['device']}; torch {env['torch']}, timm {env['timm']}, commit {env['commit']}, "
        f"{env['date']}. Median latency [p20, p80] over {reps} runs.",
        "",
        "| keep | scope | naive VPT ms | fastprompt ms | fastprompt / naive "
        "| fastprompt / prompt-free |",
        "|---|---|---|---|---|---|",
        f"| 0 | - | {1e3 * free:.1f} (prompt-free) | | | 1 |",
    ]
    by = {(r["keep"], r["scope"], r["impl"]): r for r in rows}
    for keep in args.keep:
        for scope in ("global", "local"):
            n, f = by[(keep, scope, "naive")], by[(keep, scope, "fused")]
            lines.append(
                f"| {int(keep * 100)} % | {scope} | {1e3 * n['median_s']:.1f} | "
                f"{1e3 * f['median_s']:.1f} | {f['median_s'] / n['median_s']:.3f} | "
                f"{f['median_s'] / free:.3f} |"
            )
    report = "\n".join(lines)
    print(report)
    with open(os.path.join(out, "condensation_latency.json"), "w") as fh:
        json.dump({"env": env, "batch": batch, "prompts": args.prompts, "rows": rows}, fh, indent=2)
    with open(os.path.join(out, "condensation_latency.md"), "w") as fh:
        fh.write(report + "\n")


if __name__ == "__main__":
    main()
