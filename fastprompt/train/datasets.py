"""Datasets of the training layer, and the class maps that tie their labels to a run's head.

A dataset is named by one string (``--data``):

- a folder in ImageFolder layout (one sub-folder of images per class, classes sorted by name); a
  folder that holds ``train/`` and ``val/`` (or ``validation/``, ``test/``) sub-folders in that
  layout gives both splits, and its ``test/`` is what ``fastprompt evaluate --data`` reads. An
  empty class folder is an error (it would be a class the model never sees), and a fastprompt
  run folder inside the data (``--out`` under ``--data``) is not a class;
- a list file: ``.csv`` (``path,label`` rows; a header row naming the columns is skipped; a UTF-8
  byte-order mark is fine) or ``.txt`` (``path label`` rows, whitespace-separated, as the VTAB-1k
  lists ``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``). Paths are relative
  to the list's folder. Labels are class indices when every label is a whole number (``3`` and
  ``3.0`` alike) and class names otherwise (sorted: numerically when they are all numbers);
- ``digits`` or ``digits:5-9`` (``digits:0,2,4``): scikit-learn's 8×8 handwritten digits
  (shipped inside scikit-learn, nothing to download), as RGB images the transform upsamples to the
  model's input size; a fixed, class-stratified 60/40 split gives ``train`` and ``test`` parts.
  A digit's images fall on the same side whichever other digits are listed: ``digits:6-9`` tests
  on the test images of a ``digits:5-9`` run, never on its training images.
  Labels are numbered from 0 in the order the classes are listed; the class names are the digits.

Every dataset has ``classes`` (names; a label is an index into them), ``samples`` (``(source,
label)`` pairs) and ``ids`` (a stable name per sample: its path as listed or relative to the
folder, ``digits/<index>``), which a run folder stores to pin its split.

A run's class map is its training data's ``classes``. Other data (validation, test, the data a
run is evaluated on) is read through it by name (:func:`map_classes`): a class the run never
trained on is an error naming it, a class the data lacks is fine.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from fastprompt.train.images import DataError, ImageError, read_rgb
from fastprompt.train.owner import is_run_folder

__all__ = [
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "ClassMapped",
    "DataError",
    "Digits",
    "ImageError",
    "ImageFolderData",
    "ListData",
    "check_trainable",
    "digits_resplit",
    "has_own_val",
    "map_classes",
    "open_dataset",
    "present_labels",
    "split_folders",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LIST_EXTENSIONS = (".csv", ".txt", ".tsv")


def _not_files(paths: Iterable[str]) -> list[str]:
    """Which of ``paths`` are no file to read (missing, a broken link, a folder), in order.

    Read folder by folder: one listing per folder, whose entries know their type without a
    ``stat`` (only links are followed), rather than a ``stat`` per image, which at startup on a
    million-image dataset (cold cache, a network file system) costs minutes. A name its
    folder's listing lacks (another spelling of it: a case-insensitive file system) is asked
    about on its own.
    """
    paths = list(paths)
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        by_folder.setdefault(os.path.dirname(p), []).append(p)
    bad: set[str] = set()
    for folder, inside in by_folder.items():
        try:
            with os.scandir(folder or ".") as listing:
                entries = {e.name: e for e in listing}
        except OSError:
            entries = {}
        for p in inside:
            entry = entries.get(os.path.basename(p))
            try:
                ok = entry.is_file() if entry is not None else os.path.isfile(p)
            except OSError:
                ok = False
            if not ok:
                bad.add(p)
    return [p for p in paths if p in bad]


def _skipped(path: str, exclude: set[str]) -> bool:
    return os.path.realpath(path) in exclude or is_run_folder(path)


class ImageFolderData(Dataset):
    """A folder with one sub-folder of images per class (classes sorted by name).

    Parameters
    ----------
    root : str
    exclude : iterable of str
        Folders that are not data (the run folder, when ``--out`` is inside ``--data``); marked
        fastprompt run folders are skipped anyway.
    """

    def __init__(self, root: str, exclude: Iterable[str] = ()) -> None:
        self.root = root
        self.name = os.path.basename(os.path.normpath(root))
        if not os.path.isdir(root):
            raise DataError(f"{root} is not a folder")
        skip = {os.path.realpath(p) for p in exclude}
        self.classes = sorted(
            e.name
            for e in os.scandir(root)
            if e.is_dir() and not e.name.startswith(".") and not _skipped(e.path, skip)
        )
        if not self.classes:
            raise DataError(
                f"{root} has no class sub-folders (ImageFolder layout: {root}/<class>/<image>)"
            )
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, cls in enumerate(self.classes):
            before = len(self.samples)
            found = []
            # Pruned as it walks (a sorted walk would be read whole first, pruning nothing):
            # hidden entries (.ipynb_checkpoints copies, macOS's ._name AppleDouble files) and run
            # folders are not the class's images.
            for dirpath, dirnames, files in os.walk(os.path.join(root, cls), followlinks=True):
                dirnames[:] = [
                    d
                    for d in dirnames
                    if not d.startswith(".") and not _skipped(os.path.join(dirpath, d), skip)
                ]
                found += [
                    (dirpath, f)
                    for f in files
                    if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
                ]
            # Folder by folder, then by name: the order (and so the split) runs saved before.
            self.samples += [(os.path.join(d, f), label) for d, f in sorted(found)]
            if len(self.samples) == before:
                empty.append(cls)
        if not self.samples:
            raise DataError(
                f"{root} holds no images in its {len(self.classes)} class folders "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        broken = _not_files(p for p, _ in self.samples)
        if broken:
            raise DataError(
                f"{root}: {len(broken)} image name(s) lead to no file (a broken link; first: "
                f"{broken[0]}); remove them or restore what they point to"
            )
        if empty:
            raise DataError(
                f"the class folder {os.path.join(root, empty[0])} holds no images"
                + (f" (nor do {len(empty) - 1} more: {empty[1:4]})" if len(empty) > 1 else "")
                + "; an empty class folder is a class the model would never see: add its images "
                "or remove the folder"
            )
        self.ids = [os.path.relpath(p, root) for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return read_rgb(path), label


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _whole(text: str) -> int | None:
    """``3`` and ``3.0`` as 3; anything else None."""
    try:
        return int(text)
    except ValueError:
        pass
    value = _number(text)
    return int(value) if value is not None and value.is_integer() else None


_HEADER_NAMES = ("path", "file", "filename", "image", "img", "image_path", "filepath")


class ListData(Dataset):
    """Images listed in a ``.csv`` (``path,label``) or ``.txt`` (``path label``) file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0]
        base = os.path.dirname(os.path.abspath(path))
        rows = self._rows(path)
        if rows and _number(rows[0][1]) is None and rows[0][0].strip().lower() in _HEADER_NAMES:
            rows = rows[1:]
        if not rows:
            raise DataError(f"{path} lists no images")
        labels = [r[1].strip() for r in rows]
        whole = [_whole(v) for v in labels]
        if all(v is not None for v in whole):
            ints: list[int] = whole  # type: ignore[assignment]
            if min(ints) < 0:
                row = ints.index(min(ints))
                raise DataError(
                    f"{path}: labels must be >= 0 (class indices), found {labels[row]!r} "
                    f"({rows[row][0].strip()})"
                )
            self.classes = [str(i) for i in range(max(ints) + 1)]
        else:
            names = set(labels)
            numeric = all(_number(v) is not None for v in names)
            key: Any = (lambda v: (_number(v), v)) if numeric else None
            self.classes = sorted(names, key=key)
            index = {c: i for i, c in enumerate(self.classes)}
            ints = [index[v] for v in labels]
        listed = [r[0].strip() for r in rows]
        self.samples = [(os.path.join(base, p), y) for p, y in zip(listed, ints, strict=True)]
        seen: Counter[str] = Counter()
        self.ids = []
        for p in listed:
            seen[p] += 1
            self.ids.append(p if seen[p] == 1 else f"{p}#{seen[p]}")
        missing = _not_files(p for p, _ in self.samples)
        if missing:
            row = [p for p, _ in self.samples].index(missing[0]) + 1
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(
                f"{path}: row {row}: {missing[0]} does not exist or is no file{more}; every "
                "listed image must be a file"
            )

    @staticmethod
    def _rows(path: str) -> list[list[str]]:
        rows = []
        # utf-8-sig: a list saved with a byte-order mark (Excel's "CSV UTF-8") reads the same.
        with open(path, newline="", encoding="utf-8-sig") as f:
            if path.lower().endswith(".csv"):
                reader: Any = csv.reader(f)
            else:
                reader = (line.rsplit(None, 1) for line in f if line.strip())
            try:
                for n, row in enumerate(reader, 1):
                    if not row or not "".join(row).strip():
                        continue
                    if len(row) < 2:
                        raise DataError(f"{path} line {n}: expected 'path,label', got {row!r}")
                    rows.append(row)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not a UTF-8 text list of images ({e})") from None
        return rows

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return read_rgb(path, f" (row {i + 1} of {self.path})"), label


