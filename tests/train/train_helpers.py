"""Shared pieces of the training-layer tests (tiny model arguments, tiny images on disk)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

from fastprompt.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What every quick CLI run passes: small batches, a learning rate that moves in one epoch, no
# workers and no progress bars.
FAST = ["--batch-size", "8", "--lr", "16", "--workers", "0", "--no-progress", "--quiet"]


def cli_error(capsys, argv) -> str:
    """The last line argparse's usage error (exit code 2) printed for ``argv``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@contextlib.contextmanager
def another_writer(run):
    """Another process holding ``run``'s lock as a writer (a `train --resume`) until the block
    ends; yields its process."""
    code = (
        "import sys; from fastprompt.train import owner\n"
        "owner.hold_lock(sys.argv[1]); print('held', flush=True); sys.stdin.read()\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert writer.stdout.readline().strip() == b"held"
        yield writer
    finally:
        writer.communicate(b"", timeout=120)


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


def sync_bn_nets() -> dict:
    """float64 networks with BatchNorm, the same on every process, and a global batch for each:
    a convolution and two BatchNorm2d layers (6 images), and a ResNet-10 generator whose last
    feature map is 1x1 (2 images: one per process of 2)."""
    import torch
    from torch import nn

    from fastprompt.sources.generators import ResNet10Generator

    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    generator = ResNet10Generator(2, 3, widths=(4, 8))
    rng = torch.Generator().manual_seed(1)
    return {
        "layers": (layers.double(), torch.randn(6, 3, 7, 7, generator=rng).double() * 3 + 1),
        "generator": (generator.double(), torch.randn(2, 3, 8, 8, generator=rng).double()),
    }


def sync_bn_step(net, images):
    """Outputs of a forward in train mode, and the input gradient of a loss of them."""
    images = images.clone().requires_grad_()
    y = net.train()(images)
    (y * y.detach().sin()).sum().backward()
    return y.detach(), images.grad


def sync_bn_worker(rank: int, world: int, init: str, out: str) -> None:
    """One process of a gloo group (spawned): each of :func:`sync_bn_nets` with its BatchNorm
    synchronised, on this process's share ``images[rank::world]``; writes the outputs, input
    gradients, parameter gradients (summed over processes) and buffers to ``out/rank<r>.pt``."""
    import torch
    import torch.distributed as dist

    from fastprompt.train.syncbn import sync_batchnorm

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = {}
        for name, (net, images) in sync_bn_nets().items():
            sync_batchnorm(net)
            y, dx = sync_bn_step(net, images[rank::world])
            grads = {n: p.grad.clone() for n, p in net.named_parameters()}
            for g in grads.values():
                dist.all_reduce(g)
            buffers = {n: b.clone() for n, b in net.named_buffers()}
            result[name] = {"y": y, "dx": dx, "grads": grads, "buffers": buffers}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
