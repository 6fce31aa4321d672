"""The backbone adapter protocol: what the prompted core asks of a model family.

The prompted core (:mod:`fastprompt.prompted`) reads no attribute of a timm model; it asks an
adapter, one subclass of :class:`Backbone` per model family (``docs/design.md`` §4, "Backbone
adapters"). The adapter owns the token layout: the core holds an opaque *token state* (for a ViT
one (B, N, D) tensor; a windowed backbone may keep its patches and prompts apart) together with
the number of prompt tokens in it, and moves it through the blocks with these calls:

- ``embed(images)``: the image tokens entering block 0 (no prompts yet);
- ``enter(block, tokens, held)``: the transition into ``block`` (a windowed backbone's patch
  merging at a stage's first block, applied to the image tokens and to the ``held`` prompt
  tokens; identity for a ViT), before any prompt of ``block`` leaves or enters;
- ``insert(tokens, block, prompts, position)`` / ``remove(tokens, count, position)``: prompt
  tokens entering before ``block``, or leaving (overwritten by a new set);
- ``block(block, tokens, held)``: the block on every token, prompts included (the official
  computation); ``fused_block(block, tokens, held, kv, attend, backend)``: the block whose queries
  also attend to extra prompt keys/values ``kv`` through the attention function ``attend``;
- ``prompt_kv(block, prompts)``: the keys/values a prompt set entering ``block`` contributes;
- ``features(tokens)``, ``pool(features, readout, held, position)``, ``head(pooled)``.

Widths may differ per block (:meth:`Backbone.block_shape`); the core never looks at them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from fastprompt.backbones.taps import Taps

__all__ = [
    "AttentionCall",
    "AttentionFn",
    "Backbone",
    "BlockShape",
    "PromptKV",
    "PromptKVParts",
    "key_value_columns",
    "module_hooks",
    "timm_image_size",
    "timm_patch_size",
]


def module_hooks(module: nn.Module, everywhere: bool = True) -> tuple[int, ...]:
    """Handles of every hook that runs when ``module`` is called: its own forward, pre-forward
    and backward hooks, and (``everywhere``) those registered for every module. What computing
    its output another way would skip."""
    own = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )
    shared = (
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
        nn.modules.module._global_backward_hooks,
        nn.modules.module._global_backward_pre_hooks,
    )
    if not everywhere:
        return tuple(h for hooks in own for h in hooks)
    return tuple(h for hooks in (*own, *shared) for h in hooks)


def key_value_columns(qkv: nn.Module, h: Tensor) -> Tensor:
    """The key and value columns (..., 2·W) of a fused qkv projection (W = its output / 3) of
    tokens ``h`` (..., C).

    A plain ``nn.Linear`` without hooks runs its K and V rows only (prompt queries are never
    needed). Any other module (LoRA, an adapter, a quantised linear, one with hooks) is known
    only by its forward, which runs whole, queries included: slicing its ``weight`` would skip
    what it adds.
    """
    if type(qkv) is nn.Linear and not module_hooks(qkv):
        width = qkv.out_features // 3
        bias = None if qkv.bias is None else qkv.bias[width:]
        return F.linear(h, qkv.weight[width:], bias)
    out = qkv(h)
    return out[..., out.shape[-1] // 3 :]


def timm_patch_size(model: nn.Module) -> tuple[int, int]:
    """Patch height and width of a timm model with a ``patch_embed`` (ViT, Swin)."""
    ps = model.patch_embed.patch_size
    return (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


def timm_image_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) a timm model takes: its ``patch_embed``'s, else its pretrained config's."""
    size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = cfg.get("input_size", (3, 224, 224))[1:]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class AttentionCall:
    """One block's prompt attention, as handed to a pluggable attention function.

    Attributes
    ----------
    block : int
        Block index.
    q, k, v : Tensor, shape (B, H, N, d)
        The block's queries, keys and values (after qk-norm): image tokens, and prompt tokens too
        when the block computes prompt rows. A windowed backbone's B counts windows.
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
        Extra keys/values every query also attends to: one shared set (T = 1), one per sequence
        (T = B), or a table read through ``prompt_index``.
    prompt_index : Tensor of int, shape (B,), or None
        Set of each sequence; None means set 0 for all.
    scale : float
        The block's score scale.
    backend : str or None
        The backend the model was built with.
    prompt_lengths : Tensor of int, shape (T,), or None
        Valid keys per set (sets of different lengths); None means all P.
    key_bias : Tensor or None
        An additive bias on the scores of the sequence's own keys (a windowed backbone's
        relative-position bias and shift mask), as :func:`fastprompt.ops.prompt_attention` takes
        it; prompt keys get none. None for a ViT.
    windows : int
        Sequences per image, image by image (a windowed backbone's windows; 1 for a ViT): what
        sums per-sequence quantities into per-image ones.
    """

    block: int
    q: Tensor
    k: Tensor
    v: Tensor
    prompt_k: Tensor
    prompt_v: Tensor
    prompt_index: Tensor | None
    scale: float
    backend: str | None
    prompt_lengths: Tensor | None = None
    key_bias: Tensor | None = None
    windows: int = 1


