"""``fastprompt train`` end to end on data that ships with scikit-learn, through the CLI.

1. Pretrain a small ViT on digits 0-4 (scikit-learn's 8×8 digits, upsampled to 16×16) and save its
   weights; this is the frozen backbone.
2. ``fastprompt train --method vpt`` on digits 5-9 (a new task, a new head) with the ``vpt``
   recipe, to convergence, with curves.
3. The same run stopped half-way (``--stop-after``) and continued with ``--resume``: its
   checkpoint and metrics are compared with the uninterrupted run's, bit for bit.
4. ``fastprompt train --method pgn`` with the ``pgn`` recipe (its augmentation, schedule, SGD).
5. ``fastprompt condense`` of the VPT run (keep 30 %, ``taylor_normed``, 20 fine-tuning epochs)
   and ``fastprompt evaluate`` of every run.

    python examples/digits_train.py [--quick] [--out runs/digits] [--report DIR]

Everything runs on a CPU and downloads nothing. The commands it runs are printed as shell lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time

import torch
import torch.nn.functional as F

from fastprompt.bench import environment
from fastprompt.cli import main as cli
from fastprompt.train import data as D
from fastprompt.train.owner import is_run_folder

BACKBONE = {
    "img_size": 16,
    "patch_size": 4,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 2.0,
}
MODEL = "vit_tiny_patch16_224"  # timm's ViT class; the arguments above make it small


def pretrain(path: str, epochs: int) -> float:
    """Train the backbone on digits 0-4 with the data pipeline the CLI uses; save the weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=5, **BACKBONE)
    mean, std = D.normalization(model, "backbone")
    tf = D.build_transform("resize-crop", (16, 16), mean, std)
    train = D.Transformed(D.Digits(range(5), "train"), tf)
    test = D.Transformed(D.Digits(range(5), "test"), tf)
    spec = D.LoaderSpec(batch_size=64, shuffle=True, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        model.train()
        for x, y in D.make_loader(train, spec, epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x).argmax(-1) == y).sum())
            for x, y in D.make_loader(test, D.LoaderSpec(batch_size=256))
        )
    save_file(model.state_dict(), path)
    return correct / len(test)


