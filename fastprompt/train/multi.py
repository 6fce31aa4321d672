"""Training on a mixture of datasets: one model, one joint label space, per-dataset metrics.

``fastprompt train --data a/ --data b/ ...`` (``DataConfig(train=["a/", "b/"])`` in Python) trains
one model (for PGN: one generator and one token library) on every dataset at once, the setting of
the PGN paper's multi-dataset experiment (Loedeman et al.: one PGN trained on several datasets at
once; its Figure 5 shows the token library separating the training domains). The official code
(jochemloedeman/PGN) has no multi-dataset path: its scripts train on one ``--dataset`` each. What
fastprompt does, and why (``docs/design.md`` §"Multi-dataset PGN"):

- **Head: one joint label space.** Dataset ``a``'s class ``c`` is the class ``"a/c"``; the classes
  of the run are every dataset's classes, dataset by dataset in the order given, and one linear
  head reads them all. An image is never told which dataset it came from, at training or at test
  time, so a class of one dataset can never be confused with the same-named class of another
  (labels never mix: ``a/3`` and ``b/3`` are different classes).
- **Sampling: the datasets concatenated.** Every epoch shuffles the union of the training images,
  so a dataset is drawn in proportion to its size (no re-weighting), which is what concatenating
  the datasets and training as usual does.
- **Per-dataset metrics.** Every validation pass also reports, per dataset: top-1 over the joint
  label space (``acc``), top-1 among the dataset's own classes (``acc_within``: what a head per
  dataset would score with the dataset known), the share of images whose prediction is a class of
  their own dataset (``domain_acc``), their loss and count. Counts and correct predictions add up
  to the pass's totals.

Each dataset is opened as a run of its own would open it (its own validation part, ``--val`` per
dataset, or ``--val-split`` applied to each dataset), so every check of a single-dataset run holds
per dataset. A dataset is named by its folder or list name, by ``digits`` for the built-in, or by
``NAME=SPEC`` on the command line; names must differ and hold no ``/``. ``split.json`` stores
sample ids as ``NAME/id``.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from fastprompt.train.datasets import DataError, is_digits

__all__ = [
    "SEP",
    "Mixture",
    "check_distinct",
    "class_domains",
    "dataset_names",
    "domain_stats",
    "is_mixture",
    "open_member",
    "open_mixture_data",
    "parse_specs",
    "per_dataset",
    "report_domains",
    "spec_paths",
    "upcast",
]

SEP = "/"
_NAME = re.compile(r"^[A-Za-z0-9_.:+-]+$")


def is_mixture(train: object) -> bool:
    """Whether a ``DataConfig.train`` names several datasets (a list) rather than one."""
    return isinstance(train, (list, tuple))


def _split_name(text: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` as ``(NAME, SPEC)``; a spec without a valid name prefix as ``(None, spec)``."""
    name, eq, rest = text.partition("=")
    if eq and rest and _NAME.match(name) and not os.path.exists(text):
        return name, rest
    return None, text


def _default_name(spec: str) -> str:
    if is_digits(spec):
        return spec
    base = os.path.basename(os.path.normpath(spec))
    return os.path.splitext(base)[0] if os.path.isfile(spec) else base


def parse_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, spec)`` for every ``--data`` of a mixture.

    Raises
    ------
    DataError
        Fewer than two datasets, two with the same name, a name holding ``/``.
    """
    if not is_mixture(specs) or len(specs) < 2:
        raise DataError(f"a mixture of datasets needs at least two --data, got {specs!r}")
    pairs = []
    for text in specs:
        if not isinstance(text, str) or not text:
            raise DataError(f"--data: expected a dataset (path or digits), got {text!r}")
        name, spec = _split_name(text)
        name = name or _default_name(spec)
        if SEP in name or not name:
            raise DataError(f"--data {text}: the dataset name {name!r} may not hold {SEP!r}")
        pairs.append((name, spec))
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(
            f"--data: two datasets are both named {dup[0]!r}; name them: --data NAME=PATH "
            f"(e.g. --data {dup[0]}-a={pairs[names.index(dup[0])][1]})"
        )
    return pairs


def dataset_names(specs: Sequence[str]) -> list[str]:
    """The names of a mixture's datasets, in order (:func:`parse_specs`)."""
    return [n for n, _ in parse_specs(specs)]


