"""Data of the training layer: datasets, splits, transforms and loaders, in one namespace.

The datasets and class maps live in :mod:`fastprompt.train.datasets` (which names ``--data``
accepts), the transforms in :mod:`fastprompt.train.transforms`, a run's train/validation split in
:mod:`fastprompt.train.splits`; this module holds the per-sample augmentation seeding and the
loaders, and re-exports the rest so ``from fastprompt.train import data as D`` reaches it all.

Datasets yield ``(PIL image, label)``; :class:`Transformed` applies a split's transform. Loaders
shard with :class:`torch.utils.data.DistributedSampler` (also in one process, so one process and
several shuffle alike) and seed every epoch from ``(seed, epoch, rank)``, so an epoch's order and
augmentation do not depend on what ran before: a resumed run replays them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fastprompt.train.datasets import (
    IMAGE_EXTENSIONS,
    ClassMapped,
    DataError,
    Digits,
    ImageError,
    ImageFolderData,
    ListData,
    check_trainable,
    has_own_val,
    map_classes,
    open_dataset,
    split_folders,
)
from fastprompt.train.transforms import MEANS, build_transform, image_size, normalization

__all__ = [
    "IMAGE_EXTENSIONS",
    "MEANS",
    "VTAB1K_CLASSES",
    "ClassMapped",
    "DataError",
    "Dataset",
    "Digits",
    "ImageError",
    "ImageFolderData",
    "ListData",
    "LoaderSpec",
    "ShardSampler",
    "Transformed",
    "build_transform",
    "check_trainable",
    "epoch_seed",
    "has_own_val",
    "image_size",
    "make_loader",
    "map_classes",
    "normalization",
    "open_dataset",
    "split_dataset",
    "split_folders",
    "stratified_counts",
]


# The class count of every VTAB-1k task (the official tune_vtab.py's DATA2CLS, the head's
# DATA.NUMBER_CLASSES), by the presets' task names: a task's train800 list may lack classes, which
# the official head still has, and its test list holds images of them.
VTAB1K_CLASSES: dict[str, int] = {
    "cifar100": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}


def split_dataset(
    n: int, how: str, seed: int = 0, labels: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` of a dataset of ``n`` samples held out by ``how``.

    ``how``: ``"vtab-1k"`` (1000 samples: the first 800 train, the last 200 validate, VTAB-1k's
    train800/val200), a fraction in (0, 1) or a count of samples (random, seeded).

    With ``labels`` (shape (n,)) a fraction or count is stratified by class
    (:func:`stratified_counts`): each class holds out its share, at least one image while the
    count allows, and never its last training image, the images drawn at random (seeded).
    Without, the held-out images are drawn from all of them (runs made before stratification
    recompute their split this way).
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
    elif value >= 1 and str(how).strip().isdigit():
        count = int(value)
    elif value == 1:  # "1.0": a fraction of all would leave nothing to train on, not 1 image
        raise DataError(
            f"--val-split {how} is a fraction of 1 (every image); a fraction is in (0, 1), a "
            "count of images is written as a whole number (1, 200)"
        )
    else:
        raise DataError(f"--val-split must be a fraction in (0, 1) or a count >= 1, got {how!r}")
    if not 1 <= count < n:
        raise DataError(f"--val-split {how} leaves no train or no validation sample of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if labels is None:
        return sorted(order[count:]), sorted(order[:count])
    if len(labels) != n:
        raise ValueError(f"split_dataset: {len(labels)} labels for {n} samples")
    groups: dict[int, list[int]] = {}
    for i in order:  # each class's images in the seeded random order
        groups.setdefault(int(labels[i]), []).append(i)
    quotas = stratified_counts({c: len(g) for c, g in sorted(groups.items())}, count)
    val = [i for c, g in groups.items() for i in g[: quotas[c]]]
    held = set(val)
    return [i for i in range(n) if i not in held], sorted(val)


def stratified_counts(sizes: dict[int, int], count: int) -> dict[int, int]:
    """How many of each class's ``sizes[c]`` images a stratified split of ``count`` holds out.

    Each class's share ``count · n_c / n``, rounded by largest remainder so the total is
    ``count``, within bounds: at least one image per class of two or more while ``count``
    reaches the number of such classes, and at most ``n_c − 1`` (a class keeps a training image)
    while the training part has room for that.
    """
    n = sum(sizes.values())
    many = [c for c, k in sizes.items() if k >= 2]
    low = {c: int(c in many and count >= len(many)) for c in sizes}
    high = {c: k - 1 if k >= 2 else 0 for c, k in sizes.items()}
    if count > sum(high.values()):
        high = dict(sizes)
    share = {c: count * k / n for c, k in sizes.items()}
    taken = {c: min(max(math.floor(share[c]), low[c]), high[c]) for c in sizes}
    # Hand out (or take back) one image at a time, to the class furthest below (above) its share.
    while (left := count - sum(taken.values())) != 0:
        if left > 0:
            c = max((c for c in sizes if taken[c] < high[c]), key=lambda c: share[c] - taken[c])
            taken[c] += 1
        else:
            c = min((c for c in sizes if taken[c] > low[c]), key=lambda c: share[c] - taken[c])
            taken[c] -= 1
    return taken


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