class Digits(Dataset):
    """scikit-learn's handwritten digits (8×8 grey, 0-16), as RGB PIL images.

    Parameters
    ----------
    classes : sequence of int
        Digits to keep, relabelled 0, 1, ... in this order (their names are the digits).
    part : {"train", "test", "all"}
        A fixed class-stratified split: per class, 60 % train and 40 % test (seeded), the same
        for a digit whichever digits are kept.
    """

    def __init__(self, classes: Sequence[int] = tuple(range(10)), part: str = "train") -> None:
        import torch

        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError(
                "the built-in digits dataset needs scikit-learn (pip install scikit-learn, or "
                "fastprompt[bench])"
            ) from None
        if part not in ("train", "test", "all"):
            raise DataError(f"digits: part must be 'train', 'test' or 'all', got {part!r}")
        classes = list(classes)
        distinct = len(set(classes)) == len(classes)
        if not classes or any(c not in range(10) for c in classes) or not distinct:
            raise DataError(f"digits: classes must be distinct digits 0-9, got {classes}")
        data = load_digits()
        self.name = "digits"
        self.classes = [str(c) for c in classes]
        # Every digit's order is drawn, 0 to 9, whichever are kept: drawn only for the kept ones
        # in their listed order, a digit's split followed the digits before it, and digits:6-9's
        # test part held training images of digits:5-9. (digits and digits:0-K split as before.)
        g = torch.Generator().manual_seed(0)
        orders = {}
        for digit in range(10):
            idx = np.flatnonzero(data.target == digit)
            orders[digit] = idx[torch.randperm(len(idx), generator=g).numpy()]
        chosen: list[tuple[int, int]] = []
        for label, digit in enumerate(classes):
            idx = orders[digit]
            cut = round(0.6 * len(idx))
            keep = {"train": idx[:cut], "test": idx[cut:], "all": idx}[part]
            chosen += [(int(i), label) for i in sorted(keep)]
        self.images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
        self.samples = chosen
        self.ids = [f"digits/{i}" for i, _ in chosen]

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