def spec_paths(value: str | Sequence[str] | None) -> list[str]:
    """The paths (or built-in names) one ``--data``/``--val`` value names, ``NAME=`` removed."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [_split_name(v)[1] for v in items]


def absolute_specs(value: str | Sequence[str] | None) -> str | list[str] | None:
    """``--data``/``--val`` with every path made absolute (``NAME=`` and built-in names kept):
    what a run records, so a resume or an evaluation from another folder reads the same data."""
    if value is None:
        return None

    def one(text: str) -> str:
        name, spec = _split_name(text)
        spec = spec if is_digits(spec) else os.path.abspath(spec)
        return spec if name is None else f"{name}={spec}"

    return one(value) if isinstance(value, str) else [one(v) for v in value]


class Mixture(Dataset):
    """Several datasets as one: classes ``NAME/class``, labels offset per dataset.

    Parameters
    ----------
    parts : sequence of (str, Dataset)
        Named datasets, each with ``classes``, ``samples`` and ``ids``.

    Attributes
    ----------
    names : list of str
    classes : list of str
        ``NAME/class`` for every class of every dataset, dataset by dataset.
    samples, ids
        Joint labels; ids ``NAME/id``.
    domains : list of int
        The dataset index of every sample.
    """

    def __init__(self, parts: Sequence[tuple[str, Dataset]]) -> None:
        self.parts = list(parts)
        self.names = [n for n, _ in self.parts]
        self.name = "+".join(self.names)
        self.classes: list[str] = []
        self.samples: list[tuple[Any, int]] = []
        self.ids: list[str] = []
        self.domains: list[int] = []
        self.offsets: list[int] = []
        self._ends: list[int] = []
        for k, (name, ds) in enumerate(self.parts):
            offset = len(self.classes)
            self.offsets.append(offset)
            self.classes += [f"{name}{SEP}{c}" for c in ds.classes]  # type: ignore[attr-defined]
            self.samples += [(s, offset + int(y)) for s, y in ds.samples]  # type: ignore[attr-defined]
            self.ids += [f"{name}{SEP}{i}" for i in ds.ids]  # type: ignore[attr-defined]
            self.domains += [k] * len(ds)  # type: ignore[arg-type]
            self._ends.append(len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"Mixture: index {i} out of range for {len(self)} samples")
        k = bisect.bisect_right(self._ends, i)
        start = self._ends[k - 1] if k else 0
        image, label = self.parts[k][1][i - start]
        return image, self.offsets[k] + int(label)


def _own(classes: Sequence[str], name: str) -> list[str]:
    prefix = name + SEP
    return [c[len(prefix) :] for c in classes if c.startswith(prefix)]


def _stored_part(part: Mapping[str, Any], name: str, classes: Sequence[str], own: list[str]):
    prefix = name + SEP
    local = {c: i for i, c in enumerate(own)}
    ids, labels = [], []
    for sid, y in zip(part["ids"], part["labels"], strict=True):
        if sid.startswith(prefix):
            ids.append(sid[len(prefix) :])
            labels.append(local[classes[y][len(prefix) :]])
    return {"ids": ids, "labels": labels}


def check_distinct(
    pairs: Sequence[tuple[str, str]], vals: Sequence[str | None] | None = None
) -> None:
    """Refuse one dataset given twice under two names, as ``--data`` or as ``--val``: each
    name's classes are classes of their own, so every image would train (or be validated) as
    two classes. ``vals``: the ``--val`` of each dataset, in ``pairs``' order (None: its own)."""
    for flag, specs in (("--data", [s for _, s in pairs]), ("--val", vals or [])):
        seen: dict[str, str] = {}
        for (name, _), spec in zip(pairs, specs, strict=False):
            if spec is None:
                continue
            key = spec if is_digits(spec) else os.path.realpath(spec)
            if key in seen:
                raise DataError(
                    f"{flag}: datasets {seen[key]!r} and {name!r} are given the same data "
                    f"({spec}): each dataset's classes are classes of their own, so its images "
                    "would be read as two classes at once; a path given twice?"
                )
            seen[key] = name


