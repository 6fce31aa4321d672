"""Datasets, splits, transforms and loaders of the training layer.

A dataset is named by one string (``--data``):

- a folder in ImageFolder layout (one sub-folder of images per class); a folder that holds
  ``train/`` and ``val/`` (or ``test/``) sub-folders in that layout gives both splits;
- a list file: ``.csv`` (``path,label`` rows; a header row naming the columns is skipped) or
  ``.txt`` (``path label`` rows, whitespace-separated, as the VTAB-1k lists ``train800.txt``,
  ``val200.txt``, ``train800val200.txt``, ``test.txt``). Paths are relative to the list's folder;
  labels are class indices (ints) or class names (sorted to indices);
- ``digits`` or ``digits:5-9`` (``digits:0,2,4``): scikit-learn's 8×8 handwritten digits
  (shipped inside scikit-learn, nothing to download), as RGB images the transform upsamples to the
  model's input size; a fixed, class-stratified 60/40 split gives ``train`` and ``test`` parts.
  Labels are renumbered from 0 in the order the classes are listed.

Datasets yield ``(PIL image, label)``; :class:`Transformed` applies a split's transform. Loaders
shard with :class:`torch.utils.data.DistributedSampler` (also in one process, so one process and
several shuffle alike) and seed every epoch from ``(seed, epoch, rank)``, so an epoch's order and
augmentation do not depend on what ran before: a resumed run replays them exactly.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = [
    "MEANS",
    "DataError",
    "Digits",
    "ImageFolderData",
    "ListData",
    "ShardSampler",
    "Transformed",
    "build_transform",
    "image_size",
    "make_loader",
    "normalization",
    "open_dataset",
    "split_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# (mean, std) of the named normalisations; "backbone" reads the model's timm pretrained_cfg.
MEANS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


class DataError(ValueError):
    """A dataset that cannot be used: a bad path, no images, labels that do not fit."""


# -- datasets ------------------------------------------------------------------------------------


def _rgb(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


class ImageFolderData(Dataset):
    """A folder with one sub-folder of images per class (classes sorted by name)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.name = os.path.basename(os.path.normpath(root))
        if not os.path.isdir(root):
            raise DataError(f"{root} is not a folder")
        self.classes = sorted(
            e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise DataError(
                f"{root} has no class sub-folders (ImageFolder layout: {root}/<class>/<image>)"
            )
        self.samples: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), label))
        if not self.samples:
            raise DataError(
                f"{root} holds no images in its {len(self.classes)} class folders "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return _rgb(path), label


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class ListData(Dataset):
    """Images listed in a ``.csv`` (``path,label``) or ``.txt`` (``path label``) file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0]
        base = os.path.dirname(os.path.abspath(path))
        rows = self._rows(path)
        if (
            rows
            and not _is_int(rows[0][1])
            and rows[0][0].strip().lower()
            in (
                "path",
                "file",
                "filename",
                "image",
                "img",
            )
        ):
            rows = rows[1:]
        if not rows:
            raise DataError(f"{path} lists no images")
        labels = [r[1].strip() for r in rows]
        if all(_is_int(v) for v in labels):
            ints = [int(v) for v in labels]
            if min(ints) < 0:
                raise DataError(f"{path}: labels must be >= 0, found {min(ints)}")
            self.classes = [str(i) for i in range(max(ints) + 1)]
        else:
            self.classes = sorted(set(labels))
            index = {c: i for i, c in enumerate(self.classes)}
            ints = [index[v] for v in labels]
        self.samples = [
            (os.path.join(base, r[0].strip()), y) for r, y in zip(rows, ints, strict=True)
        ]
        first = self.samples[0][0]
        if not os.path.isfile(first):
            raise DataError(f"{path}: its first image {first} does not exist")

    @staticmethod
    def _rows(path: str) -> list[list[str]]:
        rows = []
        with open(path, newline="") as f:
            if path.lower().endswith(".csv"):
                reader: Any = csv.reader(f)
            else:
                reader = (line.rsplit(None, 1) for line in f if line.strip())
            for n, row in enumerate(reader, 1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise DataError(f"{path} line {n}: expected 'path,label', got {row!r}")
                rows.append(row)
        return rows

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return _rgb(path), label
        except FileNotFoundError:
            raise DataError(f"{self.path}: image {path} (row {i + 1}) does not exist") from None


class Digits(Dataset):
    """scikit-learn's handwritten digits (8×8 grey, 0-16), as RGB PIL images.

    Parameters
    ----------
    classes : sequence of int
        Digits to keep, relabelled 0, 1, ... in this order.
    part : {"train", "test", "all"}
        A fixed class-stratified split: per class, 60 % train and 40 % test (seeded).
    """

    def __init__(self, classes: Sequence[int] = tuple(range(10)), part: str = "train") -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError(
                "the built-in digits dataset needs scikit-learn (pip install scikit-learn, or "
                "fastprompt[bench])"
            ) from None
        if part not in ("train", "test", "all"):
            raise DataError(f"digits: part must be 'train', 'test' or 'all', got {part!r}")
        if (
            not classes
            or any(c not in range(10) for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise DataError(f"digits: classes must be distinct digits 0-9, got {list(classes)}")
        data = load_digits()
        self.name = "digits"
        self.classes = [str(c) for c in classes]
        g = torch.Generator().manual_seed(0)
        chosen: list[tuple[int, int]] = []
        for label, digit in enumerate(classes):
            idx = np.flatnonzero(data.target == digit)
            idx = idx[torch.randperm(len(idx), generator=g).numpy()]
            cut = round(0.6 * len(idx))
            keep = {"train": idx[:cut], "test": idx[cut:], "all": idx}[part]
            chosen += [(int(i), label) for i in sorted(keep)]
        self.images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
        self.samples = chosen

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        index, label = self.samples[i]
        return Image.fromarray(self.images[index], mode="L").convert("RGB"), label


def _digit_classes(spec: str) -> list[int]:
    if ":" not in spec:
        return list(range(10))
    text = spec.split(":", 1)[1]
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise DataError(f"{spec!r}: write the digits as digits:5-9 or digits:0,2,4") from None


def open_dataset(spec: str, part: str = "train") -> Dataset:
    """The dataset named by ``spec`` (module docstring). ``part`` picks a built-in's split or the
    ``train``/``val``/``test`` sub-folder of a split folder.

    Raises
    ------
    DataError
        A missing path, a folder without classes or images, an empty or malformed list.
    """
    if spec == "digits" or spec.startswith("digits:"):
        return Digits(_digit_classes(spec), "train" if part == "train" else "test")
    if not os.path.exists(spec):
        raise DataError(f"{spec} does not exist (a folder, a .csv/.txt list, or 'digits')")
    if os.path.isdir(spec):
        sub = split_folders(spec)
        if sub:
            if part == "train":
                return ImageFolderData(sub["train"])
            return ImageFolderData(sub["val"])
        return ImageFolderData(spec)
    if spec.lower().endswith((".csv", ".txt", ".tsv")):
        return ListData(spec)
    raise DataError(f"{spec} is neither a folder nor a .csv/.txt list of images")


def split_folders(root: str) -> dict[str, str] | None:
    """``{"train": ..., "val": ...}`` when ``root`` holds ``train/`` and ``val/`` (or ``test/``)."""
    train = os.path.join(root, "train")
    for name in ("val", "validation", "test"):
        val = os.path.join(root, name)
        if os.path.isdir(train) and os.path.isdir(val):
            return {"train": train, "val": val}
    return None


def has_own_val(spec: str) -> bool:
    """Whether ``spec`` names a validation part of its own (a built-in or a split folder)."""
    if spec == "digits" or spec.startswith("digits:"):
        return True
    return os.path.isdir(spec) and split_folders(spec) is not None


def split_dataset(n: int, how: str, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` of a dataset of ``n`` samples held out by ``how``.

    ``how``: ``"vtab-1k"`` (1000 samples: the first 800 train, the last 200 validate, VTAB-1k's
    train800/val200), a fraction in (0, 1) or a count of samples (random, seeded).
    """
    if how == "vtab-1k":
        if n != 1000:
            raise DataError(
                f"--val-split vtab-1k needs the 1000 training images of a VTAB-1k task, got {n}"
            )
        return list(range(800)), list(range(800, 1000))
    try:
        value = float(how)
    except ValueError:
        raise DataError(
            f"--val-split must be 'vtab-1k', a fraction in (0, 1) or a count, got {how!r}"
        ) from None
    if 0 < value < 1:
        count = round(value * n)
    elif value >= 1 and value == int(value):
        count = int(value)
    else:
        raise DataError(f"--val-split must be a fraction in (0, 1) or a count >= 1, got {how!r}")
    if not 1 <= count < n:
        raise DataError(f"--val-split {how} leaves no train or no validation sample of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


class Transformed(Dataset):
    """``(transform(image), label)`` of some samples of a dataset.

    After :meth:`set_epoch` a random transform draws from a generator seeded by (seed, epoch,
    sample), so a sample's augmentation does not depend on which process or loader worker loads
    it, or on what was drawn before: a resumed run, a run with another ``--workers`` and a run on
    more processes augment alike.
    """

    def __init__(self, base: Dataset, transform, indices: Sequence[int] | None = None) -> None:
        self.base = base
        self.transform = transform
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]
        self.seed: int | None = None

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Seed the augmentation of every sample from ``(seed, epoch, sample index)``."""
        self.seed = epoch_seed(seed, epoch, 0)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[self.indices[i]]
        if self.seed is None:
            return self.transform(image), label
        # torchvision's random transforms draw from torch's global generator: fork it, so the
        # caller's random stream (prompt dropout, with 0 workers) is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed + 1_000_003 * (i + 1)) % 2**63)
            return self.transform(image), label


# -- transforms ----------------------------------------------------------------------------------


def image_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) a timm ViT takes."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = cfg.get("input_size", (3, 224, 224))[1:]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def normalization(model: nn.Module, kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for ``kind``; ``"backbone"`` reads the model's timm ``pretrained_cfg`` (the
    config only: no weights are fetched), ImageNet's when the model has none."""
    if kind != "backbone":
        if kind not in MEANS:
            raise ValueError(
                f"normalize must be 'backbone' or one of {sorted(MEANS)}, got {kind!r}"
            )
        return MEANS[kind]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return MEANS["imagenet"]
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def build_transform(
    kind: str,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 0.875,
):
    """A torchvision transform: PIL image → normalised (3, H, W) float tensor.

    - ``resize-crop``: shorter side to ``size / crop_pct``, centre crop (VPT's FGVC test path);
    - ``resize``: straight to ``size``, aspect not kept (VPT's VTAB path);
    - ``fgvc``: shorter side to ``size / crop_pct``, random crop, horizontal flip (VPT's FGVC
      training path);
    - ``pgn``: PGN's training augmentation — a random resized crop at scale (1, 1) (a bicubic resize
      of the whole image), colour jitter 0.4/0.4/0.4/0.4 with p 0.8, grayscale p 0.2, solarize at
      128 p 0.2, horizontal flip;
    - ``pgn-test``: shorter side to ``size``, centre crop (PGN's test path).
    """
    from torchvision import transforms as T

    interp = {
        "bilinear": T.InterpolationMode.BILINEAR,
        "bicubic": T.InterpolationMode.BICUBIC,
        "nearest": T.InterpolationMode.NEAREST,
    }[interpolation]
    h, w = size
    resize_to = (round(h / crop_pct), round(w / crop_pct))
    short = resize_to[0] if h == w else resize_to
    if kind == "resize-crop":
        steps = [T.Resize(short, interpolation=interp), T.CenterCrop(size)]
    elif kind == "resize":
        steps = [T.Resize(size, interpolation=interp)]
    elif kind == "fgvc":
        steps = [
            T.Resize(short, interpolation=interp),
            T.RandomCrop(size),
            T.RandomHorizontalFlip(),
        ]
    elif kind == "pgn":
        steps = [
            T.RandomResizedCrop(size, scale=(1.0, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.4)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomSolarize(threshold=128, p=0.2),
            T.RandomHorizontalFlip(),
        ]
    elif kind == "pgn-test":
        steps = [T.Resize(h if h == w else size, interpolation=interp), T.CenterCrop(size)]
    else:
        raise ValueError(f"unknown transform {kind!r}")
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


# -- loaders -------------------------------------------------------------------------------------


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding (evaluation)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def _seed_numpy(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed for one (run seed, epoch, rank), independent of any other state."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


@dataclass
class LoaderSpec:
    """How to load one split: batch per process, workers, shuffling."""

    batch_size: int
    workers: int = 0
    shuffle: bool = False
    seed: int = 0
    rank: int = 0
    world: int = 1
    pin_memory: bool = False
    drop_last: bool = False  # the last, short batch of each process


def make_loader(dataset: Dataset, spec: LoaderSpec, epoch: int = 0) -> DataLoader:
    """A loader for one epoch: sharded over ``spec.world`` processes, seeded by epoch.

    Training loaders shuffle with a :class:`DistributedSampler` (padded to a multiple of the
    world size, as torchrun users expect); evaluation loaders shard without padding.
    """
    if spec.shuffle:
        sampler: Sampler = DistributedSampler(
            dataset,
            num_replicas=spec.world,
            rank=spec.rank,
            shuffle=True,
            seed=spec.seed,
        )
        sampler.set_epoch(epoch)
    else:
        sampler = ShardSampler(len(dataset), spec.rank, spec.world)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        num_workers=spec.workers,
        pin_memory=spec.pin_memory,
        drop_last=spec.drop_last,
        generator=torch.Generator().manual_seed(epoch_seed(spec.seed, epoch, spec.rank)),
        worker_init_fn=_seed_numpy if spec.workers > 0 else None,
    )
