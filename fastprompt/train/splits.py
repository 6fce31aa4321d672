"""A run's data: its training and validation parts, read through its class map, pinned on disk.

:func:`open_data` opens ``--data`` (and ``--val``), holds out ``--val-split`` and reads every part
through the training data's class map (:func:`fastprompt.train.datasets.map_classes`). A new run
stores which samples went where in ``split.json`` (:func:`write_split`: the sample ids and their
labels per part); a resumed, condensed or evaluated run reads its parts back from it, so an image
never moves between training and validation and a label never changes under a run. Images added
to the data since are left out (and said so); images gone, or relabelled, are an error naming
them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from fastprompt.train import datasets as DS
from fastprompt.train.data import split_dataset
from fastprompt.train.datasets import DataError
from fastprompt.train.folder import RunError
from fastprompt.train.multi import is_mixture, open_mixture_data, spec_paths

__all__ = [
    "SPLIT_FILE",
    "RunData",
    "Subset",
    "open_data",
    "read_split",
    "run_data",
    "write_split",
]

SPLIT_FILE = "split.json"
SPLIT_FORMAT = "fastprompt.split/1"


class Subset(Dataset):
    """Some samples of a dataset (``classes``, ``samples`` and ``ids`` follow)."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)
        self.classes = list(base.classes)  # type: ignore[attr-defined]
        self.samples = [base.samples[i] for i in self.indices]  # type: ignore[attr-defined]
        self.ids = [base.ids[i] for i in self.indices]  # type: ignore[attr-defined]
        self.name = getattr(base, "name", "data")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


@dataclass
class RunData:
    """The parts of a run's data, labelled by the run's classes.

    Attributes
    ----------
    train, val : Dataset
    classes : list of str
        The class map: label i is ``classes[i]``.
    how : str
        Where the validation part came from.
    notes : list of str
        What a resumed run should say (images added to the data since the run began).
    """

    train: Dataset
    val: Dataset
    classes: list[str]
    how: str
    notes: list[str] = field(default_factory=list)

    def split_record(self) -> dict[str, Any]:
        """What ``split.json`` holds: per part, the sample ids and their labels."""
        return {
            "format": SPLIT_FORMAT,
            "classes": self.classes,
            **{
                part: {
                    "ids": list(ds.ids),  # type: ignore[attr-defined]
                    "labels": [int(y) for _, y in ds.samples],  # type: ignore[attr-defined]
                }
                for part, ds in (("train", self.train), ("val", self.val))
            },
        }


def write_split(run: str, data: RunData) -> None:
    """Store the run's split in ``run/split.json`` (written whole, then renamed in)."""
    path = os.path.join(run, SPLIT_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data.split_record(), f)
        f.write("\n")
    os.replace(tmp, path)


def read_split(run: str) -> dict[str, Any] | None:
    """The split stored in ``run/split.json``; None for a run older than stored splits.

    Raises
    ------
    DataError
        When the file is damaged.
    """
    path = os.path.join(run, SPLIT_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        ok = saved.get("format") == SPLIT_FORMAT and all(
            len(saved[p]["ids"]) == len(saved[p]["labels"]) for p in ("train", "val")
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path} is damaged ({type(e).__name__}: {e}); it pins the run's split"
        ) from None
    if not ok:
        raise DataError(f"{path} is not a {SPLIT_FORMAT} file; it pins the run's split")
    return saved


def _select(base: Dataset, part: dict[str, Any], classes: list[str], where: str) -> Subset:
    """The stored samples of ``base`` (by id), checking none is gone or relabelled."""
    index = {sid: i for i, sid in enumerate(base.ids)}  # type: ignore[attr-defined]
    ids, labels = part["ids"], part["labels"]
    gone = [sid for sid in ids if sid not in index]
    if gone:
        root = getattr(base, "root", None)
        skipped = root is not None and os.path.exists(os.path.join(root, gone[0]))
        why = (
            "; they are still there, but this fastprompt no longer reads hidden files, hidden "
            "folders or run folders inside a class folder as images (an older one did)"
            if skipped
            else ""
        )
        raise DataError(
            f"{len(gone)} of the run's {len(ids)} images are gone from {where} (first: "
            f"{gone[0]}){why}; the run continues only on the data it began with"
        )
    chosen = Subset(base, [index[sid] for sid in ids])
    own = chosen.classes
    for sid, (_, y), want in zip(ids, chosen.samples, labels, strict=True):
        if own[y] != classes[want]:
            raise DataError(
                f"{where}: the image {sid} was class {classes[want]!r} when the run began and is "
                f"{own[y]!r} now; the run continues only on the data it began with"
            )
    return chosen


