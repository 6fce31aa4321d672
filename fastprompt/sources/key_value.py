"""E²VPT's prompts (ChengHan111/E2VPT): visual prompts with pruning masks, and key-value prompts.

Per block i the official model (``vit_prompt_VK.py`` and ``vit_changeVK.py``) has

- *visual prompts*: ``prompt_embeddings`` (1, P, Dp) enters block 0 after the class token and
  ``deep_prompt_embeddings`` (L − 1, P, Dp) overwrite the prompt positions before blocks 1 … L − 1
  (deep; shallow: set 0 only, flowing on as tokens). Each set is projected (``prompt_proj``,
  Identity by default), expanded over the batch, dropped out per image, and then multiplied by
  the *segment mask* ``prompt_soft_tokens_pieces_mask_cls_token`` (P, S) repeated along the width,
  so that segment s covers dims s, s + S, s + 2S, … (interleaved), and by the *token mask*
  ``prompt_soft_tokens_mask_cls_token`` (P,). Both masks start at ones. A pruned token is a zero
  token: it still enters the block (LayerNorm turns it into the norm's bias) and still attends;
- *key-value prompts*: one (H, N, d) tensor per block joined in front of the block's keys and
  values after the qkv projection (and after qk-norm, where the official code has no guidance):
  no projection, no bias, no query rows. With ``SHARE_PARAM_KV`` (every official command) one
  tensor is both the key and the value prompt; otherwise a key tensor and a value tensor.

fastprompt keeps the key-value prompts of every block in one stacked parameter,
``deep_QKV_embeddings`` (L, H, N, d) (``deep_QKV_embeddings_K`` / ``_V`` unshared), where the
official code has one per attention module (``encoder.layer.{i}.attn.deep_QKV_embeddings``);
:func:`fastprompt.load_prompts` maps one to the other. Their official init is kaiming-uniform
(``ORIGIN_INIT = 2``), bound √(6 / (N·d)) per block; ``0`` (uniform ±√(6 / (3·patch² + 16))) and
``1`` (truncated normal, std 0.02) are the other official choices.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.sources import DropoutConfigured

__all__ = ["KV_INITS", "KeyValuePrompts"]

# ORIGIN_INIT 2, 0 and 1 of the official config, by name.
KV_INITS = ("kaiming", "uniform", "trunc_normal")

TOKEN_MASK = "prompt_soft_tokens_mask_cls_token"
SEGMENT_MASK = "prompt_soft_tokens_pieces_mask_cls_token"


class KeyValuePrompts(DropoutConfigured):
    """E²VPT's visual prompts, their token and segment masks, and the key-value prompts.

    Parameters
    ----------
    depth : int
        Blocks of the backbone.
    width : int
        Model width D the visual prompts enter at.
    heads, head_dim : int
        Of every block's attention (the key-value prompts are (heads, N, head_dim)).
    patch : tuple of int
        Patch height and width (the visual prompts' init bound).
    num_prompts : int
        Visual prompts P per set.
    num_kv : int
        Key-value prompts N per block.
    deep : bool
        A visual set per block (``DEEP_P``), or one before block 0 flowing on as tokens.
    kv_deep : bool
        Key-value prompts in every block (``DEEP``), or in block 0 only.
    shared_kv : bool
        One tensor as both key and value prompt (``SHARE_PARAM_KV``).
    kv_init : {"kaiming", "uniform", "trunc_normal"}
    dropout : float
        Visual prompt dropout (``DROPOUT_P``), a mask per image, drawn before the pruning masks.
    masks : bool
        Token and segment masks (``MASK_CLS_TOKEN``).
    train_masks : bool
        Masks train (parameters, the first run) or stay fixed (buffers, after rewinding).
    segments : int
        Segments per visual prompt (``CLS_TOKEN_P_PIECES_NUM``); divides the width.
    project : int
        Prompt width before a Linear projection to D; -1 for none.
    config : dataclass
        The building method's config, handed back by :meth:`config`.
    device, dtype
        Of the backbone's weights.
    """

    position = "prefix"

    def __init__(
        self,
        depth: int,
        width: int,
        heads: int,
        head_dim: int,
        patch: tuple[int, int],
        num_prompts: int,
        num_kv: int,
        deep: bool = True,
        kv_deep: bool = True,
        shared_kv: bool = True,
        kv_init: str = "kaiming",
        dropout: float = 0.0,
        masks: bool = True,
        train_masks: bool = True,
        segments: int = 16,
        project: int = -1,
        config: Any = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kv_init not in KV_INITS:
            raise ValueError(f"KeyValuePrompts: kv_init must be one of {KV_INITS}, got {kv_init!r}")
        if masks and (segments < 1 or width % segments):
            raise ValueError(
                f"KeyValuePrompts: the segment mask splits the width {width} into {segments} "
                "interleaved segments, so the width must be a multiple of segments; build "
                "without masks (masks=False, the official runs without pruning)"
            )
        self._config = config
        self._depth, self._deep, self._kv_deep = depth, deep, kv_deep
        self._shared_kv, self._segments, self._num_kv = shared_kv, segments, num_kv
        kw = {"device": device, "dtype": dtype}
        # The official model builds its blocks (and their key-value prompts) before the visual
        # prompts, so they are drawn first.
        kv_sets = depth if kv_deep else min(depth, 1)
        names = (
            ("deep_QKV_embeddings",)
            if shared_kv
            else ("deep_QKV_embeddings_V", "deep_QKV_embeddings_K")
        )
        tables = {name: torch.empty(kv_sets, heads, num_kv, head_dim, **kw) for name in names}
        if num_kv:
            for i in range(kv_sets):
                for table in tables.values():  # unshared: V before K, as the official blocks
                    _init_kv(table[i], kv_init, patch)
        for name in sorted(tables):
            self.register_parameter(name, nn.Parameter(tables[name]))
        dim = width if project == -1 else project
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))
        first = torch.empty(1, num_prompts, dim, **kw).uniform_(-bound, bound)
        self.prompt_embeddings = nn.Parameter(first)
        rest = None
        if deep:
            rest = nn.Parameter(
                torch.empty(max(depth - 1, 0), num_prompts, dim, **kw).uniform_(-bound, bound)
            )
        self.register_parameter("deep_prompt_embeddings", rest)
        if project == -1:
            self.prompt_proj = nn.Identity()
        else:
            self.prompt_proj = nn.Linear(dim, width, **kw)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_dropout = nn.Dropout(dropout)
        self._masks = masks
        if masks:
            self._add_mask(TOKEN_MASK, torch.ones(num_prompts, **kw), train_masks)
            self._add_mask(SEGMENT_MASK, torch.ones(num_prompts, segments, **kw), train_masks)

    def _add_mask(self, name: str, value: Tensor, trains: bool) -> None:
        # Fixed masks are buffers, so that checkpoints (trainable tensors and buffers) hold them.
        if trains:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    # -- the schedule ---------------------------------------------------------------------------

    def receives(self, block: int) -> bool:
        return block == 0 or self._deep

    def count(self, block: int) -> int:
        return self.prompt_embeddings.shape[1] if self.receives(block) else 0

    def distinct_sets(self) -> bool:
        return True  # set 0 before block 0, deep set i before block i

    # -- the masks ------------------------------------------------------------------------------

    def masks(self) -> tuple[Tensor, Tensor] | None:
        """``(token_mask (P,), segment_mask (P, S))``, or None without masks."""
        if not self._masks:
            return None
        return getattr(self, TOKEN_MASK), getattr(self, SEGMENT_MASK)

    def _masked(self, prompts: Tensor) -> Tensor:
        """``prompts`` (T, P, D) times the segment mask repeated along the width (segment s on
        dims s, s + S, ...), then times the token mask, in the official order."""
        masks = self.masks()
        if masks is None:
            return prompts
        token, segment = masks
        width = prompts.shape[-1]
        return prompts * segment.repeat(1, width // self._segments) * token.unsqueeze(-1)

    # -- the prompts ----------------------------------------------------------------------------

    def visual_set(self, block: int) -> Tensor:
        """The raw visual set ``block`` receives (P, Dp): a view of its parameter."""
        if not self.receives(block):
            raise ValueError(f"KeyValuePrompts: block {block} receives no visual prompt set")
        return self.prompt_embeddings[0] if block == 0 else self.deep_prompt_embeddings[block - 1]

    def raw(self, block: int) -> Tensor:
        raise TypeError(
            "E2VPT's key-value prompts join every block's prompt keys and its masks scale every "
            "set, so Prompt Condensation's per-prompt scores do not apply; E2VPT prunes with its "
            "own masks (fastprompt.methods.e2vpt.pruning)"
        )

    def projection(self) -> nn.Module:
        return self.prompt_proj

    def shared(self, block: int) -> Tensor:
        return self._masked(self.prompt_proj(self.visual_set(block)).unsqueeze(0))

    def tokens(self, block: int, batch: int, state: object = None) -> Tensor:
        """(1, P, D) shared, or (B, P, D) with a dropout mask per image drawn before the pruning
        masks, block after block (as the official code)."""
        p = self.prompt_proj(self.visual_set(block)).unsqueeze(0)
        if self.prompt_dropout.training and self.prompt_dropout.p > 0 and batch > 0:
            p = self.prompt_dropout(p.expand(batch, -1, -1))
        return self._masked(p)

    def kv(self, block: int, batch: int, state: Any) -> tuple[Tensor, Tensor] | None:
        """The key-value prompts of ``block`` (1, H, N, d) as keys and values, or None (none in
        this block, or N = 0)."""
        if (block > 0 and not self._kv_deep) or self._num_kv == 0:
            return None
        if self._shared_kv:
            kv = self.deep_QKV_embeddings[block].unsqueeze(0)
            return kv, kv
        return self.deep_QKV_embeddings_K[block].unsqueeze(0), self.deep_QKV_embeddings_V[
            block
        ].unsqueeze(0)

    def shared_kv(self, block: int) -> tuple[Tensor, Tensor] | None:
        return self.kv(block, 1, None)

    def kv_parameters(self) -> list[nn.Parameter]:
        """The key-value prompt tensors (one shared, or keys then values)."""
        if self._shared_kv:
            return [self.deep_QKV_embeddings]
        return [self.deep_QKV_embeddings_K, self.deep_QKV_embeddings_V]

    def extra_repr(self) -> str:
        p, n = self.prompt_embeddings.shape[1], self.kv_parameters()[0].shape[2]
        proj = "" if isinstance(self.prompt_proj, nn.Identity) else ", projected"
        masks = "off" if not self._masks else ("trained" if self._mask_trains() else "fixed")
        return (
            f"visual={p} ({'deep' if self._deep else 'shallow'}), key_value={n} "
            f"({'shared' if self._shared_kv else 'unshared'}, "
            f"{'deep' if self._kv_deep else 'block 0'}), masks={masks}, "
            f"dropout={self.prompt_dropout.p}{proj}"
        )

    def _mask_trains(self) -> bool:
        return TOKEN_MASK in self._parameters


def _init_kv(t: Tensor, how: str, patch: tuple[int, int]) -> None:
    """One block's key-value prompts (H, N, d), as ``ORIGIN_INIT`` says."""
    with torch.no_grad():
        if how == "kaiming":
            # fan_in of an (H, N, d) tensor is N·d: bound √(6 / (N·d)).
            nn.init.kaiming_uniform_(t, a=0, mode="fan_in", nonlinearity="leaky_relu")
        elif how == "uniform":
            bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + 16))
            t.uniform_(-bound, bound)
        else:
            nn.init.trunc_normal_(t, std=0.02)
