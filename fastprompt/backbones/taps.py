"""What timm's ``forward_intermediates`` of each model family takes and returns, on the prompted
token state (``docs/design.md`` §4, "Intermediates").

A :class:`Taps` object answers, for one backbone adapter: after which block each of timm's
intermediates is taken (a ViT: every block; a Swin: the last block of every stage), how the token
state after that block becomes the intermediate (the prompt tokens removed, timm's norm and
layout), and what the final output is. The prompted core runs the blocks and asks it; it reads no
timm attribute itself. An adapter offers its family's through :meth:`Backbone.taps`; one that
offers none has no intermediates (:func:`taps_for` says so).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from fastprompt.backbones.base import Backbone
    from fastprompt.backbones.swin import SwinTokens

__all__ = ["SwinTaps", "Taps", "ViTTaps", "taps_for"]


class Taps:
    """timm's intermediates of one model family, taken from the prompted token state.

    Class attributes
    ----------------
    formats : tuple of str
        The ``output_fmt`` values the family takes (the first is timm's default).
    arguments : tuple of str
        The arguments of the family's timm ``forward_intermediates`` after ``indices``, in its
        order (positional arguments bind to them); any other is refused.
    layers_api : bool
        Whether the family's timm model has ``get_intermediate_layers`` (a ViT's).
    """

    formats: ClassVar[tuple[str, ...]] = ("NCHW",)
    arguments: ClassVar[tuple[str, ...]] = (
        "norm",
        "stop_early",
        "output_fmt",
        "intermediates_only",
    )
    layers_api: ClassVar[bool] = False

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def blocks(self) -> list[int]:
        """The block after which intermediate k is taken, for every k (timm's indices count
        these)."""
        raise NotImplementedError

    def take(self, tokens: Any, held: int, position: str, index: int, norm: bool) -> Tensor:
        """Intermediate ``index`` from the token state after its block (``held`` prompt tokens in
        it, at ``position``): the prompt tokens removed, normalised as timm does under ``norm``,
        in the family's own layout (:meth:`output`'s input)."""
        raise NotImplementedError

    def output(
        self, taken: list[Tensor], fmt: str, image_size: tuple[int, int]
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """The intermediates in format ``fmt`` for images of ``image_size`` (H, W), and the
        prefix tokens of each (None for a family or model without them)."""
        raise NotImplementedError

    def stopped(self, tokens: Any) -> Tensor:
        """The final output of a ``stop_early`` call that stopped before the last block, from
        the token state there without prompt tokens, as timm's: by default the adapter's
        ``features`` (a ViT: timm's final norm)."""
        return self.backbone.features(tokens)


class ViTTaps(Taps):
    """timm ``VisionTransformer``: every block's output, class and register tokens split off
    as timm's prefix tokens, ``NCHW`` (a (B, D, h, w) map) or ``NLC`` (B, h·w, D)."""

    formats = ("NCHW", "NLC")
    arguments = (
        "return_prefix_tokens",
        "norm",
        "stop_early",
        "output_fmt",
        "intermediates_only",
        "output_dict",
        "attn_mask",
        "is_causal",
    )
    layers_api = True

    def blocks(self) -> list[int]:
        return list(range(self.backbone.depth))

    def take(self, tokens: Tensor, held: int, position: str, index: int, norm: bool) -> Tensor:
        if held:
            tokens = self.backbone.remove(tokens, held, position)
        # The final norm acts token by token: on the image tokens alone it is timm's.
        return self.backbone.model.norm(tokens) if norm else tokens

    def _grid(self, image_size: tuple[int, int], tokens: int) -> tuple[int, int]:
        """The (h, w) patch grid of an image, as timm's patch embedding makes it."""
        pe = self.backbone.model.patch_embed
        grid = getattr(pe, "dynamic_feat_size", None)
        if callable(grid):
            h, w = grid(image_size)
        else:  # timm before dynamic_feat_size: the grid its convolution gives
            (ph, pw), pad = self.backbone.patch_size(), getattr(pe, "dynamic_img_pad", False)
            size = (lambda n, p: math.ceil(n / p)) if pad else (lambda n, p: n // p)
            h, w = size(image_size[0], ph), size(image_size[1], pw)
        if h * w != tokens:
            raise ValueError(
                f"forward_intermediates: {tokens} patch tokens are not the {h}x{w} grid of a "
                f"{image_size[0]}x{image_size[1]} image; use output_fmt='NLC'"
            )
        return int(h), int(w)

    def output(
        self, taken: list[Tensor], fmt: str, image_size: tuple[int, int]
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        npre = int(self.backbone.model.num_prefix_tokens)
        prefix = [y[:, :npre] for y in taken] if npre else None
        spatial = [y[:, npre:] for y in taken]
        if fmt == "NCHW" and spatial:
            b, n, _ = spatial[0].shape
            h, w = self._grid(image_size, n)
            spatial = [y.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
        return spatial, prefix


class SwinTaps(Taps):
    """timm ``SwinTransformer``: every stage's output (B, C_s, H_s, W_s) (``NHWC``: the map as
    the stage keeps it, (B, H_s, W_s, C_s), which timm itself does not offer); the final norm
    applies to the last stage only, which it is sized for."""

    formats = ("NCHW", "NHWC")

    def blocks(self) -> list[int]:
        ends, total = [], 0
        for count in self.backbone.stages():
            total += count
            ends.append(total - 1)
        return ends

    def take(self, tokens: SwinTokens, held: int, position: str, index: int, norm: bool) -> Tensor:
        patches = tokens.patches
        if norm and index == len(self.backbone.stages()) - 1:
            return self.backbone.model.norm(patches)
        return patches

    def output(
        self, taken: list[Tensor], fmt: str, image_size: tuple[int, int]
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        if fmt == "NCHW":
            taken = [y.permute(0, 3, 1, 2).contiguous() for y in taken]
        return taken, None

    def stopped(self, tokens: SwinTokens) -> Tensor:
        """Before the last stage, as timm, without the final norm (sized for the last stage), in
        ``forward_features``' flat layout: (B, H·W, C)."""
        return tokens.patches.flatten(1, 2)


def taps_for(backbone: Backbone, who: str) -> Taps:
    """The intermediates of ``backbone``'s family (its adapter's :meth:`Backbone.taps`).

    Raises
    ------
    TypeError
        The adapter offers none (the message starts with ``who``).
    """
    taps = backbone.taps()
    if taps is None:
        raise TypeError(
            f"{who}: a {backbone.description or type(backbone).__name__} has no intermediates in "
            "fastprompt (its backbone adapter offers no taps())"
        )
    return taps