def _shared_files(train: Dataset, val: Dataset) -> int:
    """How many of ``val``'s image files are ``train``'s too (by real path: a symlinked folder
    is the same folder). Two image folders whose real roots are apart share none: their files
    are not resolved one by one (a system call per path component, per file)."""
    roots = [getattr(d, "root", None) for d in (train, val)]
    if all(isinstance(r, str) for r in roots):
        a, b = (os.path.realpath(r) for r in roots)
        if not (a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)):
            return 0

    def files(dataset: Dataset) -> set[str]:
        samples = getattr(dataset, "samples", [])
        return {os.path.realpath(s) for s, _ in samples if isinstance(s, str)}

    return len(files(val) & files(train))


def _added(base: Dataset, kept: Iterable[str]) -> int:
    return len(set(base.ids) - set(kept))  # type: ignore[attr-defined]


def _task_classes(base: Dataset, cfg) -> list[str]:
    """A new run's class map: ``base``'s classes, or the ``cfg.num_classes`` classes of its task.

    Raises
    ------
    DataError
        A label that is no class of the task; classes named otherwise than by index, fewer than
        the task's (the missing ones have no names to give them).
    """
    own = list(base.classes)  # type: ignore[attr-defined]
    n = getattr(cfg, "num_classes", None)
    if n is None:
        return own
    where = f"--data {cfg.train}"
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise DataError(f"--num-classes must be an int >= 2, got {n!r}")
    if own == [str(i) for i in range(len(own))]:  # labelled by class index
        if len(own) > n:
            raise DataError(
                f"{where} has label {len(own) - 1}, no class of a task of {n} classes (labels "
                f"0 to {n - 1}; --num-classes, or the --preset's count): is it the task's data?"
            )
        return [str(i) for i in range(n)]
    if len(own) != n:
        raise DataError(
            f"{where} names {len(own)} classes ({own[:3]}...), the task has {n} (--num-classes, "
            "or the --preset's count): classes named rather than numbered cannot be added; label "
            "them by index (a .txt/.csv list of integer labels) or give --num-classes "
            f"{len(own)}"
        )
    return own


