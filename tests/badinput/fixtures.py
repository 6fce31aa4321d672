"""The shared fixtures of the bad-input cases: tiny images, a list, and three tiny runs.

Built once per harness run (a few seconds) by the parent process, before any case forks;
cases read them and copy what they change (``Workspace.copy``).
"""

from __future__ import annotations

import os
import pathlib
import sys

# The training-layer tests' tiny model and images (tests/train/train_helpers.py).
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train")
)
from train_helpers import TINY_MODEL as MODEL
from train_helpers import write_images as _write_images

FAST = ["--batch-size", "8", "--lr", "16", "--workers", "0", "--no-progress", "--quiet"]
TRAIN = ["train", *MODEL, *FAST]
MODEL_KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def write_images(folder: str, count: int, classes: int, size: int = 12, seed: int = 0) -> list:
    """``count`` PNGs whose brightness follows the class; (path relative to the parent, label)."""
    return _write_images(pathlib.Path(folder), count, classes, size, seed)


def build(fx: str) -> None:
    """Write the fixtures into ``fx`` (skipped when a complete set is there)."""
    done = os.path.join(fx, ".complete")
    if os.path.exists(done):
        return
    from fastprompt.cli import main

    os.makedirs(fx, exist_ok=True)
    rows = write_images(os.path.join(fx, "img"), 24, 3)
    with open(os.path.join(fx, "data.csv"), "w") as f:
        f.write("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    data = os.path.join(fx, "data.csv")
    runs = {
        "vpt": ["--data", data, "--val", data, "--prompts", "3", "--epochs", "2"],
        "pgn": [
            "--data",
            data,
            "--val",
            data,
            "--method",
            "pgn",
            "--library-size",
            "8",
            "--pgn-resolution",
            "32",
            "--epochs",
            "1",
        ],
        "digits59": [
            "--data",
            "digits:5-9",
            "--prompts",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "64",
        ],
    }
    for name, args in runs.items():
        out = os.path.join(fx, name)
        if not os.path.exists(os.path.join(out, "run.json")):
            assert main([*TRAIN, *args, "--out", out]) == 0, name
    open(done, "w").close()


# -- helpers the cases share ---------------------------------------------------------------------


def tiny_vit(num_classes: int = 3, **kw):
    """The fixtures' backbone, random init (``kw`` overrides its arguments)."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **{**MODEL_KW, **kw}
    )


def truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def flip_byte(path: str, offset: int = -5) -> None:
    """Flip every bit of one byte (from the end: inside the tensor data of a safetensors file)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def edit_metadata(path: str, edit) -> None:
    """Rewrite a checkpoint's safetensors metadata through ``edit(description) -> None`` (the
    tensors and config.json stay as they are, as after a hand edit)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "prompts.safetensors")
    with safe_open(file, framework="pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    edit(config)
    meta["config"] = json.dumps(config)
    save_file(load_file(file), file, metadata=meta)


def image_folder(root: str, classes: dict[str, int], size: int = 12) -> None:
    """An ImageFolder tree: ``{class name: image count}``."""
    for i, (name, count) in enumerate(sorted(classes.items())):
        write_images(os.path.join(root, name), count, 1, size=size, seed=i)


def warm() -> None:
    """Do once, in the parent, the first-call work every case would repeat (timm's registry,
    a model built and run forward and backward, PIL, the digits data): the cases fork after."""
    import timm
    import torch

    import fastprompt

    timm.is_model("vit_tiny_patch16_224")
    with torch.device("meta"):
        timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODEL_KW)
    model = fastprompt.vpt(tiny_vit(), 2)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    model.unwrap()
    from PIL import Image, PngImagePlugin  # noqa: F401

    try:
        from sklearn.datasets import load_digits

        load_digits()
    except ImportError:
        pass
