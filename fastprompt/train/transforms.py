"""Transforms of the training layer: the model's input size, normalisation, VPT's and PGN's
pipelines (PIL image → normalised (3, H, W) float tensor)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["MEANS", "build_transform", "image_size", "normalization"]

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