def open_data(
    cfg,
    seed: int = 0,
    exclude: Iterable[str] = (),
    classes: Sequence[str] | None = None,
    stored: dict[str, Any] | None = None,
    stratify: bool = True,
) -> RunData:
    """The raw (untransformed) parts of a run's data, read through its class map.

    Parameters
    ----------
    cfg : DataConfig
        ``train`` (``--data``), ``val`` (``--val``) or ``val_split`` (``--val-split``).
    seed : int
        Of a random ``--val-split``.
    exclude : iterable of str
        Folders that are not data (the run folder).
    classes : sequence of str, optional
        The run's class map (a resumed or evaluated run); default the training data's.
    stored : dict, optional
        The run's stored split (:func:`read_split`): its parts are taken as stored.
    stratify : bool
        A new ``--val-split`` (fraction or count) holds out each class's share
        (:func:`~fastprompt.train.data.split_dataset`); False: drawn from all images, as runs
        made before ``split.json`` (and before stratification) recompute theirs.

    Raises
    ------
    DataError
        A bad path, no images, no validation data, one class, classes or images that do not fit
        the run.
    """
    exclude = list(exclude)
    if is_mixture(cfg.train):
        return open_mixture_data(cfg, seed, exclude, classes, stored, stratify)
    if cfg.val is not None and cfg.val_split is not None:
        raise DataError("pass either --val or --val-split, not both")
    base = DS.open_dataset(cfg.train, "train", exclude)
    if len(base) == 0:
        raise DataError(f"--data {cfg.train} holds no samples")
    if cfg.val_split is not None:
        how = f"--val-split {cfg.val_split}"
        val_base, val_where = base, f"--data {cfg.train}"
    elif cfg.val is not None:
        how = f"--val {cfg.val}"
        val_base, val_where = DS.open_dataset(cfg.val, "val", exclude), f"--val {cfg.val}"
    elif DS.has_own_val(cfg.train):
        how = "the dataset's own split"
        val_base = DS.open_dataset(cfg.train, "val", exclude)
        val_where = f"the validation part of --data {cfg.train}"
    else:
        raise DataError(
            f"--data {cfg.train} has no validation split; pass --val PATH or --val-split "
            "(a fraction, a count, or vtab-1k)"
        )
    notes: list[str] = []
    shared = _shared_files(base, val_base) if val_base is not base else 0
    if shared:
        # Accepted (an overfitting check is a use), but said at every start and in run.json.
        how += f", {shared} of its images also in --data"
        notes.append(
            f"note: {shared} of the {len(val_base)} images of {val_where} are also training images "
            f"of --data {cfg.train}: their 'val' accuracy is training accuracy, not held-out"
        )
    if stored is not None:
        run_classes = list(stored.get("classes") or classes or base.classes)
        train = _select(base, stored["train"], run_classes, f"--data {cfg.train}")
        val = _select(val_base, stored["val"], run_classes, val_where)
        if val_base is base:
            added = _added(base, list(stored["train"]["ids"]) + list(stored["val"]["ids"]))
        else:
            added = _added(base, stored["train"]["ids"]) + _added(val_base, stored["val"]["ids"])
        if added:
            notes.append(
                f"note: {added} image(s) in the data are not in the run's split (added since it "
                f"began); the run keeps the split it began with ({SPLIT_FILE})"
            )
    else:
        run_classes = list(classes) if classes is not None else _task_classes(base, cfg)
        if cfg.val_split is not None:
            labels = [int(y) for _, y in base.samples] if stratify else None
            tr, va = split_dataset(len(base), cfg.val_split, seed, labels)
            train, val = Subset(base, tr), Subset(base, va)
            if labels is not None and cfg.val_split != "vtab-1k":
                how += " (stratified by class)"
        else:
            train, val = Subset(base, range(len(base))), val_base
        if classes is None and cfg.val_split is not None:
            DS.check_trainable(
                train,
                f"the training part --val-split {cfg.val_split} leaves of --data {cfg.train}",
                f"all {len(base.classes)} classes of --data: hold out fewer images",
            )
        elif classes is None:
            DS.check_trainable(train, f"--data {cfg.train}")
    if len(val) == 0:
        raise DataError(f"the validation data ({how}) holds no samples")
    if val_base is base:
        unseen = sorted(set(DS.present_labels(train)) - set(DS.present_labels(val)))
        if unseen:
            known = list(getattr(base, "classes", []))
            names = [known[c] if c < len(known) else str(c) for c in unseen[:4]]
            more = f" and {len(unseen) - 4} more" if len(unseen) > 4 else ""
            notes.append(
                f"note: {how} holds out no image of {len(unseen)} class(es) ({names}{more}): "
                "their validation accuracy is not measured (a class of one image trains; hold "
                "out at least one image per class)"
            )
    train = DS.map_classes(train, run_classes, f"--data {cfg.train}")
    try:
        val = DS.map_classes(val, run_classes, val_where)
    except DataError as e:
        if classes is None and run_classes == [str(i) for i in range(len(run_classes))]:
            raise DataError(
                f"{e}; labels are class indices: if --data lacks images of the task's last "
                "classes, give its class count (--num-classes N, or --preset vtab1k-TASK)"
            ) from None
        raise
    return RunData(train, val, run_classes, how, notes)


def run_data(run: str, config, saved: dict[str, Any]) -> RunData:
    """The run's data as it began: its stored split, read through its class map.

    Raises
    ------
    DataError, RunError
        Images of the split gone or relabelled, classes the run never had; a run older than
        ``split.json`` whose data changed, or whose digits are split differently today.
    """
    stored = read_split(run)
    if stored is None:
        # Older still than today's digits split: recomputing it would give other images.
        for spec in [*spec_paths(config.data.train), *spec_paths(config.data.val)]:
            if DS.is_digits(spec) and DS.digits_resplit(spec):
                raise RunError(
                    f"{spec} is split differently since {run} began (a digit's train and test "
                    f"images no longer depend on the other digits listed); {run} predates "
                    f"{SPLIT_FILE}, so its split cannot be restored: train it again"
                )
    # A run without split.json predates stratified splits: its random split is recomputed.
    data = open_data(
        config.data,
        config.seed,
        exclude=[run],
        classes=saved["classes"],
        stored=stored,
        stratify=stored is not None,
    )
    if stored is None:
        # A run older than split.json: its split is recomputed from the data and the seed,
        # which is the same split only if the data is the same.
        then = saved.get("data", {})
        now = {"train_samples": len(data.train), "val_samples": len(data.val)}
        changed = {k: (then[k], v) for k, v in now.items() if k in then and then[k] != v}
        if changed:
            what = ", ".join(f"{k} {a} then, {b} now" for k, (a, b) in changed.items())
            raise RunError(
                f"the run's data changed since it began ({what}); {run} predates {SPLIT_FILE}, "
                "so its split cannot be restored: restore the data"
            )
    return data