AttentionFn = Callable[[AttentionCall], Tensor]


@dataclass(frozen=True)
class PromptKV:
    """Extra keys/values a block's queries attend to (prompt sets, key-value prompts).

    Attributes
    ----------
    k, v : Tensor, shape (T, H, P, d)
    index : Tensor of int, shape (B,), or None
        Set of each image; None means set 0 (T = 1).
    lengths : Tensor of int, shape (T,), or None
        Valid keys per set; None means all P.
    """

    k: Tensor
    v: Tensor
    index: Tensor | None = None
    lengths: Tensor | None = None


@dataclass(frozen=True)
class BlockShape:
    """Widths of one block: token width, attention heads and head dimension."""

    width: int
    heads: int
    head_dim: int


@dataclass(frozen=True)
class PromptKVParts:
    """A block's prompt keys/values as two maps, for scores that need the parts.

    Attributes
    ----------
    normalize : callable
        Prompt tokens entering the block (T, P, W) -> ``h``, the block's normalised input.
    project : callable
        ``h`` -> (k, v), each (T, H, P, d) (after qk-norm).
    norm_bias : Tensor or None
        The bias β of the normalisation producing ``h`` (None without one).
    """

    normalize: Callable[[Tensor], Tensor]
    project: Callable[[Tensor], tuple[Tensor, Tensor]]
    norm_bias: Tensor | None


