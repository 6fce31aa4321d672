"""Whether the images ``fastprompt evaluate RUN --data D`` reads are held out from the run.

An image is named by what it is on disk, not by how a dataset lists it: a file by its path with
the folder resolved (a training folder reached through a link, or listed by a second ``.csv``,
is the same images), a built-in digit by its index in scikit-learn's digits (``digits/<index>``,
whichever digits a spec lists). The run's own images come from its ``split.json``
(:mod:`fastprompt.train.splits`), its ids resolved against the data the run recorded, without
listing or reading that data (it may be gone: the evaluation does not need it); a run older than
``split.json`` recomputes its split from its data, as a resume does.

:func:`check_held_out` refuses evaluation images the run trained on, and says when they are its
validation images (``best/`` was chosen on them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from fastprompt.train.datasets import LIST_EXTENSIONS, DataError, is_digits, split_folders
from fastprompt.train.multi import is_mixture, parse_specs, spec_paths
from fastprompt.train.splits import read_split

__all__ = ["RunImages", "check_held_out", "run_images", "sample_keys"]

_DUPLICATE = re.compile(r"^(.*)#\d+$")  # a list's second listing of a path (ListData.ids)


class _Keys:
    """Image names that do not depend on how a dataset reaches them: one ``realpath`` per
    folder (cached), none per file."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def file(self, path: str) -> str:
        folder, name = os.path.split(os.path.abspath(path))
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder)
        return os.path.join(real, name)

    def sample(self, source: Any) -> str:
        # Only the built-in digits name a sample by an index rather than a path.
        return self.file(source) if isinstance(source, str) else f"digits/{int(source)}"


def sample_keys(dataset: Dataset, keys: _Keys | None = None) -> list[str]:
    """The name of every sample of ``dataset`` (module docstring), read off its ``samples``.

    Returns
    -------
    list of str
        Shape (len(dataset),).
    """
    keys = keys or _Keys()
    return [keys.sample(s) for s, _ in getattr(dataset, "samples", [])]


class RunImages:
    """The images a run trained on and validated on, as :func:`sample_keys` names them.

    Attributes
    ----------
    train, val : set of str
    source : str
        Where they were read from, for messages.
    """

    def __init__(self, train: set[str], val: set[str], source: str) -> None:
        self.train, self.val, self.source = train, val, source


def _root(spec: str, part: str) -> str:
    """The folder a dataset's ids are relative to (:func:`~fastprompt.train.datasets.
    open_dataset`): a split folder's part, an image folder, a list's folder. An image folder
    that is gone is its own root still, not its parent (where other images may live)."""
    if os.path.isdir(spec):
        sub = split_folders(spec)
        return sub[part] if sub else spec
    if spec.lower().endswith(LIST_EXTENSIONS):
        return os.path.dirname(os.path.abspath(spec))
    return spec


def _resolve(ids: Sequence[str], spec: str, part: str, keys: _Keys, listed: set[str]) -> set[str]:
    """The names of the samples ``ids`` of ``spec``'s ``part``; ``listed``: every id of the
    dataset's parts, since a list's second listing of a path (``path#2``) may fall on the other
    side of a ``--val-split`` than its first."""
    if is_digits(spec):
        return set(ids)  # already digits/<index>
    root = _root(spec, part)
    found = set()
    for sid in ids:
        again = _DUPLICATE.match(sid)
        if again and again.group(1) in listed:
            sid = again.group(1)  # the same file as its first listing
        found.add(keys.file(os.path.join(root, sid)))
    return found


def _members(config) -> list[tuple[str, str, tuple[str, str]]]:
    """Per dataset of the run: its id prefix in ``split.json``, its training spec, and where its
    validation ids are relative to (spec, part)."""
    data = config.data
    if is_mixture(data.train):
        pairs = parse_specs(data.train)
        vals: list[str | None] = [None] * len(pairs)
        if data.val is not None:
            vals = list(spec_paths(data.val))
        return [
            (f"{name}/", spec, _val_source(spec, val, data.val_split))
            for (name, spec), val in zip(pairs, vals, strict=True)
        ]
    return [("", data.train, _val_source(data.train, data.val, data.val_split))]