def open_mixture_data(
    cfg,
    seed: int = 0,
    exclude: Iterable[str] = (),
    classes: Sequence[str] | None = None,
    stored: dict[str, Any] | None = None,
    stratify: bool = True,
):
    """The parts of a run over several datasets (what :func:`~fastprompt.train.splits.open_data`
    returns for one): each dataset opened as its own run would open it, then joined.

    Parameters
    ----------
    cfg : DataConfig
        ``train`` a list of datasets; ``val`` None or a list of the same length; ``val_split``
        applied to each dataset.
    seed, exclude, classes, stored, stratify
        As :func:`~fastprompt.train.splits.open_data`; ``classes`` are joint (``NAME/class``).

    Returns
    -------
    RunData
        ``train`` and ``val`` are :class:`Mixture` datasets.

    Raises
    ------
    DataError
    """
    from fastprompt.train.splits import RunData, open_data

    if getattr(cfg, "num_classes", None) is not None and classes is None:
        raise DataError(
            f"--num-classes {cfg.num_classes} applies to one --data; a mixture's classes are its "
            "datasets' classes, joined"
        )
    pairs = parse_specs(cfg.train)
    vals: list[str | None] = [None] * len(pairs)
    if cfg.val is not None:
        given = [cfg.val] if isinstance(cfg.val, str) else list(cfg.val)
        if len(given) != len(pairs):
            raise DataError(
                f"--val: {len(pairs)} datasets need one --val each (in --data's order), got "
                f"{len(given)}; or pass --val-split, or none for datasets with their own"
            )
        vals = [_split_name(v)[1] for v in given]
    if classes is None:  # a new run (a resumed one keeps the datasets it began with)
        check_distinct(pairs, vals)
    exclude = list(exclude)
    trains, valids, hows, notes = [], [], [], []
    for (name, spec), val in zip(pairs, vals, strict=True):
        own = sub_stored = None
        if classes is not None:
            own = _own(classes, name)
            if not own:
                raise DataError(
                    f"the run has no classes of dataset {name!r} (its classes: "
                    f"{list(classes)[:6]}...); a resumed run keeps its datasets and names"
                )
        if stored is not None and own is not None:
            sub_stored = {
                "classes": own,
                "train": _stored_part(stored["train"], name, classes, own),  # type: ignore[arg-type]
                "val": _stored_part(stored["val"], name, classes, own),  # type: ignore[arg-type]
            }
        sub = type(cfg)(train=spec, val=val, val_split=cfg.val_split, workers=cfg.workers)
        part = open_data(sub, seed, exclude, own, sub_stored, stratify)
        trains.append((name, part.train))
        valids.append((name, part.val))
        hows.append(f"{name}: {part.how}")
        notes += part.notes
    train, val = Mixture(trains), Mixture(valids)
    if classes is not None and list(classes) != train.classes:
        raise DataError(
            f"the run's classes {list(classes)[:4]}... are not its datasets' "
            f"{train.classes[:4]}...: was --data reordered or renamed?"
        )
    return RunData(train, val, train.classes, "; ".join(hows), notes)


def open_member(text: str, part: str = "val", exclude: Iterable[str] = ()) -> Mixture:
    """One dataset of a mixture, on its own (``fastprompt evaluate RUN --data NAME=PATH``): a
    :class:`Mixture` of one, so its classes are ``NAME/class`` as in the run."""
    from fastprompt.train.datasets import open_dataset

    name, spec = _split_name(text)
    return Mixture([(name or _default_name(spec), open_dataset(spec, part, exclude))])


# -- per-dataset metrics ---------------------------------------------------------------------------