def is_digits(spec: str) -> bool:
    return spec == "digits" or spec.startswith("digits:")


def digits_resplit(spec: str) -> bool:
    """Whether the digits ``spec`` names split otherwise than before a digit's split stopped
    depending on the digits listed: every list but ``digits`` and ``digits:0-K``, whose digits
    were drawn in the same order either way. A run older than ``split.json`` trained on the old
    split, which today's cannot recompute."""
    classes = _digit_classes(spec)
    return classes != list(range(len(classes)))


def open_dataset(spec: str, part: str = "train", exclude: Iterable[str] = ()) -> Dataset:
    """The dataset named by ``spec`` (module docstring). ``part`` (``train``, ``val`` or
    ``test``) picks a built-in's split (digits: ``train`` or else ``test``) or a split folder's
    sub-folder (:func:`split_folders`); ``exclude``: folders that are not data
    (:class:`ImageFolderData`).

    Raises
    ------
    DataError
        A missing path, a folder without classes or images, an empty class folder, an empty or
        malformed list.
    """
    if is_digits(spec):
        return Digits(_digit_classes(spec), "train" if part == "train" else "test")
    if not os.path.exists(spec):
        raise DataError(f"{spec} does not exist (a folder, a .csv/.txt list, or 'digits')")
    if os.path.isdir(spec):
        sub = split_folders(spec)
        if sub:
            return ImageFolderData(sub[part] if part in sub else sub["val"], exclude)
        return ImageFolderData(spec, exclude)
    if spec.lower().endswith(LIST_EXTENSIONS):
        return ListData(spec)
    raise DataError(f"{spec} is neither a folder nor a .csv/.txt list of images")