def _val_source(train: str, val: str | None, val_split: str | None) -> tuple[str, str]:
    if val_split is not None:
        return train, "train"  # held out of the training data
    if val is not None:
        return val, "val"
    return train, "val"  # the dataset's own split


def run_images(run: str, config, saved: dict[str, Any]) -> RunImages:
    """The images the run in ``run`` trained and validated on.

    Raises
    ------
    DataError
        They cannot be known: ``split.json`` is damaged, or the run is older than it and its
        split cannot be recomputed (its data gone or changed, its digits split differently
        today).
    """
    keys = _Keys()
    stored = read_split(run)
    if stored is None:
        from fastprompt.train.folder import RunError
        from fastprompt.train.splits import run_data

        try:
            data = run_data(run, config, saved)
        except RunError as e:  # it says that the run predates split.json
            raise DataError(str(e)) from None
        except DataError as e:
            raise DataError(
                f"the run predates split.json and its split cannot be recomputed: {e}"
            ) from None
        return RunImages(
            set(sample_keys(data.train, keys)),
            set(sample_keys(data.val, keys)),
            "its data and seed (it predates split.json)",
        )
    train: set[str] = set()
    val: set[str] = set()
    for prefix, spec, (val_spec, val_part) in _members(config):

        def own(part: str, prefix: str = prefix) -> list[str]:
            return [i[len(prefix) :] for i in stored[part]["ids"] if i.startswith(prefix)]

        mine_train, mine_val = own("train"), own("val")
        listed = {*mine_train, *mine_val}
        train |= _resolve(mine_train, spec, "train", keys, listed)
        val |= _resolve(mine_val, val_spec, val_part, keys, listed)
    return RunImages(train, val, os.path.join(run, "split.json"))


def check_held_out(
    run: str, config, saved: dict[str, Any], dataset: Dataset, where: str, checkpoint: str
) -> list[str]:
    """Refuse evaluation data holding images the run trained on; return notes to print once.

    Parameters
    ----------
    run : str
        The run folder.
    config, saved
        The run's :class:`~fastprompt.train.run.RunConfig` and ``run.json``.
    dataset : Dataset
        The evaluation data, as opened (``samples`` and ``ids``).
    where : str
        How the evaluation data was named (``--data PATH``).
    checkpoint : str
        The checkpoint evaluated: ``best`` was chosen on the validation images; a fresh run's
        ``init`` has seen none of its images (not checked).

    Returns
    -------
    list of str
        Notes: the evaluation images that are the run's validation images, or why the run's
        images cannot be known (:func:`run_images`).

    Raises
    ------
    DataError
        Some evaluation images are training images of the run: how many, the first few, what
        to do.
    """
    if checkpoint == "init" and config.init is None:
        return []  # a fresh run's start has seen no image (a condensed run's has: its source's)
    keys = _Keys()
    try:
        mine = run_images(run, config, saved)
    except DataError as e:  # the checkpoint evaluates without them; said, not refused
        return [f"note: whether {where} holds images {run} trained on is not checked: {e}"]
    names = sample_keys(dataset, keys)
    ids = list(getattr(dataset, "ids", names))
    trained = [i for i, k in enumerate(names) if k in mine.train]
    if trained:
        shown = ", ".join(_shown(dataset, ids, i) for i in trained[:3])
        more = ", ..." if len(trained) > 3 else ""
        raise DataError(
            f"{where}: {len(trained)} of its {len(names)} evaluation images are images {run} "
            f"was trained on (per {mine.source}): {shown}{more}; their top-1 is training "
            "accuracy, not a test result: evaluate on images held out of training (a split "
            "folder's test/, a list of other images), or without --data on the run's "
            "validation data"
        )
    seen = sum(k in mine.val for k in names)
    if seen and checkpoint == "best":
        return [
            f"note: {seen} of the {len(names)} images of {where} are the run's validation "
            "images, on which best/ was chosen (the epoch with the highest validation top-1): "
            "its top-1 on them is not a held-out test result (--checkpoint last is not chosen "
            "on them)"
        ]
    return []


def _shown(dataset: Dataset, ids: Sequence[str], i: int) -> str:
    source = dataset.samples[i][0]  # type: ignore[attr-defined]
    return source if isinstance(source, str) else ids[i]
