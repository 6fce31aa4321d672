"""Prompt Condensation on real data that ships with scikit-learn: how good is each score?

1. Pretrain a small ViT on digits 0-4 (scikit-learn's 8×8 digits, upsampled to 16×16).
2. Freeze it and train VPT-deep on digits 5-9 (a new task, a new head).
3. Score every prompt with each method and report its Spearman correlation with the exact
   leave-one-out loss change.
4. Condense to 10/30/50 % (global selection) with each score, report held-out accuracy before and
   after fine-tuning only the kept prompts.

    python examples/digits_condensation.py [--quick] [--out DIR]

Everything is random-init and CPU-sized; it downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.bench import environment
from fastprompt.methods.condensation import SCORES


def digits(classes: range, seed: int = 0):
    """(train, test) tensors of scikit-learn digits in ``classes``, 3×16×16, labels from 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    keep = np.isin(data.target, list(classes))
    x = torch.tensor(data.images[keep], dtype=torch.float32) / 16.0
    x = F.interpolate(x.unsqueeze(1), size=16, mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(data.target[keep] - classes.start)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    return (xtr, ytr), (xte, yte)


def loader(x, y, batch: int, shuffle: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    class Batches:
        def __iter__(self):
            order = torch.randperm(len(x), generator=g) if shuffle else torch.arange(len(x))
            for i in range(0, len(x), batch):
                idx = order[i : i + batch]
                yield x[idx], y[idx]

    return Batches()


def pretrain(train, epochs: int):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=4, num_classes=5, mlp_ratio=2.0
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        for xb, yb in loader(*train, 64, True):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few epochs (a smoke test)")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    epochs = (
        {"pretrain": 3, "vpt": 3, "finetune": 2}
        if args.quick
        else {"pretrain": 60, "vpt": 60, "finetune": 20}
    )
    t0 = time.time()
    torch.manual_seed(0)
    source_train, source_test = digits(range(0, 5))
    backbone = pretrain(source_train, epochs["pretrain"])
    source_acc = fastprompt.evaluate(backbone, loader(*source_test, 256, False))
    backbone.reset_classifier(5)
    train, test = digits(range(5, 10))
    train_loader = loader(*train, 32, True)
    test_loader = loader(*test, 256, False)

    prompted = fastprompt.vpt(backbone, args.prompts, deep=True, dropout=0.1)
    fastprompt.fit(
        prompted, train_loader, epochs["vpt"], lr=0.25, warmup_epochs=epochs["vpt"] // 10
    )
    vpt_acc = fastprompt.evaluate(prompted, test_loader)
    print(
        f"source task acc {source_acc:.3f}; "
        f"VPT-deep ({args.prompts} prompts/block) acc {vpt_acc:.3f}"
    )
    trained = {n: p.detach().clone() for n, p in prompted.trainable_parameters().items()}

    score_loader = loader(*train, 128, False)
    scores = {
        m: fastprompt.score_prompts(prompted, score_loader, m, progress=False) for m in SCORES
    }
    truth = scores["leave_one_out"]
    rows = []
    for method in SCORES:
        row = {"score": method, "spearman_vs_loo": spearman(scores[method], truth)}
        for keep in (0.1, 0.3, 0.5):
            with torch.no_grad():  # the condensed model shares the head: restore it each time
                for n, p in prompted.trainable_parameters().items():
                    p.copy_(trained[n])
            condensed = fastprompt.condense(
                prompted, fastprompt.select_prompts(scores[method], keep)
            )
            row[f"acc_{int(keep * 100)}"] = fastprompt.evaluate(condensed, test_loader)
            fastprompt.finetune(
                condensed, train_loader, epochs["finetune"], lr=0.05, progress=False
            )
            row[f"acc_{int(keep * 100)}_ft"] = fastprompt.evaluate(condensed, test_loader)
            row[f"blocks_{int(keep * 100)}"] = list(condensed.config.layer_counts)
        rows.append(row)
        print(row)

    env = environment(torch.device("cpu"))
    lines = [
        f"Prompt Condensation on scikit-learn digits (pretrain ViT on 0-4: acc {source_acc:.3f}; "
        f"VPT-deep {args.prompts} prompts × 4 blocks on 5-9: acc {vpt_acc:.3f}; held-out 40 %). "
        f"{env['device']}, torch {env['torch']}, timm {env['timm']}, commit {env['commit']}, "
        f"{env['date']}; epochs {epochs}.",
        "",
        "| score | Spearman vs leave-one-out "
        "| 10 % | 10 % + ft | 30 % | 30 % + ft | 50 % | 50 % + ft |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['score']} | {r['spearman_vs_loo']:.3f} "
            + "".join(f"| {r[f'acc_{k}']:.3f} | {r[f'acc_{k}_ft']:.3f} " for k in (10, 30, 50))
            + "|"
        )
    report = "\n".join(lines)
    print(report)
    print(f"took {time.time() - t0:.0f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "digits_condensation.json"), "w") as f:
            json.dump(
                {
                    "env": env,
                    "epochs": epochs,
                    "source_acc": source_acc,
                    "vpt_acc": vpt_acc,
                    "rows": rows,
                },
                f,
                indent=2,
            )
        with open(os.path.join(args.out, "digits_condensation.md"), "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
