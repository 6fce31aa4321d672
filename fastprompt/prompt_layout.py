"""Prompt patches laid out as extra rows of patches below an image (PGN's pixel deployment).

A prompt inverted to a pixel patch (:mod:`fastprompt.inversion`) goes below the image, row-major,
W / p_w to a row (ViT-B/32 at 224: 7 per row, the paper's 14 prompts = 2 rows; 16 prompts = 3
rows with 5 empty slots in the last). :mod:`fastprompt.deployment` runs a frozen ViT on such a
taller image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastprompt._numbers import as_int

__all__ = ["PromptRows", "append_prompt_rows", "prompt_rows", "split_prompt_rows"]


@dataclass(frozen=True)
class PromptRows:
    """Where L prompt patches go below an image: row-major, ``per_row`` to a row.

    Attributes
    ----------
    num_prompts, per_row, rows : int
    padding : int
        Empty slots at the end of the last row (0 when the prompts fill whole rows).
    image_size, patch_size : (int, int)
    """

    num_prompts: int
    per_row: int
    rows: int
    padding: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]

    @property
    def tall_size(self) -> tuple[int, int]:
        """(H + rows·p_h, W): the image with its prompt rows."""
        return self.image_size[0] + self.rows * self.patch_size[0], self.image_size[1]


def _pair(v: object, name: str, who: str) -> tuple[int, int]:
    """``v`` (an int or a pair of them, numpy's and 0-d tensors' included) as two ints >= 1."""
    pair = (v, v) if as_int(v) is not None else v
    sizes = [as_int(s) for s in pair] if isinstance(pair, tuple | list | torch.Size) else []
    if len(sizes) != 2 or any(s is None or s < 1 for s in sizes):
        raise ValueError(f"{who}: {name} must be an int >= 1 or a pair of them, got {v!r}")
    return sizes[0], sizes[1]  # type: ignore[return-value]


def prompt_rows(
    num_prompts: int, image_size: int | tuple[int, int], patch_size: int | tuple[int, int]
) -> PromptRows:
    """The row layout of ``num_prompts`` prompt patches below an image.

    The image must tile into whole patches. ViT-B/32 at 224: 7 per row, 14 prompts = 2 rows;
    16 prompts = 3 rows with 5 empty slots in the last.
    """
    who = "prompt_rows"
    count = as_int(num_prompts)
    if count is None or count < 1:
        raise ValueError(f"{who}: num_prompts must be an int >= 1, got {num_prompts!r}")
    (h, w), (ph, pw) = _pair(image_size, "image_size", who), _pair(patch_size, "patch_size", who)
    if h % ph or w % pw:
        raise ValueError(f"{who}: image_size {(h, w)} does not tile into patches {(ph, pw)}")
    per_row = w // pw
    rows = -(-count // per_row)
    return PromptRows(count, per_row, rows, rows * per_row - count, (h, w), (ph, pw))


def append_prompt_rows(images: Tensor, patches: Tensor, pad_value: float = 0.0) -> Tensor:
    """Lay prompt patches out as extra rows below the images (the paper's figure).

    Parameters
    ----------
    images : Tensor
        (B, C, H, W) normalised images; H and W multiples of the patch size.
    patches : Tensor
        (B, L, C, p_h, p_w) prompt patches, placed row-major, W / p_w to a row.
    pad_value : float
        Fill of the empty slots of an incomplete last row, in normalised units (0 = the
        normalisation mean colour). A plain ViT would attend to those slots, so only
        :func:`deployment_forward` (which drops them) stays exact with padding.

    Returns
    -------
    Tensor
        (B, C, H + rows·p_h, W).
    """
    who = "append_prompt_rows"
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{who}: images must be (B, C, H, W), got {got}")
    if not isinstance(patches, Tensor) or patches.ndim != 5:
        got = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
        raise ValueError(f"{who}: patches must be (B, L, C, p_h, p_w), got {got}")
    b, c, h, w = images.shape
    if patches.shape[0] != b or patches.shape[2] != c:
        raise ValueError(
            f"{who}: patches {tuple(patches.shape)} do not match images {tuple(images.shape)} "
            "in batch size or channels"
        )
    ph, pw = patches.shape[-2:]
    layout = prompt_rows(patches.shape[1], (h, w), (ph, pw))
    slots = patches.new_full((b, layout.rows * layout.per_row, c, ph, pw), pad_value)
    slots[:, : layout.num_prompts] = patches.to(slots.dtype)
    rows = slots.view(b, layout.rows, layout.per_row, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    rows = rows.reshape(b, c, layout.rows * ph, layout.per_row * pw)
    return torch.cat([images, rows.to(images.dtype)], dim=2)


def split_prompt_rows(
    tall: Tensor, image_height: int, num_prompts: int, patch_size: int | tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`append_prompt_rows`: (B, C, H', W) -> images (B, C, H, W), patches.

    Returns
    -------
    (Tensor, Tensor)
        The images and the (B, L, C, p_h, p_w) prompt patches (empty slots dropped).
    """
    who = "split_prompt_rows"
    if not isinstance(tall, Tensor) or tall.ndim != 4:
        got = tuple(tall.shape) if isinstance(tall, Tensor) else type(tall).__name__
        raise ValueError(f"{who}: tall must be (B, C, H', W), got {got}")
    b, c, th, w = tall.shape
    layout = prompt_rows(num_prompts, (image_height, w), patch_size)
    if th != layout.tall_size[0]:
        raise ValueError(
            f"{who}: tall images are {th} high; an image of height {image_height} with "
            f"{num_prompts} prompts in rows of {layout.per_row} needs {layout.tall_size[0]}"
        )
    ph, pw = layout.patch_size
    rows = tall[:, :, image_height:].reshape(b, c, layout.rows, ph, layout.per_row, pw)
    slots = rows.permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c, ph, pw)
    return tall[:, :, :image_height], slots[:, :num_prompts]