def class_domains(classes: Sequence[str]) -> tuple[list[str], Tensor]:
    """The datasets of a joint label space and the dataset index of every class.

    Returns
    -------
    names : list of str
        In order of first appearance.
    domains : Tensor, shape (C,), int64
    """
    names: list[str] = []
    index = []
    for c in classes:
        name, sep, _ = c.partition(SEP)
        if not sep:
            raise ValueError(f"class {c!r} is not NAME{SEP}class: not a mixture's class map")
        if name not in names:
            names.append(name)
        index.append(names.index(name))
    return names, torch.tensor(index, dtype=torch.int64)


# Columns of domain_stats: per dataset, summed over batches and processes.
STAT_COLUMNS = ("samples", "correct", "loss_sum", "correct_within", "in_domain")


def upcast(logits: Tensor) -> Tensor:
    """``logits`` in at least float32 for the loss: half-precision (autocast) logits are
    upcast, float32 and float64 ones kept (``.float()`` cut a float64 model's to float32).

    Parameters
    ----------
    logits : Tensor, shape (B, C)

    Returns
    -------
    Tensor, shape (B, C)
    """
    if logits.dtype.is_floating_point and logits.dtype.itemsize < 4:
        return logits.float()
    return logits


def domain_stats(logits: Tensor, labels: Tensor, domains: Tensor) -> Tensor:
    """Per-dataset sums of one batch (:data:`STAT_COLUMNS`).

    Parameters
    ----------
    logits : Tensor, shape (B, C)
    labels : Tensor, shape (B,)
        Joint labels.
    domains : Tensor, shape (C,)
        Dataset index of every class (:func:`class_domains`).

    Returns
    -------
    Tensor, shape (G, 5), float64
        G = number of datasets.
    """
    logits = upcast(logits)
    domains = domains.to(logits.device)
    groups = int(domains.max()) + 1
    own = domains[labels]  # (B,)
    pred = logits.argmax(-1)
    # Among the image's own dataset's classes only (a head per dataset, the dataset known).
    mask = domains.unsqueeze(0) == own.unsqueeze(1)  # (B, C)
    within = logits.masked_fill(~mask, float("-inf")).argmax(-1)
    loss = F.cross_entropy(logits, labels, reduction="none")
    cols = torch.stack(
        [
            torch.ones_like(loss),
            (pred == labels).float(),
            loss,
            (within == labels).float(),
            (domains[pred] == own).float(),
        ],
        dim=1,
    ).double()
    out = torch.zeros(groups, len(STAT_COLUMNS), dtype=torch.float64, device=logits.device)
    return out.index_add_(0, own, cols)


def per_dataset(sums: Sequence[Sequence[float]], names: Sequence[str]) -> dict[str, dict]:
    """Per-dataset metrics from summed :func:`domain_stats`: ``samples``, ``acc``, ``loss``,
    ``acc_within``, ``domain_acc`` (datasets without samples are left out)."""
    out: dict[str, dict] = {}
    for name, row in zip(names, sums, strict=False):
        n = round(row[0])
        if n == 0:
            continue
        out[name] = {
            "samples": n,
            "acc": row[1] / n,
            "loss": row[2] / n,
            "acc_within": row[3] / n,
            "domain_acc": row[4] / n,
        }
    return out


def report_domains(run: str, config, log, device: torch.device | str = "cpu") -> None:
    """At the end of a PGN run over several datasets: ``domains.png`` and ``domains.json``
    (:func:`fastprompt.train.domains.run_report`), or a note saying why not."""
    if config.method != "pgn" or config.method_args.get("generator", "resnet10") is None:
        return
    from fastprompt.train import domains

    reason = domains.extra_missing()
    if reason:
        log(f"note: no domains.png: {reason}")
        return
    r = domains.run_report(run, device=device)
    log(
        f"domain discovery: the datasets separate by their mixture weights with nearest-centroid "
        f"accuracy {100 * r.separation:.1f}% (untrained: {_pct(r.separation_baseline)}, chance "
        f"{100 * r.chance:.1f}%): {r.png}"
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def describe(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """One line: ``name acc%`` per dataset."""
    return "  ".join(f"{name} {100 * m['acc']:.2f}%" for name, m in metrics.items())