def run(argv: list[str], log: list[str]) -> float:
    """Run one ``fastprompt`` command in this process (what the shell line does); its seconds."""
    line = "fastprompt " + " ".join(shlex.quote(a) for a in argv)
    print(f"\n$ {line}", flush=True)
    log.append(line)
    t0 = time.perf_counter()
    assert cli(argv) == 0
    return time.perf_counter() - t0


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(run_dir: str) -> dict:
    rows = metrics(run_dir)
    best = max(rows, key=lambda r: r["val_acc"])
    return {
        "epochs": len(rows),
        "final_val_acc": rows[-1]["val_acc"],
        "final_val_loss": rows[-1]["val_loss"],
        "final_train_loss": rows[-1]["train_loss"],
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"] + 1,
        "train_images_per_s_median": sorted(r["images_per_s"] for r in rows)[len(rows) // 2],
        "data_wait_median": sorted(r["data_wait"] for r in rows)[len(rows) // 2],
    }


def identical(a: str, b: str) -> dict:
    """Whether two runs end with the same tensors and the same per-epoch numbers."""
    from safetensors.torch import load_file

    ta = load_file(os.path.join(a, "last", "prompts.safetensors"))
    tb = load_file(os.path.join(b, "last", "prompts.safetensors"))
    tensors = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    keys = ("lr", "train_loss", "train_acc", "val_loss", "val_acc")
    ma, mb = metrics(a), metrics(b)
    rows = len(ma) == len(mb) and all(
        {k: x[k] for k in keys} == {k: y[k] for k in keys} for x, y in zip(ma, mb)
    )
    return {"tensors_bitwise_equal": tensors, "metrics_equal": rows, "epochs": len(ma)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few epochs (a smoke test)")
    parser.add_argument("--out", default="runs/digits", help="folder of the run folders")
    parser.add_argument("--report", default=None, help="folder for the report and the curves")
    parser.add_argument("--workers", type=int, default=1, help="loader processes per run")
    args = parser.parse_args()
    e = (
        {"pretrain": 3, "vpt": 4, "pgn": 4, "finetune": 2}
        if args.quick
        else {"pretrain": 60, "vpt": 100, "pgn": 60, "finetune": 20}
    )
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    weights = os.path.join(args.out, "backbone_digits0-4.safetensors")
    # A rerun replaces what an earlier run of this example wrote, and nothing else in --out.
    for name in ("vpt", "vpt-resumed", "pgn", "vpt-pc30-taylor_normed"):
        if is_run_folder(os.path.join(args.out, name)):
            shutil.rmtree(os.path.join(args.out, name))
    source_acc = pretrain(weights, e["pretrain"])
    print(f"backbone: top-1 {100 * source_acc:.2f}% on held-out digits 0-4")

    model_args = ["--model", MODEL, "--model-args", *(f"{k}={v}" for k, v in BACKBONE.items())]
    common = [*model_args, "--weights", weights, "--data", "digits:5-9"]
    common += ["--workers", str(args.workers), "--no-progress"]
    log: list[str] = []
    vpt_run, split_run = os.path.join(args.out, "vpt"), os.path.join(args.out, "vpt-resumed")
    vpt = [*common, "--method", "vpt", "--prompts", "10", "--prompt-dropout", "0.1"]
    # The vpt recipe with a smaller batch for 537 training images (more steps per epoch); the
    # official code tunes the base lr per task, 2.0 is from its grid. No augmentation: the
    # recipe's default (a random crop and a horizontal flip) would mirror the digits.
    vpt += ["--recipe", "vpt", "--batch-size", "32", "--lr", "2.0", "--epochs", str(e["vpt"])]
    vpt += ["--train-transform", "resize-crop"]
    seconds = {"vpt": run(["train", *vpt, "--out", vpt_run], log)}
    half = str(e["vpt"] // 2)
    seconds["vpt_first_half"] = run(["train", *vpt, "--out", split_run, "--stop-after", half], log)
    seconds["vpt_resumed_half"] = run(["train", "--resume", split_run, "--no-progress"], log)

    pgn_run = os.path.join(args.out, "pgn")
    pgn = [*common, "--method", "pgn", "--prompts", "16", "--library-size", "64"]
    # The pgn recipe (augmentation, warmup for half the epochs, SGD) with batch 32 and the lr
    # halved; a fresh linear head (the official --random_classifier), not the digits 0-4 head.
    pgn += ["--pgn-resolution", "32", "--head-init", "linear", "--recipe", "pgn"]
    pgn += ["--batch-size", "32", "--lr", "0.05", "--epochs", str(e["pgn"])]
    seconds["pgn"] = run(["train", *pgn, "--out", pgn_run], log)

    pc_run = os.path.join(args.out, "vpt-pc30-taylor_normed")
    condense = ["condense", vpt_run, "--keep", "0.3", "--score", "taylor_normed"]
    condense += ["--finetune-epochs", str(e["finetune"]), "--no-progress", "--out", pc_run]
    seconds["condense"] = run(condense, log)
    for r in (vpt_run, pgn_run, pc_run):
        run(["evaluate", r, "--data", "digits:5-9", "--no-progress"], log)

    with open(os.path.join(pc_run, "run.json")) as f:
        init = json.load(f)["config"]["init"]
    report = {
        "env": environment(torch.device("cpu")),
        "quick": args.quick,
        "backbone": {"model": MODEL, "args": BACKBONE, "pretrain_epochs": e["pretrain"]},
        "source_task_acc": source_acc,
        "vpt": summary(vpt_run),
        "vpt_resume": identical(vpt_run, split_run),
        "pgn": summary(pgn_run),
        "condensed": {
            **summary(pc_run),
            "kept": f"{init['kept_total']} / {init['prompts_before']}",
            "layer_counts": init["layer_counts"],
            "val_acc_before_finetune": init["val_before_finetune"]["acc"],
            "scoring_time_s": init["scoring_time_s"],
        },
        "seconds": seconds,
        "commands": log,
        "total_minutes": (time.time() - t_start) / 60,
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("env", "commands")}, indent=2))
    if args.report:
        os.makedirs(args.report, exist_ok=True)
        with open(os.path.join(args.report, "digits_train.json"), "w") as f:
            json.dump(report, f, indent=2)
        for name, r in (("vpt", vpt_run), ("pgn", pgn_run), ("vpt_pc30", pc_run)):
            png = os.path.join(r, "curves.png")
            if os.path.exists(png):
                shutil.copy(png, os.path.join(args.report, f"curves_{name}.png"))
        print(f"wrote {args.report}/digits_train.json and the curves")


if __name__ == "__main__":
    main()
