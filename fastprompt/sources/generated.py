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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.sources import PromptSource
from fastprompt.sources.generators import GENERATORS, build_generator, generator_input
from fastprompt.sources.learned import READOUTS

__all__ = ["ACTIVATIONS", "GeneratedPrompts", "InputIndependentPrompts", "PGNConfig"]

ACTIVATIONS = ("softmax", "sigmoid")


def _count(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"fastprompt.pgn: {name} must be an int >= 1, got {type(value).__name__} ({value!r})"
        )
    if value < 1:
        raise ValueError(f"fastprompt.pgn: {name} must be >= 1, got {value}")


@dataclass(frozen=True)
class PGNConfig:
    """How a PGN (or IIP) model is prompted; saved with its checkpoints.

    Attributes
    ----------
    num_prompts : int
        L, prompts per image (the official default 16).
    library_size : int
        M, tokens in the library (the official training scripts: 256).
    generator : str or None
        ``"resnet10"`` (official), ``"resnet18"``, or None for IIP (no generator, no library).
    activation : {"softmax", "sigmoid"}
        Over the M mixture logits of each prompt.
    resolution : int
        Shorter side the images are resized to for the generator (224).
    readout : str
        ``"cls"``, or for average-pooled backbones ``"patches+prompts"`` (prompt outputs pooled
        too, which is what a plain ViT reading the image with its prompt rows computes).
    generator_options : dict
        More arguments for the generator (``max_pool``, ``widths``, ``blocks_per_stage``).
    """

    num_prompts: int = 16
    library_size: int = 256
    generator: str | None = "resnet10"
    activation: str = "softmax"
    resolution: int = 224
    readout: str = "cls"
    generator_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _count(self.num_prompts, "num_prompts")
        _count(self.library_size, "library_size")
        _count(self.resolution, "resolution")
        if self.generator is not None and self.generator not in GENERATORS:
            raise ValueError(
                f"fastprompt.pgn: generator must be one of {GENERATORS} or None (IIP), got "
                f"{self.generator!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"fastprompt.pgn: activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.readout not in READOUTS:
            raise ValueError(
                f"fastprompt.pgn: readout must be one of {READOUTS}, got {self.readout!r}"
            )
        if not isinstance(self.generator_options, dict):
            raise TypeError(
                "fastprompt.pgn: generator_options must be a dict, got "
                f"{type(self.generator_options).__name__}"
            )


class _AfterPatches(PromptSource):
    """What PGN and IIP share: L prompts after the patches, entering block 0 only."""

    position = "suffix"
    deep = False

    def __init__(self, config: PGNConfig) -> None:
        super().__init__()
        self._config = config

    def config(self) -> PGNConfig:
        return self._config

    def count(self, block: int) -> int:
        return self._config.num_prompts


class GeneratedPrompts(_AfterPatches):
    """PGN: each image's L prompts mixed from a library by a generator CNN.

    Parameters
    ----------
    config : PGNConfig
        With a generator.
    embed_dim : int
        The backbone's width D.
    device, dtype
        Of the backbone's weights.
    in_chans : int
        Channels of the backbone's images (the generator reads the same images).
    """

    def __init__(
        self,
        config: PGNConfig,
        embed_dim: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__(config)
        options = dict(config.generator_options)
        if in_chans != 3 and "in_chans" not in options:
            if config.generator != "resnet10":
                raise ValueError(
                    f"fastprompt.pgn: the {config.generator} generator reads 3-channel images, "
                    f"but the model takes {in_chans}; use generator='resnet10'"
                )
            options["in_chans"] = in_chans
        self.generator = build_generator(
            config.generator, config.num_prompts, config.library_size, **options
        ).to(device, dtype)
        smallest = self.generator.min_input_size
        if config.resolution < smallest:
            raise ValueError(
                f"fastprompt.pgn: resolution={config.resolution} is smaller than the "
                f"{config.generator} generator can take (>= {smallest} pixels)"
            )
        library = torch.empty(config.library_size, embed_dim, device=device, dtype=dtype)
        self.library = nn.Parameter(library.normal_(0.0, 0.02))

    def mixture(self, images: Tensor) -> Tensor:
        """Mixture weights (B, L, M) of each image's prompts over the library."""
        logits = self.generator(generator_input(images, self._config.resolution))
        return logits.softmax(-1) if self._config.activation == "softmax" else logits.sigmoid()

    def prepare(self, images: Tensor) -> Tensor:
        """The images' prompts (B, L, D): mixture weights times the library."""
        return torch.einsum("blm,md->bld", self.mixture(images), self.library)

    def tokens(self, block: int, batch: int, state: Tensor) -> Tensor:
        return state

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"num_prompts={c.num_prompts}, library_size={c.library_size}, "
            f"generator={c.generator!r}, activation={c.activation!r}, resolution={c.resolution}"
        )


class InputIndependentPrompts(_AfterPatches):
    """IIP: one learned set of L prompts shared by every image, placed where PGN puts its own."""

    def __init__(
        self,
        config: PGNConfig,
        embed_dim: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(config)
        vectors = torch.empty(config.num_prompts, embed_dim, device=device, dtype=dtype)
        self.prompt_vectors = nn.Parameter(vectors.normal_(0.0, 0.02))

    def shared(self, block: int) -> Tensor:
        return self.prompt_vectors.unsqueeze(0)

    def tokens(self, block: int, batch: int, state: object = None) -> Tensor:
        return self.shared(block)

    def extra_repr(self) -> str:
        return f"num_prompts={self._config.num_prompts}, generator=None (IIP)"
