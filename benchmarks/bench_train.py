"""Training throughput of ``fastprompt train``: fastprompt's VPT vs naive VPT, eager vs compiled.

Runs the real command (in this process) on a synthetic ImageFolder of JPEG images, so the numbers
include decoding, transforms, the loader, the optimiser step and the loop's bookkeeping. Each
variant trains 2 epochs; epoch 0 is warm-up (and compilation), epoch 1 is measured: images per
second and the share of the epoch the loop waited for its next batch. Variants run in turn within
each repetition; the report gives medians.

    python benchmarks/bench_train.py [--quick] [--batch 16] [--steps 3] [--workers 1] [--out DIR]

Defaults: ViT-B/16 (random init: weights do not change the speed), VPT-deep with 200 prompts,
variants fused / naive / fused+compile / naive+compile.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from fastprompt.bench import environment
from fastprompt.cli import main as cli
from fastprompt.cli.train_checks import check_counts, check_device
from fastprompt.outputs import Outputs, prepare_out

VARIANTS = ("fused", "naive", "fused+compile", "naive+compile")


def write_jpegs(root: str, count: int, classes: int, size: int, seed: int = 0) -> None:
    """``count`` JPEG images in ImageFolder layout (smooth random colour fields, ImageNet-sized)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        image.save(os.path.join(folder, f"{i}.jpg"), quality=90)


OUTPUTS = Outputs(
    tool="benchmarks/bench_train.py",
    report="train_throughput.json",
    keys=frozenset({"env", "config", "rows", "minutes"}),
    others=("train_throughput.md",),
)


def one_run(args, variant: str, data: str, val: str, out: str) -> dict:
    impl, _, compiled = variant.partition("+")
    argv = ["train", "--model", args.model, "--no-pretrained", *args.model_args]
    argv += ["--data", data, "--val", val, "--prompts", str(args.prompts), "--impl", impl]
    argv += ["--epochs", "2", "--batch-size", str(args.batch), "--workers", str(args.workers)]
    argv += ["--precision", args.precision, "--device", args.device]
    argv += ["--no-progress", "--quiet", "--out", out]
    if compiled:
        argv.append("--compile")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        code = cli(argv)
    if code != 0:
        raise SystemExit(f"fastprompt {' '.join(argv)} failed ({code}):\n{said.getvalue()}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    last = rows[-1]
    return {
        "images_per_s": last["images_per_s"],
        "data_wait": last["data_wait"],
        "epoch_s": last["time_s"],
        "warmup_epoch_s": rows[0]["time_s"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="training steps per epoch")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--image-size", type=int, default=256, help="stored JPEG size")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, batch 4, 1 rep")
    parser.add_argument("--out", default=None, help="folder for the report")
    args = parser.parse_args(argv)
    problem = check_device(args.device) or check_counts(
        args, ("prompts", "batch", "steps", "reps", "image_size")
    )
    if not problem and args.workers < 0:
        problem = f"--workers must be >= 0, got {args.workers}"
    problem = problem or (args.out and prepare_out(args.out, OUTPUTS))
    if problem:
        parser.error(problem)
    args.model_args = []
    if args.quick:
        args.model, args.prompts, args.batch, args.steps, args.reps = (
            "vit_tiny_patch16_224",
            8,
            4,
            2,
            1,
        )
        args.model_args = ["--model-args", "img_size=32", "patch_size=8", "depth=2"]
        args.image_size = 48
    device = torch.device(args.device)
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        data, val = os.path.join(tmp, "train"), os.path.join(tmp, "val")
        classes = min(10, args.batch * args.steps)
        write_jpegs(data, args.batch * args.steps, classes, args.image_size)
        write_jpegs(val, classes, classes, args.image_size, seed=1)
        t0 = time.time()
        for rep in range(args.reps):
            for variant in args.variants:
                out = os.path.join(tmp, f"run-{rep}-{variant}")
                results[variant].append(one_run(args, variant, data, val, out))
                print(rep, variant, results[variant][-1], flush=True)
    rows = []
    for variant, runs in results.items():
        rows.append(
            {
                "variant": variant,
                "images_per_s": statistics.median(r["images_per_s"] for r in runs),
                "data_wait": statistics.median(r["data_wait"] for r in runs),
                "epoch_s": statistics.median(r["epoch_s"] for r in runs),
                "warmup_epoch_s": statistics.median(r["warmup_epoch_s"] for r in runs),
                "runs": runs,
            }
        )
    by = {r["variant"]: r for r in rows}
    env = environment(device)
    report = {
        "env": env,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "minutes": (time.time() - t0) / 60,
    }
    lines = [
        f"`fastprompt train` throughput: {args.model}, VPT-deep {args.prompts} prompts, batch "
        f"{args.batch}, {args.steps} steps per epoch, {args.workers} loader worker(s), "
        f"{args.precision}; {env['device']}; torch {env['torch']}, timm {env['timm']}, commit "
        f"{env['commit']}, {env['date']}. Median of {args.reps} runs (epoch 1; epoch 0 warms up "
        "and compiles).",
        "",
        "| variant | images/s | vs naive (eager) | data wait | epoch s | warm-up epoch s |",
        "|---|---|---|---|---|---|",
    ]
    naive = by.get("naive", {}).get("images_per_s")
    for r in rows:
        ratio = f"{r['images_per_s'] / naive:.2f}x" if naive else "-"
        lines.append(
            f"| {r['variant']} | {r['images_per_s']:.2f} | {ratio} | {100 * r['data_wait']:.1f} % "
            f"| {r['epoch_s']:.2f} | {r['warmup_epoch_s']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(os.path.join(args.out, "train_throughput.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "train_throughput.md"), "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}/train_throughput.json and .md")


if __name__ == "__main__":
    main()
