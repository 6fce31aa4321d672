"""One PGN over three datasets, and whether its mixture weights discover them (PGN paper, Fig. 5).

The datasets ship inside scikit-learn: its 8×8 handwritten digits, the same digits rotated by
90°, and the same digits inverted (white background). They are written once as ImageFolder
folders (``train/`` and ``val/``, a fixed class-stratified 60/40 split), then one command trains
one generator, one token library and one head over all three, in one joint label space of
3 × 10 classes:

    fastprompt train --method pgn --data upright=DIR/upright --data rot90=DIR/rot90 \\
        --data inverted=DIR/inverted ...

The run folder then holds per-dataset validation metrics (``metrics.jsonl``: ``val_datasets``)
and the domain-discovery report (``domains.png``, ``domains.json``): every validation image's
mixture weights embedded in 2-D (PCA), coloured by dataset, and the held-out nearest-centroid
accuracy of the dataset label from those weights, beside the same for the untrained model. These
three datasets differ visibly, so even a random generator separates them (about 99 %): the
example shows the machinery; datasets that differ less are where training has something to find.

The frozen backbone is a small random-init ViT (nothing is downloaded): the generator, the
library and the head do all the learning, which is what PGN trains anyway.

    python examples/digits_domains.py [--quick] [--out DIR] [--embedding pca|tsne] [--epochs N]
        [--per-class N]

Needs scikit-learn and matplotlib (``pip install 'fastprompt[domains]'``). Everything runs on a
CPU; ``--quick`` (a smoke test: 3 classes, a few images, 1 epoch) takes well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil

import numpy as np

from fastprompt.cli import main as cli
from fastprompt.train.owner import is_run_folder

BACKBONE = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 3, "num_heads": 4}
VARIANTS = {
    "upright": lambda img: img,
    "rot90": lambda img: np.rot90(img).copy(),
    "inverted": lambda img: 255 - img,
}


def write_datasets(root: str, classes: int, per_class: int | None, seed: int = 0) -> dict:
    """The three variants of the digits 0..classes-1 as ImageFolder ``train/`` + ``val/``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    split = {}
    for c in range(classes):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        if per_class is not None:
            idx = idx[:per_class]
        cut = round(0.6 * len(idx))
        split[c] = {"train": idx[:cut], "val": idx[cut:]}
    paths = {}
    for name, change in VARIANTS.items():
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        for c, parts in split.items():
            for part, idx in parts.items():
                out = os.path.join(folder, part, str(c))
                os.makedirs(out, exist_ok=True)
                for i in idx:
                    Image.fromarray(change(images[i])).save(os.path.join(out, f"{i}.png"))
        paths[name] = folder
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test (1 epoch, few images)")
    parser.add_argument("--out", default="runs/digits_domains", help="data and run folder root")
    parser.add_argument("--embedding", choices=["pca", "tsne"], default="pca")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="default 30 (--quick: 1)")
    parser.add_argument("--per-class", type=int, help="images per digit (default all, ~180)")
    args = parser.parse_args(argv)
    classes, per_class, epochs = (3, 10, 1) if args.quick else (10, None, 30)
    epochs = args.epochs or epochs
    per_class = args.per_class or per_class
    os.makedirs(args.out, exist_ok=True)
    data = write_datasets(os.path.join(args.out, "data"), classes, per_class)
    run = os.path.join(args.out, "pgn")
    if is_run_folder(run):  # a rerun replaces this example's own run folder, nothing else
        shutil.rmtree(run)
    model = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-args"]
    model += [f"{k}={v}" for k, v in BACKBONE.items()]
    argv_train = ["train", *model, "--method", "pgn", "--head-init", "linear"]
    for name, folder in data.items():
        argv_train += ["--data", f"{name}={folder}"]
    argv_train += ["--prompts", "4" if args.quick else "16"]
    argv_train += ["--library-size", "8" if args.quick else "64", "--pgn-resolution", "32"]
    argv_train += ["--epochs", str(epochs), "--batch-size", "16" if args.quick else "64"]
    argv_train += ["--lr", "0.05", "--workers", str(args.workers), "--device", "cpu"]
    argv_train += ["--no-progress", "--out", run]
    print("$ fastprompt " + " ".join(shlex.quote(a) for a in argv_train), flush=True)
    assert cli(argv_train) == 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    if args.embedding != "pca":
        from fastprompt.train.domains import run_report

        run_report(run, embedding=args.embedding)
    with open(os.path.join(run, "domains.json")) as f:
        domains = json.load(f)
    result = {
        "val_acc": last["val_acc"],
        "val_datasets": last["val_datasets"],
        "separation": domains["separation"],
        "separation_untrained": domains["separation_baseline"],
        "chance": domains["chance"],
        "report": domains["png"],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
