"""VPT's learned prompt sets (KMnP/vpt): one before block 0 (shallow) or one per block (deep).

Parameter names are the official ones: ``prompt_embeddings`` (1, P, Dp) for block 0,
``deep_prompt_embeddings`` (L − 1, P, Dp) for the others (packed (Σ counts, Dp) when blocks keep
different counts after Prompt Condensation), ``prompt_proj`` (Identity, or a Linear Dp → D with
kaiming-normal fan-out init) and ``prompt_dropout``. Init: uniform(−v, v) with
v = sqrt(6 / (3·patch_h·patch_w + Dp)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from fastprompt.sources import PromptSource

__all__ = ["READOUTS", "LearnedPrompts", "VPTConfig"]

READOUTS = ("cls", "patches", "patches+prompts")


@dataclass(frozen=True)
class VPTConfig:
    """How a model is prompted; saved beside the prompts so a checkpoint rebuilds the wrapper.

    Attributes
    ----------
    num_prompts : int
        Prompt tokens per set (per block when deep).
    deep : bool
        A prompt set per block (VPT-deep) or one before block 0 (VPT-shallow).
    dropout : float
        Prompt dropout probability, applied per image after expanding over the batch.
    project : int
        Prompt dimension before a Linear projection to the model width; -1 means no projection.
    readout : str
        ``"cls"``, ``"patches"`` or ``"patches+prompts"`` (the official avg-pool path).
    layer_counts : tuple of int, optional
        Prompts per block after condensation (deep only); None means ``num_prompts`` in every
        block. Deep prompts of blocks ≥ 1 are then packed in one (Σ counts, Dp) parameter.
    """

    num_prompts: int
    deep: bool = True
    dropout: float = 0.0
    project: int = -1
    readout: str = "cls"
    layer_counts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_config(self)


def _check_config(c: VPTConfig) -> None:
    who = "fastprompt.vpt"
    if isinstance(c.num_prompts, bool) or not isinstance(c.num_prompts, int):
        raise TypeError(
            f"{who}: num_prompts must be an int, got {type(c.num_prompts).__name__} "
            f"({c.num_prompts!r})"
        )
    if c.num_prompts < 0:
        raise ValueError(f"{who}: num_prompts must be >= 0, got {c.num_prompts}")
    if not isinstance(c.deep, bool):
        raise TypeError(f"{who}: deep must be a bool, got {type(c.deep).__name__}")
    if isinstance(c.dropout, bool) or not isinstance(c.dropout, (int, float)):
        raise TypeError(
            f"{who}: dropout must be a float in [0, 1), got {type(c.dropout).__name__} "
            f"({c.dropout!r})"
        )
    if not 0.0 <= float(c.dropout) < 1.0:
        raise ValueError(f"{who}: dropout must be in [0, 1), got {c.dropout}")
    if (
        isinstance(c.project, bool)
        or not isinstance(c.project, int)
        or (c.project < 1 and c.project != -1)
    ):
        raise ValueError(f"{who}: project must be -1 (none) or a width >= 1, got {c.project!r}")
    if c.readout not in READOUTS:
        raise ValueError(f"{who}: readout must be one of {READOUTS}, got {c.readout!r}")
    counts = c.layer_counts
    if counts is not None:
        if not c.deep:
            raise ValueError(f"{who}: layer_counts needs deep prompts")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
            raise ValueError(f"{who}: layer_counts must hold ints >= 0, got {counts}")


class LearnedPrompts(PromptSource):
    """VPT's learned prompt sets.

    Parameters
    ----------
    config : VPTConfig
    embed_dim : int
        The backbone's width D.
    depth : int
        Number of blocks.
    patch : tuple of int
        Patch height and width (for the official init bound).
    device, dtype
        Of the backbone's weights.
    """

    position = "prefix"

    def __init__(
        self,
        config: VPTConfig,
        embed_dim: int,
        depth: int,
        patch: tuple[int, int],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._config = config
        self.deep = config.deep
        counts = config.layer_counts
        if counts is None:
            counts = (config.num_prompts,) * max(depth, 1)
        elif len(counts) != depth:
            raise ValueError(
                f"fastprompt.vpt: layer_counts must hold {depth} ints (one per block), got "
                f"{len(counts)}: {counts}"
            )
        self._counts = tuple(counts)
        self._offsets = [0]
        for n in counts[1:]:
            self._offsets.append(self._offsets[-1] + n)
        dim = embed_dim if config.project == -1 else config.project
        kw = {"device": device, "dtype": dtype}
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))
        self.prompt_embeddings = nn.Parameter(
            torch.empty(1, counts[0], dim, **kw).uniform_(-bound, bound)
        )
        if config.layer_counts is not None:
            deep = torch.empty(self._offsets[-1], dim, **kw)
        elif config.deep:
            deep = torch.empty(max(depth - 1, 0), config.num_prompts, dim, **kw)
        else:
            deep = None
        self.register_parameter(
            "deep_prompt_embeddings",
            None if deep is None else nn.Parameter(deep.uniform_(-bound, bound)),
        )
        if config.project == -1:
            self.prompt_proj = nn.Identity()
        else:
            self.prompt_proj = nn.Linear(dim, embed_dim, **kw)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_dropout = nn.Dropout(config.dropout)

    def config(self) -> VPTConfig:
        return self._config

    def set_dropout(self, p: float) -> None:
        """Change the prompt dropout, in the module and in the recorded config."""
        self._config = replace(self._config, dropout=float(p))
        self.prompt_dropout.p = float(p)

    def count(self, block: int) -> int:
        return self._counts[block] if self.deep else self._counts[0]

    def raw(self, block: int) -> Tensor:
        """Block ``block``'s prompt parameters before projection, (P_block, Dp)."""
        if block == 0:
            return self.prompt_embeddings[0]
        if self._config.layer_counts is not None:
            start = self._offsets[block - 1]
            return self.deep_prompt_embeddings[start : start + self._counts[block]]
        return self.deep_prompt_embeddings[block - 1]

    def shared(self, block: int) -> Tensor:
        return self.prompt_proj(self.raw(block)).unsqueeze(0)

    def tokens(self, block: int, batch: int, state: object = None) -> Tensor:
        """(1, P, D) shared, or (B, P, D) with a dropout mask per image.

        Dropout is drawn after expanding over the batch, in block order, as the official code
        does, so the same seed gives the same masks in the naive and fused paths. A batch of no
        images draws no mask.
        """
        p = self.shared(block)
        if self.prompt_dropout.training and self.prompt_dropout.p > 0 and batch > 0:
            return self.prompt_dropout(p.expand(batch, -1, -1))
        return p

    def extra_repr(self) -> str:
        c = self._config
        counts = "" if c.layer_counts is None else f", layer_counts={list(c.layer_counts)}"
        return (
            f"num_prompts={c.num_prompts}{counts}, deep={c.deep}, dropout={c.dropout}, "
            f"project={c.project}"
        )
