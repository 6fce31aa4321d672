"""Transforms of the training layer: the model's input size, normalisation, VPT's and PGN's
pipelines (PIL image → normalised (3, H, W) float tensor)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

__all__ = [
    "MEANS",
    "RESIZE_ROUNDINGS",
    "build_transform",
    "image_size",
    "normalization",
    "resize_size",
]

# (mean, std) of the named normalisations; "backbone" reads the model's timm pretrained_cfg.
MEANS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


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


# How size / crop_pct becomes a whole number of pixels: "floor" is the official VPT table (224 →
# 256, 384 → 438, 448 → 512) and timm's rule; runs made before the choice existed rounded (384 →
# 439), and keep doing so (Recipe.from_dict).
RESIZE_ROUNDINGS = ("floor", "round")


def resize_size(size: int, crop_pct: float, rounding: str = "floor") -> int:
    """The shorter side an image is resized to before a ``size`` crop: ``size / crop_pct`` floored
    (the official VPT values: 256 for 224, 438 for 384, 512 for 448) or rounded."""
    if rounding not in RESIZE_ROUNDINGS:
        raise ValueError(f"resize rounding must be one of {RESIZE_ROUNDINGS}, got {rounding!r}")
    exact = size / crop_pct
    # 1e-9: a quotient that is whole in exact arithmetic (224 / 0.875) stays whole in floats.
    return math.floor(exact + 1e-9) if rounding == "floor" else round(exact)


def build_transform(
    kind: str,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 0.875,
    rounding: str = "floor",
):
    """A torchvision transform: PIL image → normalised (3, H, W) float tensor.

    ``size / crop_pct`` is turned into pixels by :func:`resize_size` (``rounding``).

    - ``resize-crop``: shorter side to ``size / crop_pct``, centre crop (VPT's FGVC test path);
    - ``resize``: straight to ``size``, aspect not kept, no augmentation (VPT's and E²VPT's
      VTAB-1k path, train and test); PIL's resize antialiases when it shrinks, the official
      ``tf.image.resize`` (bilinear, ``antialias=False``) does not;
    - ``fgvc``: shorter side to ``size / crop_pct``, random crop, horizontal flip p 0.5 (VPT's and
      E²VPT's FGVC training path, their recipes' default);
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
    resize_to = (resize_size(h, crop_pct, rounding), resize_size(w, crop_pct, rounding))
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
