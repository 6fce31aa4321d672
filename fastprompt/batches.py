"""One batch convention for every loop (training, evaluation, scoring).

A loader may yield

- a tuple or list ``(images, labels, *extra)``: the first two items are used, the rest ignored;
- a mapping with an image key (``"image"``, ``"images"``, ``"pixel_values"``, ``"x"``,
  ``"input"``, ``"inputs"``) and a label key (``"label"``, ``"labels"``, ``"target"``,
  ``"targets"``, ``"y"``), as Hugging Face datasets and many pipelines do;
- anything else, with a ``batch_fn(batch) -> (images, labels)`` passed to the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "BatchFn", "batches", "split_batch"]

IMAGE_KEYS = ("image", "images", "pixel_values", "x", "input", "inputs")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")

BatchFn = Callable[[Any], tuple[Tensor, Tensor]]


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
    loader: Iterable, device: torch.device, batch_fn: BatchFn | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` of every batch of ``loader``, moved to ``device``."""
    for batch in loader:
        x, y = split_batch(batch, batch_fn)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
