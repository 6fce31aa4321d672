"""Learned prompt sets (VPT, KMnP/vpt): a schedule of which set each block receives.

The sets are numbered: set 0 is ``prompt_embeddings`` (1, P, Dp), the official name of the set
entering block 0 (it may be absent); sets 1, 2, ... are the rows of ``deep_prompt_embeddings``
(n, P, Dp), or consecutive slices of it packed as (Σ counts, Dp) when the sets differ in size
(after Prompt Condensation). A schedule gives, per block, the set it receives or None:

- VPT-shallow ``(0, None, None, ...)``; VPT-deep ``(0, 1, 2, ..., L − 1)``;
- the official ablations: deep prompts in the first k blocks only ``(0, 1, ..., k − 1, None,
  ...)``, in the last k only ``(None, ..., None, 1, ..., k)`` (no set 0), one set shared by every
  block ``(0, 0, ..., 0)``.

``prompt_proj`` (Identity, or a Linear Dp → D with kaiming-normal fan-out init) maps every set to
the model width; ``prompt_dropout`` is drawn per block, after expanding the set over the batch (a
mask per image). Init: uniform(−v, v) with v = sqrt(6 / (3·patch_h·patch_w + Dp)), set 0 first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.sources import DropoutConfigured

__all__ = ["LearnedPrompts"]


class LearnedPrompts(DropoutConfigured):
    """Learned prompt sets and the schedule of which block receives which.

    Parameters
    ----------
    schedule : sequence of int or None
        Per block, the set it receives (0: ``prompt_embeddings``; j ≥ 1: deep set j) or None.
    shallow : int or None
        Tokens of set 0, or None when there is no ``prompt_embeddings``.
    deep : sequence of int, optional
        Tokens of deep sets 1, 2, ...; None when there is no ``deep_prompt_embeddings`` (an
        empty sequence makes an empty one, as the official code does for one block).
    width : int
        The model width D the prompts enter at.
    patch : tuple of int
        Patch height and width (for the official init bound).
    project : int
        Prompt width Dp before a Linear projection to D; -1 for none (Dp = D).
    dropout : float
        Prompt dropout probability.
    packed : bool
        Keep the deep sets as one (Σ counts, Dp) parameter (sets of different sizes) rather
        than (n, P, Dp).
    config : dataclass
        The building method's configuration, handed back by :meth:`config`; :meth:`set_dropout`
        keeps its ``dropout`` field in step.
    device, dtype
        Of the backbone's weights.
    """

    position = "prefix"

    def __init__(
        self,
        schedule: Sequence[int | None],
        shallow: int | None,
        deep: Sequence[int] | None,
        width: int,
        patch: tuple[int, int],
        project: int = -1,
        dropout: float = 0.0,
        packed: bool = False,
        config: Any = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._config = config
        self._schedule = tuple(schedule)
        deep_sizes = tuple(deep or ())
        self._sizes = (shallow, *deep_sizes)  # tokens per set; set 0 may be None (absent)
        used = [s for s in self._schedule if s is not None]
        if any(not 0 <= s < len(self._sizes) or self._sizes[s] is None for s in used):
            raise ValueError(f"LearnedPrompts: schedule {self._schedule} names a missing set")
        if not packed and len(set(deep_sizes)) > 1:
            raise ValueError(
                f"LearnedPrompts: deep sets of different sizes {deep_sizes} need packed"
            )
        self._packed = packed
        self._offsets = [0]
        for n in deep_sizes:
            self._offsets.append(self._offsets[-1] + n)
        dim = width if project == -1 else project
        kw = {"device": device, "dtype": dtype}
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))
        first = None
        if shallow is not None:
            first = nn.Parameter(torch.empty(1, shallow, dim, **kw).uniform_(-bound, bound))
        self.register_parameter("prompt_embeddings", first)
        if deep is None:
            rest = None
        elif packed:
            rest = torch.empty(self._offsets[-1], dim, **kw)
        else:
            size = deep_sizes[0] if deep_sizes else shallow or 0
            rest = torch.empty(len(deep_sizes), size, dim, **kw)
        self.register_parameter(
            "deep_prompt_embeddings",
            None if rest is None else nn.Parameter(rest.uniform_(-bound, bound)),
        )
        if project == -1:
            self.prompt_proj = nn.Identity()
        else:
            self.prompt_proj = nn.Linear(dim, width, **kw)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_dropout = nn.Dropout(dropout)

    # -- the schedule ---------------------------------------------------------------------------

    def receives(self, block: int) -> bool:
        return self._schedule[block] is not None

    def count(self, block: int) -> int:
        s = self._schedule[block]
        return 0 if s is None else self._sizes[s]

    def distinct_sets(self) -> bool:
        used = [s for s in self._schedule if s is not None]
        return len(used) == len(set(used))

    # -- the prompts ----------------------------------------------------------------------------

    def raw(self, block: int) -> Tensor:
        s = self._schedule[block]
        if s is None:
            raise ValueError(f"LearnedPrompts: block {block} receives no prompt set")
        if s == 0:
            return self.prompt_embeddings[0]
        if self._packed:
            start = self._offsets[s - 1]
            return self.deep_prompt_embeddings[start : start + self._sizes[s]]
        return self.deep_prompt_embeddings[s - 1]

    def projection(self) -> nn.Module:
        return self.prompt_proj

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.prompt_embeddings, self.deep_prompt_embeddings) if p is not None]

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
        schedule = ["-" if s is None else s for s in self._schedule]
        proj = "" if isinstance(self.prompt_proj, nn.Identity) else ", projected"
        return (
            f"sets={list(self._sizes)}, schedule={schedule}, dropout={self.prompt_dropout.p}{proj}"
        )
