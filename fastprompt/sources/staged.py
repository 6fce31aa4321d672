"""Learned prompt sets of a staged backbone (VPT-Swin, KMnP/vpt): one width per stage.

The official VPT-Swin keeps its deep prompts per stage, because each stage has its own width:
``prompt_embeddings`` (1, P, C0) enters block 0; ``deep_prompt_embeddings_0`` (d0 − 1, P, C0)
enters blocks 1 … d0 − 1 of stage 0 and ``deep_prompt_embeddings_s`` (d_s, P, C_s) every block of
stage s ≥ 1, block 0 included (so in deep mode the prompts coming out of a patch merging are
discarded). Shallow: ``prompt_embeddings`` only. After Prompt Condensation a stage's sets differ in
size and are packed as (Σ counts, C_s), keeping the names.

Init: uniform(−v, v) with v = sqrt(6 / (3·p_h·p_w + C0)), the stage-0 width for every stage, in
the official order (set 0, then stage by stage). Dropout as the official code draws it: the
shallow set after expanding over the batch (a mask per image), each stage's deep tensor as a whole
before it is expanded (one mask per stage, shared by the batch and by the stage's blocks), in that
order. The official code builds a ``prompt_proj`` it never applies; there is no projection here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.sources import DropoutConfigured

__all__ = ["StagedPrompts"]


class StagedPrompts(DropoutConfigured):
    """VPT-Swin's prompt sets: per-stage parameters at each stage's width.

    Parameters
    ----------
    stages : sequence of int
        Blocks per stage.
    widths : sequence of int
        Token width of each stage.
    counts : sequence of int
        Prompts each block receives (deep), or a single count (shallow: block 0 only).
    deep : bool
        Every block receives its own set (VPT-deep) or block 0 only (VPT-shallow).
    patch : tuple of int
        Patch height and width (for the official init bound).
    dropout : float
        Prompt dropout probability.
    packed : bool
        Keep each stage's deep sets as one (Σ counts, C_s) parameter (sets of different sizes).
    config : dataclass
        The building method's configuration, handed back by :meth:`config`.
    device, dtype
        Of the backbone's weights.
    """

    inputs = ()  # prepare passes any keyword to the base, which refuses it

    position = "prefix"

    def __init__(
        self,
        stages: Sequence[int],
        widths: Sequence[int],
        counts: Sequence[int],
        deep: bool,
        patch: tuple[int, int],
        dropout: float = 0.0,
        packed: bool = False,
        config: Any = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._config = config
        self._stages, self._widths, self._deep = tuple(stages), tuple(widths), bool(deep)
        depth = sum(self._stages)
        self._counts = tuple(counts)
        if len(self._counts) != (depth if deep else 1):
            raise ValueError(
                f"StagedPrompts: counts must hold {depth if deep else 1} ints, got {counts}"
            )
        if not packed and len(set(self._counts)) > 1:
            raise ValueError(f"StagedPrompts: sets of different sizes {counts} need packed")
        self._packed = packed
        # Per block: (stage, parameter name or None for set 0, first row, rows).
        self._rows: list[tuple[int, str | None, int, int]] = []
        kw = {"device": device, "dtype": dtype}
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + self._widths[0]))
        first = torch.empty(1, self._counts[0], self._widths[0], **kw)
        self.prompt_embeddings = nn.Parameter(first.uniform_(-bound, bound))
        self._names: list[str] = []
        block = 0
        for s, (n_blocks, width) in enumerate(zip(self._stages, self._widths)):
            name = f"deep_prompt_embeddings_{s}"
            row = 0
            for _ in range(n_blocks):
                if block == 0:
                    self._rows.append((0, None, 0, self._counts[0]))
                elif deep:
                    count = self._counts[block]
                    self._rows.append((s, name, row, count))
                    row += count if packed else 1
                block += 1
            if deep:
                sets = n_blocks - (1 if s == 0 else 0)
                size = self._counts[0] if not sets else self._counts[block - sets]
                shape = (row, width) if packed else (sets, size, width)
                tensor = torch.empty(*shape, **kw).uniform_(-bound, bound)
                self.register_parameter(name, nn.Parameter(tensor))
                self._names.append(name)
        self.prompt_dropout = nn.Dropout(dropout)

    # -- the schedule ---------------------------------------------------------------------------

    def receives(self, block: int) -> bool:
        return block == 0 or self._deep

    def count(self, block: int) -> int:
        return self._rows[block][3] if self.receives(block) else 0

    def distinct_sets(self) -> bool:
        return True

    # -- the prompts ----------------------------------------------------------------------------

    def raw(self, block: int) -> Tensor:
        if not self.receives(block):
            raise ValueError(f"StagedPrompts: block {block} receives no prompt set")
        return self._slice(block, self._tensor(self._rows[block][1]))

    def _tensor(self, name: str | None) -> Tensor:
        return self.prompt_embeddings if name is None else getattr(self, name)

    def _slice(self, block: int, tensor: Tensor) -> Tensor:
        _, name, row, count = self._rows[block]
        if name is None:
            return tensor[0]
        return tensor[row : row + count] if self._packed else tensor[row]

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [self.prompt_embeddings, *(getattr(self, n) for n in self._names)]

    def shared(self, block: int) -> Tensor:
        return self.raw(block).unsqueeze(0)

    def prepare(self, images: Tensor, **inputs: Any) -> dict[str, Tensor] | None:
        """A per-forward cache of the stages' dropped-out tensors (training with dropout)."""
        super().prepare(images, **inputs)
        return {} if self._dropping() else None

    def _dropping(self) -> bool:
        return self.prompt_dropout.training and self.prompt_dropout.p > 0

    def tokens(self, block: int, batch: int, state: object = None) -> Tensor:
        """(1, P, C) shared, or (B, P, C) for the shallow set with a dropout mask per image.

        A deep set is a row of its stage's tensor after dropout, the mask drawn for the whole
        tensor when the stage's first set is needed (the official order), so it stays shared.
        """
        name = self._rows[block][1]
        if not self._dropping() or (name is None and batch == 0):
            return self.shared(block)
        if name is None:
            return self.prompt_dropout(self.prompt_embeddings.expand(batch, -1, -1))
        cache = state if isinstance(state, dict) else {}
        if name not in cache:
            cache[name] = self.prompt_dropout(getattr(self, name))
        return self._slice(block, cache[name]).unsqueeze(0)

    def extra_repr(self) -> str:
        mode = "deep" if self._deep else "shallow"
        return (
            f"{mode}, stages={list(self._stages)}, widths={list(self._widths)}, "
            f"counts={list(self._counts)}, dropout={self.prompt_dropout.p}"
        )
