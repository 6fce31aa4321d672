"""Prompt sources: where a prompted ViT's prompt tokens come from.

A source is a small ``nn.Module`` that owns its parameters and answers a few questions for the
prompted core (:class:`fastprompt.prompted.PromptedViT`): where its prompts go in the token
sequence, whether each block receives its own set, and what the tokens are. VPT's learned
per-block sets (:mod:`fastprompt.sources.learned`) are one; PGN's generated per-image sets are
another. The core adopts a source's parameters under their own names, so a method's state-dict
keys are its official ones (``prompt_embeddings``, not ``source.prompt_embeddings``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

__all__ = ["POSITIONS", "PromptSource"]

# "prefix": after the class and register tokens, before the patches (VPT).
# "suffix": after the patches (PGN).
POSITIONS = ("prefix", "suffix")


class PromptSource(nn.Module):
    """Base class of prompt sources.

    Attributes
    ----------
    position : {"prefix", "suffix"}
        Where the prompts are inserted, after the positional embedding (prompts get none).
    deep : bool
        Each block receives its own set, overwriting the previous block's prompt outputs
        (VPT-deep); otherwise one set enters block 0 and flows through every block as tokens.
    """

    position: ClassVar[str] = "prefix"
    deep: bool = False

    def count(self, block: int) -> int:
        """Prompts block ``block`` receives (for a non-deep source: the count of block 0's set)."""
        raise NotImplementedError

    def prepare(self, images: Tensor) -> Any:
        """Per-forward state computed from the images (B, C, H, W); None for most sources."""
        return None

    def tokens(self, block: int, batch: int, state: Any) -> Tensor:
        """Prompt tokens inserted before ``block``: (1, P, D) shared, or (B, P, D) per image."""
        raise NotImplementedError

    def shared(self, block: int) -> Tensor | None:
        """The image-independent set of ``block`` (1, P, D) as used at inference, or None.

        A source whose prompts depend on the image returns None; then nothing can be computed
        once per model and cached.
        """
        return None

    def config(self) -> Any:
        """The source's configuration (a dataclass), recorded in checkpoints."""
        raise NotImplementedError