class Backbone:
    """Base class of backbone adapters: one subclass per model family.

    An adapter is built for one model (``Backbone(model, who)``), checking that it can be wrapped
    (:meth:`check` raises with the reason otherwise), and holds no state besides the model
    (and caches that refill themselves: a Swin adapter's window-index tensors).

    Class attributes
    ----------------
    family : str
        Short name (``"vit"``), recorded nowhere but in messages.
    description : str
        What the family covers, for the registry's error (``"timm VisionTransformer (vit_*,
        deit_*)"``).
    positions : tuple of str
        Where prompt tokens can go: ``"prefix"`` (before the patches, after any class and
        register tokens) and/or ``"suffix"`` (after the patches).
    readouts : tuple of str
        What :meth:`pool` can read.
    fused_tokens : bool
        Whether :meth:`fused_block` also computes blocks whose prompts are tokens faster than
        :meth:`block` (a windowed backbone: the prompts' keys, values and queries once per image,
        not per window). The core's fused path then runs every block through it, ``kv`` None when
        the block has no extra keys/values; otherwise blocks with prompt tokens run :meth:`block`.
    op_features : frozenset of str
        Features of :func:`fastprompt.ops.prompt_attention` (``fastprompt.backends.FEATURES``)
        every fused block calls it with (a windowed backbone: ``"key_bias"``): a backend without
        them is refused when the model is wrapped.
    taps_class : type or None
        The family's intermediates (a :class:`~fastprompt.backbones.taps.Taps` subclass) for
        ``forward_intermediates``; None: the family has none here.
    """

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    positions: ClassVar[tuple[str, ...]] = ("prefix",)
    readouts: ClassVar[tuple[str, ...]] = ()
    fused_tokens: ClassVar[bool] = False
    op_features: ClassVar[frozenset[str]] = frozenset()
    taps_class: ClassVar[type[Taps] | None] = None

    def __init__(self, model: nn.Module, who: str) -> None:
        self.check(model, who)
        self.model = model
        self._structure = self.structure()

    # -- what can be wrapped ----------------------------------------------------------------------

    @classmethod
    def check(cls, model: nn.Module, who: str) -> None:
        """Raise ``TypeError``/``ValueError`` starting with ``who`` when ``model`` cannot be
        wrapped: the prompted forward would not reproduce its own."""
        raise NotImplementedError

    def fused_unsupported_reasons(self) -> list[str]:
        """Why :meth:`fused_block` cannot reproduce this model's blocks ([] when it can)."""
        raise NotImplementedError

    def structure(self) -> tuple[tuple[int, ...], tuple[Any, ...]]:
        """``(blocks per stage, what else check() and fused_unsupported_reasons() judge)``, cheap
        enough to compare at every forward: a block replaced, added or removed after wrapping.
        By default the depth alone."""
        return (self.depth,), ()

    def check_unchanged(self, who: str) -> bool:
        """Whether the model changed since it was checked (then checked again: True).

        Raises
        ------
        ValueError
            Blocks added or removed: prompts, and an adapter's block map, are per block.
        TypeError, ValueError
            :meth:`check` refuses what the model became.
        """
        now = self.structure()
        if now == self._structure:
            return False
        then = self._structure[0]
        if now[0] != then:
            raise ValueError(
                f"{who}: the model's blocks per stage are now {list(now[0])}, but it was wrapped "
                f"with {list(then)} (prompts are per block): wrap the changed model again"
            )
        self.check(self.model, who)
        self._structure = now
        return True

    def own_forwards(self, block: int | None, fused: bool, memory: str) -> list[tuple[str, Any]]:
        """``(name, module)`` of the modules whose forward the prompted forward computes its own
        way, so hooks on them never run: for ``block`` (run on the fused path or not, under the
        ``memory`` policy), or the model's own (``block`` None). By default none are listed."""
        return []

    # -- facts ------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Number of blocks."""
        raise NotImplementedError

    def block_shape(self, block: int) -> BlockShape:
        """Token width, heads and head dimension of ``block``."""
        raise NotImplementedError

    def stages(self) -> tuple[int, ...] | None:
        """Blocks per stage of a staged backbone (prompt widths follow the stage), or None for
        one without stages (a ViT)."""
        return None

    def patch_size(self) -> tuple[int, int]:
        """Patch height and width (VPT's init bound uses it); by default a timm model's
        ``patch_embed``'s, as ViT and Swin have it."""
        return timm_patch_size(self.model)

    def image_size(self) -> tuple[int, int]:
        """The (H, W) the model takes; by default a timm model's (:func:`timm_image_size`)."""
        return timm_image_size(self.model)

    def signature(self) -> dict[str, Any]:
        """What a prompt checkpoint must agree with to load onto this model (JSON-ready)."""
        raise NotImplementedError

    def default_readout(self) -> str:
        """The readout matching the model's own pooling."""
        raise NotImplementedError

    def check_readout(self, readout: str, who: str) -> None:
        """Raise when this model cannot read out ``readout``."""
        if readout not in self.readouts:
            raise ValueError(f"{who}: readout must be one of {self.readouts}, got {readout!r}")

    def reads_prompts(self, readout: str) -> bool:
        """Whether ``readout`` reads prompt outputs (then the last block computes them)."""
        raise NotImplementedError

    def class_token(self) -> int | None:
        """Index of the class token among the image tokens, None without one."""
        raise NotImplementedError

    def classifier(self) -> nn.Module:
        """The head module (it trains; the rest of the backbone is frozen)."""
        raise NotImplementedError

    # -- the forward, piece by piece ----------------------------------------------------------

    def embed(self, images: Tensor) -> Any:
        """Image tokens entering block 0 (B, C, H, W) -> token state, no prompts."""
        raise NotImplementedError

    def enter(self, block: int, tokens: Any, held: int) -> Any:
        """The transition into ``block`` from the block before it (``held`` prompt tokens in
        ``tokens``): a stage change such as patch merging; identity by default."""
        return tokens

    def insert(self, tokens: Any, block: int, prompts: Tensor, position: str) -> Any:
        """``tokens`` with prompts (T, P, W) entering before ``block`` (T = 1 or B)."""
        raise NotImplementedError

    def remove(self, tokens: Any, count: int, position: str) -> Any:
        """``tokens`` without its ``count`` prompt tokens."""
        raise NotImplementedError

    def block(self, block: int, tokens: Any, held: int, memory: str = "none") -> Any:
        """Block ``block`` on every token; ``held`` prompt tokens are in ``tokens``.

        ``memory`` is passed only when it is one of :meth:`recompute_policies` (what the block
        keeps for backward); an adapter offering none need not take it.
        """
        raise NotImplementedError

    def prompt_kv(self, block: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (T, H, P, d) of prompt tokens (T, P, W) entering ``block``."""
        raise NotImplementedError

    def prompt_kv_parts(self, block: int, dtype: Any) -> PromptKVParts:
        """:meth:`prompt_kv` of ``block`` as its two maps, on copies in ``dtype``."""
        raise NotImplementedError

    def fused_block(
        self,
        block: int,
        tokens: Any,
        held: int,
        kv: PromptKV | None,
        attend: AttentionFn,
        backend: str | None,
        memory: str = "none",
    ) -> Any:
        """Block ``block`` whose queries attend to ``kv`` before the tokens' own keys, through
        ``attend`` (an :class:`AttentionCall` in, the attention output (B, H, N, d) out); ``kv``
        is None only for a block with ``held`` prompt tokens of a ``fused_tokens`` adapter;
        ``memory`` as in :meth:`block`."""
        raise NotImplementedError

    # -- memory (``docs/design.md`` §4, "Memory") --------------------------------------------

    def grad_checkpointing(self) -> bool:
        """Whether the model asks for per-block gradient checkpointing (timm's
        ``set_grad_checkpointing``, which sets its ``grad_checkpointing`` attribute)."""
        return bool(getattr(self.model, "grad_checkpointing", False))

    def set_grad_checkpointing(self, enable: bool) -> None:
        """Turn the model's own switch (read back by :meth:`grad_checkpointing`)."""
        setter = getattr(self.model, "set_grad_checkpointing", None)
        if not callable(setter):
            raise TypeError(
                f"set_grad_checkpointing: a {type(self.model).__name__} has no gradient "
                "checkpointing switch; set the prompted model's memory='block' instead"
            )
        setter(enable)

    def recompute_policies(self) -> tuple[str, ...]:
        """Recompute policies :meth:`block` and :meth:`fused_block` take as ``memory=``.

        ``"none"`` (keep what autograd saves) and ``"block"`` (the core recomputes the whole
        step from its input) work for every adapter without it. An adapter that lists
        ``"block"`` returns, under it, a partial result whose frozen tail :meth:`finish_block`
        computes outside the recomputed region, so backward does not recompute the tail; any
        other name (a ViT's ``"mlp"``) is a policy of the adapter's own blocks.
        """
        return ()

    def recompute_reasons(self) -> list[str]:
        """Why the adapter's blocks offer no policy of their own (said when one is refused)."""
        return [] if self.recompute_policies() else ["the adapter recomputes no part of a block"]

    def finish_block(self, block: int, partial: Any) -> Any:
        """The tokens of ``block`` from what its block returned under ``memory="block"``
        (identity unless :meth:`recompute_policies` lists ``"block"``)."""
        return partial

    def features(self, tokens: Any) -> Tensor:
        """The final normalised tokens (what ``forward_features`` returns)."""
        raise NotImplementedError

    def features_without_prompts(self, tokens: Any, count: int, position: str) -> Tensor:
        """:meth:`features` of ``tokens`` without their ``count`` prompt tokens at
        ``position`` (what ``forward_features`` returns under a readout that does not read
        them); by default the features of the tokens after :meth:`remove`."""
        return self.features(self.remove(tokens, count, position))

    def pool(self, features: Tensor, readout: str, held: int, position: str) -> Tensor:
        """Pooled features (B, W) before the head's own normalisation."""
        raise NotImplementedError

    def head(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        """The model's head on pooled features (its normalisation, dropout and classifier)."""
        raise NotImplementedError

    def taps(self) -> Taps | None:
        """What timm's ``forward_intermediates`` of this family takes and returns
        (:attr:`taps_class` on this adapter); None: the family has no intermediates here."""
        return None if self.taps_class is None else self.taps_class(self)
