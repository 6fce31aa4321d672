"""Shared pieces of the training-layer tests (tiny model arguments, tiny images on disk)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A timm ViT small enough that an epoch takes milliseconds (16×16 images, 16 patches).
TINY_MODEL = [
    "--model",
    "vit_tiny_patch16_224",
    "--model-args",
    "img_size=16",
    "patch_size=4",
    "embed_dim=32",
    "depth=2",
    "num_heads=2",
    "--no-pretrained",
]


def write_images(folder, count: int, classes: int, size: int = 12, seed: int = 0) -> list:
    """``count`` PNGs whose brightness depends on the class; returns (relative path, label)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        label = i % classes
        pixels = rng.random((size, size, 3)) * 60 + label * (190 / max(classes - 1, 1))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        rows.append((f"{folder.name}/{i}.png", label))
    return rows


def torchrun(argv: list, out) -> None:
    """``fastprompt *argv --out out`` as 2 CPU processes under torchrun (gloo); must succeed."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd = [*launcher, "2", "-m", "fastprompt", *argv, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
