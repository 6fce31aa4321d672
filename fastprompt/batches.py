"""One batch convention for every loop (training, evaluation, scoring).

A loader may yield

- a tuple or list ``(images, labels, *extra)``: the first two items are used, the rest ignored;
- a mapping with an image key (``"image"``, ``"images"``, ``"pixel_values"``, ``"x"``,
  ``"input"``, ``"inputs"``) and a label key (``"label"``, ``"labels"``, ``"target"``,
  ``"targets"``, ``"y"``), as Hugging Face datasets and many pipelines do;
- anything else, with a ``batch_fn(batch) -> (images, labels)`` passed to the loop.

Labels are class indices of any integer dtype (made ``int64`` for the loss); every loop checks
them the same way (:func:`check_batch`) and refuses float, negative (``-100`` included: the loops
need every sample labelled) and out-of-range labels, and batches that look swapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "BatchFn",
    "LabelError",
    "batches",
    "check_batch",
    "check_reiterable",
    "head_classes",
    "input_dtype",
    "split_batch",
    "to_model",
]

IMAGE_KEYS = ("image", "images", "pixel_values", "x", "input", "inputs")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")

BatchFn = Callable[[Any], tuple[Tensor, Tensor]]


class LabelError(ValueError):
    """Labels that do not fit the model's head."""


def head_classes(model: Any) -> int | None:
    """Classes the model's head predicts (None for a model without a Linear head); a prompted
    model is asked about the model it wraps."""
    inner = getattr(model, "model", model) if hasattr(model, "source") else model
    head = inner.get_classifier() if hasattr(inner, "get_classifier") else None
    if isinstance(head, torch.nn.Linear):
        return head.out_features
    n = getattr(inner, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def input_dtype(model: Any) -> torch.dtype | None:
    """The floating dtype the model's weights hold (a prompted model: the model it wraps), which
    its images must have; None for a model without floating weights."""
    inner = getattr(model, "model", model) if hasattr(model, "source") else model
    params = inner.parameters() if hasattr(inner, "parameters") else ()
    return next((p.dtype for p in params if p.is_floating_point()), None)


def to_model(
    images: Tensor, labels: Tensor, device: torch.device, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` on ``device``, floating images in ``dtype`` (:func:`input_dtype`), so
    that a bfloat16 or float16 model reads a float32 loader as the device move lets a GPU model
    read a CPU one."""
    cast = dtype if dtype is not None and images.is_floating_point() else None
    return images.to(device, cast, non_blocking=True), labels.to(device, non_blocking=True)


def _shape(t: Any) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def check_batch(images: Any, labels: Any, classes: int | None, where: str) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` checked for a classification loss, labels as ``int64``.

    Parameters
    ----------
    images : Tensor, shape (B, C, H, W)
    labels : Tensor of an integer dtype, shape (B,)
    classes : int or None
        The head's class count; labels must be in ``[0, classes)`` (checked on CPU labels only:
        a GPU check would synchronise every step).
    where : str
        Who asks, for the message (``"train"``, ``"score_prompts"``).

    Raises
    ------
    TypeError
        A batch that is not (images, labels) tensors, or looks like (labels, images).
    LabelError
        Labels that are not class indices of the head.
    """
    if isinstance(images, Tensor) and isinstance(labels, Tensor):
        if images.dim() <= 1 and labels.dim() >= 3:
            raise TypeError(
                f"{where}: the batch looks like (labels, images): first item {_shape(images)}, "
                f"second {_shape(labels)}; yield (images, labels), or pass "
                "batch_fn=lambda b: (b[1], b[0])"
            )
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"{where}: a batch must hold an images tensor and a labels tensor, got "
            f"({_shape(images)}, {_shape(labels)})"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise LabelError(f"{where}: labels must be integer class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise LabelError(
            f"{where}: labels must be one class index per image, shape ({images.shape[0]},); got "
            f"{tuple(labels.shape)} for images {tuple(images.shape)}"
        )
    if labels.dtype != torch.int64:
        labels = labels.long()  # int32/uint8 labels: cross-entropy takes int64 only
    if classes is None or labels.device.type != "cpu" or labels.numel() == 0:
        return images, labels
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        bad = hi if hi >= classes else lo
        note = (
            " (-100 is cross-entropy's ignore index; every sample needs a class)"
            if bad == -100
            else ""
        )
        raise LabelError(
            f"{where}: label {bad} does not fit the model's head of {classes} classes (labels "
            f"must be in [0, {classes - 1}]){note}; build the model with num_classes matching "
            "the dataset"
        )
    return images, labels


def check_reiterable(loader: Any, passes: int, who: str) -> None:
    """Refuse a one-shot iterator (a generator) where ``passes`` > 1 passes over it are needed.

    Raises
    ------
    TypeError
    """
    if passes > 1 and iter(loader) is loader:
        raise TypeError(
            f"{who}: the loader is a one-shot iterator ({type(loader).__name__}), but {passes} "
            "passes over the data are needed and a second pass would find it empty; pass a "
            "DataLoader, a list of batches, or another iterable that starts over"
        )


def split_batch(batch: Any, batch_fn: BatchFn | None = None) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of one batch, by the convention above.

    Raises
    ------
    TypeError
        For a batch that follows none of the conventions; the message says what was found.
    """
    if batch_fn is not None:
        out = batch_fn(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                f"batch_fn must return (images, labels), got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        return out[0], out[1]
    if isinstance(batch, Mapping):
        image = next((k for k in IMAGE_KEYS if k in batch), None)
        label = next((k for k in LABEL_KEYS if k in batch), None)
        if image is None or label is None:
            raise TypeError(
                f"a dict batch needs an image key {IMAGE_KEYS} and a label key {LABEL_KEYS}, got "
                f"keys {sorted(map(str, batch))}; or pass batch_fn=lambda b: (images, labels)"
            )
        return batch[image], batch[label]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be (images, labels, ...) or a dict with image and label keys, got "
        f"{type(batch).__name__}; or pass batch_fn=lambda b: (images, labels)"
    )


def batches(
    loader: Iterable,
    device: torch.device,
    batch_fn: BatchFn | None = None,
    classes: int | None = None,
    check: str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` of every batch of ``loader``, moved to ``device`` (floating images to
    ``dtype``, :func:`to_model`); with ``check`` (who asks) each batch goes through
    :func:`check_batch` against ``classes`` first."""
    for batch in loader:
        x, y = split_batch(batch, batch_fn)
        if check is not None:
            x, y = check_batch(x, y, classes, check)
        yield to_model(x, y, device, dtype)
