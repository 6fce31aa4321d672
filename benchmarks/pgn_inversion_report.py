"""How faithful PGN's prompt inversion is on real ViT architectures (random init: no download).

For each backbone, a PGN (16 prompts, ResNet-10, library 256) generates prompts for a few random
images; :func:`fastprompt.invert_prompts` maps them to pixel patches. The table gives whether the
inversion is exact (3·p² ≥ D and W full rank) or least squares, W's condition number, the relative
round-trip error (pixels → patch embedding → tokens, against the latent prompts), the share of
pixel values outside the valid normalised range, and the error once the patches are clamped to it
(what an RGB image can hold). With random weights these describe the mechanism, not a trained
model: pretrained patch embeddings have other condition numbers, and trained prompts other scales.

    python benchmarks/pgn_inversion_report.py [--out benchmarks/results/cpu-<cores>core/pgn]
"""

from __future__ import annotations

import argparse
import json
import os

import timm
import torch

import fastprompt
from fastprompt.bench import environment
from fastprompt.outputs import Outputs, cpu_folder, prepare_out

MODELS = ("vit_base_patch32_224", "vit_base_patch16_224", "vit_large_patch16_224")
OUTPUTS = Outputs(
    tool="benchmarks/pgn_inversion_report.py",
    report="inversion.json",
    keys=frozenset({"env", "rows"}),
    others=("inversion.md",),
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--out", default=cpu_folder("pgn"))
    args = p.parse_args(argv)
    problem = f"--images must be >= 1, got {args.images}" if args.images < 1 else None
    problem = problem or prepare_out(args.out, OUTPUTS)
    if problem:
        p.error(problem)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        prompted = fastprompt.pgn(model, num_prompts=16).eval()
        x = torch.randn(args.images, 3, *model.patch_embed.img_size)
        shown = fastprompt.invert_prompts(prompted, x)
        r = shown.report
        rows.append(
            {
                "model": name,
                "patch_dim": r.patch_dim,
                "embed_dim": r.embed_dim,
                "exact": r.exact,
                "rank": r.rank,
                "condition_number": r.condition_number,
                "relative_error": r.relative_error,
                "out_of_range": r.out_of_range,
                "clipped_relative_error": r.clipped_relative_error,
                "rows": shown.layout.rows,
                "per_row": shown.layout.per_row,
            }
        )
        prompted.unwrap()
    env = environment(torch.device("cpu"))
    lines = [
        f"PGN prompt inversion, random-init backbones and generator, 16 prompts, {args.images} "
        f"random images; torch {env['torch']}, timm {env['timm']}, commit {env['commit']}, "
        f"{env['date']}.",
        "",
        "| model | K = 3·p² | D | inversion | rank | cond(W) | round-trip rel. error | "
        "pixels out of range | error after clamping | prompt rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['patch_dim']} | {r['embed_dim']} | "
            f"{'exact' if r['exact'] else 'least squares'} | {r['rank']} | "
            f"{r['condition_number']:.1f} | {r['relative_error']:.2e} | "
            f"{100 * r['out_of_range']:.1f} % | {r['clipped_relative_error']:.2e} | "
            f"{r['rows']} of {r['per_row']} |"
        )
    report = "\n".join(lines)
    print(report)
    with open(os.path.join(args.out, "inversion.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "inversion.md"), "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
