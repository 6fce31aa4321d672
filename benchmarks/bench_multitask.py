"""Mixed-task batches against per-task batches, a single-task batch and the prompt-free model.

ViT-B/16 (random init); k tasks (default 2, 8 and 32) of VPT-deep prompts whose counts are spread
evenly over [50, 200], each with its own 100-way head; a batch of 32 images assigned to the tasks
in turn. Timed side by side in one process, inference, every prompted model inside
``frozen_prompts()`` as deployed:

- ``mixed``: one :class:`fastprompt.MultiTaskViT` pass over the whole batch (a task per image);
- ``per-task``: the batch split by task, each part through its task's own model, one after
  another (the alternative without mixed batches);
- ``single``: one VPT-deep model with the tasks' mean prompt count on the whole batch: ``mixed /
  single`` is the cost of per-image prompt sets (goal for 8 tasks: throughput ≥ 0.95×);
- ``prompt-free``: the timm model.

Memory: the bytes of the parameters one mixed model holds (one backbone, every task's prompts and
head) against one model per task (k backbones), and on a GPU the peak memory of a mixed pass.

    python benchmarks/bench_multitask.py [--tasks 2 8 32] [--batch 32] [--device cuda] [--out DIR]
    python benchmarks/bench_multitask.py --tiny   # a tiny model: checks that the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import timm
import torch

import fastprompt
from fastprompt.bench import environment, summarize, time_interleaved
from fastprompt.cli.train_checks import check_counts, check_device
from fastprompt.methods import vpt as vpt_method
from fastprompt.outputs import Outputs, device_folder, prepare_out

OUTPUTS = Outputs(
    tool="benchmarks/bench_multitask.py",
    report="multitask.json",
    keys=frozenset({"env", "results"}),
    others=("multitask.md",),
)


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _counts(k: int, low: int, high: int) -> list[int]:
    return [round(low + (high - low) * i / max(k - 1, 1)) for i in range(k)]


def run_tasks(model_name, model_kw, k, batch, device, reps, low, high, classes) -> dict:
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False, num_classes=classes, **model_kw)
    base = base.to(device).eval()
    free = timm.create_model(model_name, pretrained=False, num_classes=classes, **model_kw)
    free.load_state_dict(base.state_dict())
    free = free.to(device).eval()
    counts = _counts(k, low, high)
    # The per-task models share one backbone (and head), so k of them fit in memory.
    tasks, first = {}, None
    for i, p in enumerate(counts):
        config = vpt_method.VPTConfig(num_prompts=p)
        task = vpt_method.build(base, config, head_init="keep", share_with=first).eval()
        first = task if first is None else first
        tasks[f"task{i}"] = task
    mixed = fastprompt.MultiTaskViT(tasks).eval()
    single_model = timm.create_model(model_name, pretrained=False, num_classes=classes, **model_kw)
    single_model.load_state_dict(base.state_dict())
    single = fastprompt.vpt(single_model.to(device), round(sum(counts) / k)).eval()
    size = base.patch_embed.img_size
    x = torch.randn(batch, 3, *size, device=device)
    index = torch.arange(batch, device=device) % k
    parts = [(tasks[f"task{t}"], (index == t).nonzero().flatten()) for t in range(k)]
    parts = [(m, rows) for m, rows in parts if rows.numel()]

    def per_task():
        for model, rows in parts:
            model(x[rows])

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        for model in [mixed, single, *tasks.values()]:
            stack.enter_context(model.frozen_prompts())
        fns = {
            "mixed": lambda: mixed(x, index),
            "per-task": per_task,
            "single": lambda: single(x),
            "prompt-free": lambda: free(x),
        }
        times = time_interleaved(fns, device, reps)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            mixed(x, index)
            peak = torch.cuda.max_memory_allocated(device)
    rows = {name: summarize(t) for name, t in times.items()}
    for r in rows.values():
        r["images_per_s"] = batch / r["median_s"]
    head = list(base.get_classifier().parameters())
    frozen = [p for p in base.parameters() if all(p is not h for h in head)]
    backbone_b = _bytes(frozen)
    prompts_b = [_bytes(list(m.source.parameters())) for m in tasks.values()]
    head_b = _bytes(head)
    mixed_b = _bytes(list(mixed.parameters()) + list(mixed.buffers()))
    return {
        "tasks": k,
        "prompt_counts": counts,
        "batch": batch,
        "rows": rows,
        "memory": {
            "backbone_bytes": backbone_b,
            "mixed_model_bytes": mixed_b,
            "one_model_per_task_bytes": k * (backbone_b + head_b) + sum(prompts_b),
            "peak_cuda_bytes_mixed_pass": peak,
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompts", type=int, nargs=2, default=[50, 200], metavar=("LOW", "HIGH"))
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="default 10 on a GPU, 3 on a CPU")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny ViT, 2 reps unless given (a smoke run)"
    )
    args = parser.parse_args(argv)
    problem = check_device(args.device) or check_counts(
        args, ("tasks", "batch", "prompts", "classes", "reps")
    )
    if not problem and args.prompts[0] > args.prompts[1]:
        problem = f"--prompts LOW HIGH needs LOW <= HIGH, got {args.prompts}"
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
    reps = args.reps or (2 if args.tiny else 10 if device.type == "cuda" else 3)
    model_kw: dict = {}
    if args.tiny:
        args.model = "vit_tiny_patch16_224"
        model_kw = dict(img_size=32, depth=2)
    results = [
        run_tasks(args.model, model_kw, k, args.batch, device, reps, *args.prompts, args.classes)
        for k in args.tasks
    ]
    lines = [
        f"{args.model} (random init), VPT-deep tasks of {args.prompts[0]}-{args.prompts[1]} "
        f"prompts, batch {args.batch}; {env['device']}; torch {env['torch']}, timm {env['timm']}, "
        f"commit {env['commit']}, {env['date']}. Median [p20, p80] over {reps} runs.",
        "",
        "| tasks | mixed img/s | per-task img/s | single-task img/s | prompt-free img/s "
        "| mixed / single | mixed / per-task | memory mixed MB | memory per-task models MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row, mem = r["rows"], r["memory"]
        mb = 2**20
        lines.append(
            f"| {r['tasks']} | {row['mixed']['images_per_s']:.2f} | "
            f"{row['per-task']['images_per_s']:.2f} | {row['single']['images_per_s']:.2f} | "
            f"{row['prompt-free']['images_per_s']:.2f} | "
            f"{row['mixed']['images_per_s'] / row['single']['images_per_s']:.3f} | "
            f"{row['mixed']['images_per_s'] / row['per-task']['images_per_s']:.3f} | "
            f"{mem['mixed_model_bytes'] / mb:.0f} | {mem['one_model_per_task_bytes'] / mb:.0f} |"
        )
    report = "\n".join(lines)
    print(report)
    if out is not None:
        with open(os.path.join(out, "multitask.json"), "w") as fh:
            json.dump({"env": env, "results": results}, fh, indent=2)
        with open(os.path.join(out, "multitask.md"), "w") as fh:
            fh.write(report + "\n")
    return {"env": env, "results": results}


if __name__ == "__main__":
    main()
