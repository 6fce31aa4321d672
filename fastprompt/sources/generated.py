"""PGN's prompt sources: per-image prompts mixed from a token library, and the IIP baseline.

Prompt Generation Networks (Loedeman et al.; official code jochemloedeman/PGN): a generator CNN
(:mod:`fastprompt.sources.generators`) maps each image to logits (B, L, M); a softmax over M (a
sigmoid as the official option) gives mixture weights, and the image's L prompts are those weights
times a library of M learned tokens (``library``, (M, D), N(0, 0.02)). The prompts go after the
patches, after the positional embedding (they get none) and before ``norm_pre``, and flow through
every block as tokens (``docs/design.md`` §2).

IIP, the paper's input-independent baseline, is the same pipeline with one learned set of L tokens
(``prompt_vectors``, (L, D), N(0, 0.02)) shared by every image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.sources import PromptSource
from fastprompt.sources.generators import build_generator, generator_input

__all__ = ["GeneratedPrompts", "InputIndependentPrompts"]


class _AfterPatches(PromptSource):
    """What PGN and IIP share: L prompts after the patches, entering block 0 only."""

    position = "suffix"

    def __init__(self, num_prompts: int, config: Any) -> None:
        super().__init__()
        self.num_prompts = num_prompts
        self._config = config

    def config(self) -> Any:
        return self._config

    def count(self, block: int) -> int:
        return self.num_prompts if block == 0 else 0


class GeneratedPrompts(_AfterPatches):
    """PGN: each image's L prompts mixed from a library by a generator CNN.

    Parameters
    ----------
    num_prompts : int
        L, prompts per image.
    library_size : int
        M, tokens in the library.
    generator : str
        A name of :data:`fastprompt.sources.generators.GENERATORS`.
    activation : {"softmax", "sigmoid"}
        Over the M mixture logits of each prompt.
    resolution : int
        Shorter side the images are resized to for the generator.
    width : int
        The backbone's width D.
    generator_options : mapping, optional
        More arguments for the generator.
    config : dataclass
        The building method's configuration, handed back by :meth:`config`.
    device, dtype
        Of the backbone's weights.
    in_chans : int
        Channels of the backbone's images (the generator reads the same images).
    """

    inputs = ()  # prepare passes any keyword to the base, which refuses it

    def __init__(
        self,
        num_prompts: int,
        library_size: int,
        generator: str,
        activation: str,
        resolution: int,
        width: int,
        generator_options: Mapping[str, Any] | None = None,
        config: Any = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__(num_prompts, config)
        self.activation = activation
        self.resolution = resolution
        options = dict(generator_options or {})
        if in_chans != 3 and "in_chans" not in options:
            if generator != "resnet10":
                raise ValueError(
                    f"fastprompt.pgn: the {generator} generator reads 3-channel images, "
                    f"but the model takes {in_chans}; use generator='resnet10'"
                )
            options["in_chans"] = in_chans
        self.generator = build_generator(generator, num_prompts, library_size, **options).to(
            device, dtype
        )
        smallest = self.generator.min_input_size
        if resolution < smallest:
            raise ValueError(
                f"fastprompt.pgn: resolution={resolution} is smaller than the {generator} "
                f"generator can take (>= {smallest} pixels)"
            )
        library = torch.empty(library_size, width, device=device, dtype=dtype)
        self.library = nn.Parameter(library.normal_(0.0, 0.02))

    def mixture(self, images: Tensor) -> Tensor:
        """Mixture weights (B, L, M) of each image's prompts over the library."""
        logits = self.generator(generator_input(images, self.resolution))
        return logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()

    def prepare(self, images: Tensor, **inputs: Any) -> Tensor:
        """The images' prompts (B, L, D): mixture weights times the library."""
        super().prepare(images, **inputs)
        return torch.einsum("blm,md->bld", self.mixture(images), self.library)

    def tokens(self, block: int, batch: int, state: Tensor) -> Tensor:
        return state

    def extra_repr(self) -> str:
        return (
            f"num_prompts={self.num_prompts}, library_size={self.library.shape[0]}, "
            f"activation={self.activation!r}, resolution={self.resolution}"
        )


class InputIndependentPrompts(_AfterPatches):
    """IIP: one learned set of L prompts shared by every image, placed where PGN puts its own.

    Parameters
    ----------
    num_prompts : int
    width : int
        The backbone's width D.
    config : dataclass
        The building method's configuration, handed back by :meth:`config`.
    device, dtype
        Of the backbone's weights.
    """

    def __init__(
        self,
        num_prompts: int,
        width: int,
        config: Any = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_prompts, config)
        vectors = torch.empty(num_prompts, width, device=device, dtype=dtype)
        self.prompt_vectors = nn.Parameter(vectors.normal_(0.0, 0.02))

    def shared(self, block: int) -> Tensor:
        return self.prompt_vectors.unsqueeze(0)

    def tokens(self, block: int, batch: int, state: object = None) -> Tensor:
        return self.shared(block)

    def extra_repr(self) -> str:
        return f"num_prompts={self.num_prompts}, generator=None (IIP)"