def split_folders(root: str) -> dict[str, str] | None:
    """``{"train": ..., "val": ..., "test": ...}`` when ``root`` holds ``train/`` and ``val/``,
    ``validation/`` or ``test/``: ``val`` is the first of those three there (a run validates
    on it), ``test`` is ``test/`` where there is one (``evaluate --data``), else ``val``."""
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        return None
    held = [os.path.join(root, n) for n in ("val", "validation", "test")]
    held = [p for p in held if os.path.isdir(p)]
    if not held:
        return None
    test = os.path.join(root, "test")
    return {"train": train, "val": held[0], "test": test if os.path.isdir(test) else held[0]}


def has_own_val(spec: str) -> bool:
    """Whether ``spec`` names a validation part of its own (a built-in or a split folder)."""
    if is_digits(spec):
        return True
    return os.path.isdir(spec) and split_folders(spec) is not None


# -- class maps ----------------------------------------------------------------------------------


def present_labels(dataset: Dataset) -> list[int]:
    """The labels that occur in ``dataset`` (sorted), read off its ``samples``."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise DataError(f"{type(dataset).__name__} lists no samples; cannot read its labels")
    return sorted({int(y) for _, y in samples})


def check_trainable(
    dataset: Dataset, where: str, hint: str = "check the folder layout: one sub-folder per class"
) -> None:
    """Refuse training data with fewer than two classes (a classifier learns nothing there)."""
    labels = present_labels(dataset)
    classes = list(getattr(dataset, "classes", []))
    if len(labels) < 2:
        name = classes[labels[0]] if labels and labels[0] < len(classes) else "?"
        raise DataError(
            f"{where} holds one class only ({name!r}, {len(dataset)} images); a classifier needs "
            f"at least two ({hint})"
        )


class ClassMapped(Dataset):
    """A dataset read through a run's class map: its labels become the run's indices.

    Attributes
    ----------
    classes : list of str
        The run's classes.
    samples, ids
        The base dataset's, with labels remapped.
    """

    def __init__(self, base: Dataset, mapping: dict[int, int], classes: list[str]) -> None:
        self.base, self.mapping, self.classes = base, mapping, list(classes)
        self.samples = [(s, mapping[y]) for s, y in base.samples]  # type: ignore[attr-defined]
        self.ids = list(getattr(base, "ids", []))
        self.name = getattr(base, "name", "data")

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, self.mapping[label]


def map_classes(dataset: Dataset, classes: Sequence[str], where: str) -> Dataset:
    """``dataset`` with its labels read as the run's ``classes`` (matched by name).

    Classes the data lacks are fine; a class with images that the run never trained on is an
    error naming it (a digits:0-4 test set for a run trained on digits:5-9, a test folder with
    a class folder the training folder lacks).

    Raises
    ------
    DataError
    """
    classes = list(classes)
    own = list(getattr(dataset, "classes", classes))
    if own == classes:
        return dataset
    index = {c: i for i, c in enumerate(classes)}
    used = present_labels(dataset)
    unseen = [own[y] for y in used if own[y] not in index]
    if unseen:
        raise DataError(
            f"{where} has {len(unseen)} class(es) the run was not trained on: "
            f"{unseen[:6]}{' ...' if len(unseen) > 6 else ''} (the run's {len(classes)} classes: "
            f"{classes[:8]}{' ...' if len(classes) > 8 else ''})"
        )
    mapping = {y: index[own[y]] for y in used}
    if all(k == v for k, v in mapping.items()):
        return dataset
    return ClassMapped(dataset, mapping, classes)
