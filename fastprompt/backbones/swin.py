"""The adapter of timm's ``SwinTransformer`` (v1): VPT on shifted windows (``docs/design.md`` §4,
"Swin").

The official VPT-Swin (KMnP/vpt, ``src/models/vit_prompt/swin_transformer.py``) prepends the same
prompt tokens to every window of a block: ``norm1`` runs on every token, the prompts are split
off, only the patches are shifted and partitioned, the relative-position bias and the shift mask
get zero rows and columns for the prompts, the prompt outputs are averaged over the image's
windows, then residual and MLP run on every token. A patch merging turns a prompt ``p`` into the
merge of ``cat([p, p, p, p])``; the readout is the final norm and the mean over every token.

The token state is :class:`SwinTokens`: the patches (B, H, W, C) as timm keeps them and the prompt
tokens (B, P, C) apart (None without any). Blocks are numbered across stages; entering a stage's
first block runs the stage's patch merging (timm merges at the start of a stage, the official code
at the end of the previous one: the same order of operations).

``block`` is the official computation, prompts copied into every window, its attention computed as
the model's own (timm's ``fused_attn`` switch). ``fused_block`` gives the
same numbers computing each prompt's keys, values and query once per image (once per batch for a
set every image holds; never per window): the
windows' queries attend to the prompt keys/values through :func:`fastprompt.ops.prompt_attention`,
which takes the relative-position bias and the shift mask as ``key_bias`` (prompt keys get none,
as in the official code); prompt rows are computed only when their outputs are kept, as P queries
per window whose outputs are averaged over the windows before the projection (both linear), so
the projection, ``norm2`` and the MLP run on P rows per image.
Windows are made and undone in :mod:`fastprompt.backbones.swin_windows`.

The official code hands prompts to windows and averages them window by window while windows are
stored image by image, so with B > 1 and several windows window j gets image (j mod B)'s prompts
and an image's prompt outputs average windows of other images. fastprompt gives each image its own
prompts (the paper's rule); ``window_mixing = True`` reproduces the official code instead.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastprompt._compat import tracing
from fastprompt.backbones.base import (
    AttentionCall,
    AttentionFn,
    Backbone,
    BlockShape,
    PromptKV,
    PromptKVParts,
    key_value_columns,
)
from fastprompt.backbones.swin_windows import (
    constant_window_bias,
    partition,
    reverse,
    split_qkv,
    window_attention,
    window_bias,
)
from fastprompt.backbones.taps import SwinTaps

__all__ = ["READOUTS", "SwinBackbone", "SwinTokens"]

# "patches+prompts": the mean of every token, prompt outputs included (the official VPT-Swin);
# "patches": the mean of the patch tokens (timm's own avg pooling).
READOUTS = ("patches", "patches+prompts")


# _prompt_table's index when image b attends to set b: a window's set is then its owner image.
_EACH_IMAGE = "each image"


class SwinTokens(NamedTuple):
    """The token state: patches (B, H, W, C) and prompt tokens (B, P, C) or None."""

    patches: Tensor
    prompts: Tensor | None


def _timm_classes() -> dict[str, type]:
    from timm.models import swin_transformer as swin

    return {
        "model": swin.SwinTransformer,
        "stage": swin.SwinTransformerStage,
        "block": swin.SwinTransformerBlock,
        "attention": swin.WindowAttention,
        "merging": swin.PatchMerging,
    }


def _overrides(obj: object, base: type, methods: tuple[str, ...]) -> list[str]:
    return [m for m in methods if getattr(type(obj), m, None) is not getattr(base, m)]


def kv_rows(attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values (T, H, P, d) of normalised tokens ``h`` (T, P, C): only the K and V rows of
    a plain qkv projection run."""
    t, p, _ = h.shape
    kv = key_value_columns(attn.qkv, h)
    shape = (t, p, 2, attn.num_heads, kv.shape[-1] // 2 // attn.num_heads)  # not -1: P may be 0
    k, v = kv.reshape(shape).permute(2, 0, 3, 1, 4).unbind(0)
    return k, v


def _mlp(blk: nn.Module, x: Tensor) -> Tensor:
    return x + blk.drop_path2(blk.mlp(blk.norm2(x)))


def _same(tag: Any, index: Tensor | None) -> bool:
    """Whether a cached window index was made from ``index`` as it is now."""
    if tag is None or index is None:
        return tag is None and index is None
    ref, version = tag
    return ref() is index and version == index._version


class SwinBackbone(Backbone):
    """timm ``SwinTransformer`` v1 (``swin_*``, including the S3 search-space models).

    Attributes
    ----------
    window_mixing : bool
        Reproduce the official code's cross-image window mixing (see the module docstring);
        False (default) gives each image its own prompts.
    """

    family = "swin"
    description = "timm SwinTransformer (swin_*)"
    positions = ("prefix",)
    readouts = READOUTS
    fused_tokens = True
    op_features = frozenset({"key_bias"})
    taps_class = SwinTaps

    def __init__(self, model: nn.Module, who: str) -> None:
        super().__init__(model, who)
        self.window_mixing = False
        # Per-window set indices by (index tensor or None, batch, windows, device, mixing): the
        # blocks of a stage reuse one tensor, which the CUDA extension range-checks once (a new
        # tensor costs it a host synchronisation). It lives for one forward (emptied by embed):
        # a caller's index may change between forwards by writes its version counter does not
        # see (a numpy array sharing its memory).
        self._window_sets: dict[tuple, tuple[Any, Tensor]] = {}
        # (stage, index in the stage) of every block, numbered across stages.
        self._where: list[tuple[int, int]] = [
            (s, j) for s, stage in enumerate(model.layers) for j in range(len(stage.blocks))
        ]

    def __getstate__(self) -> dict[str, Any]:
        # The window-index cache holds weak references, which do not pickle; it refills.
        state = self.__dict__.copy()
        state["_window_sets"] = {}
        return state

    # -- what can be wrapped ----------------------------------------------------------------------

    @classmethod
    def check(cls, model: nn.Module, who: str) -> None:
        timm = _timm_classes()
        if not isinstance(model, timm["model"]):
            raise TypeError(
                f"{who}: model must be a {cls.description}, got "
                f"{type(model).__module__}.{type(model).__name__}"
            )
        changed = _overrides(model, timm["model"], ("forward_features", "forward_head"))
        if changed:
            raise TypeError(
                f"{who}: {type(model).__name__} overrides SwinTransformer.{changed[0]}, so the "
                "prompted forward would not match it"
            )
        if model.global_pool != "avg":
            raise ValueError(
                f"{who}: global_pool={model.global_pool!r} is not supported; a prompted Swin "
                "averages tokens ('avg'), as the official VPT-Swin does"
            )
        head = getattr(model, "head", None)
        if not (hasattr(head, "drop") and hasattr(head, "fc")):
            raise TypeError(f"{who}: the Swin head must be timm's ClassifierHead (drop, fc)")
        for s, stage in enumerate(model.layers):
            where = f"stage {s}"
            plain = isinstance(stage, timm["stage"]) and not _overrides(
                stage, timm["stage"], ("forward",)
            )
            if not plain:
                raise TypeError(f"{who}: {where} is not timm's SwinTransformerStage")
            if len(stage.blocks) == 0:
                raise ValueError(f"{who}: {where} has no blocks; every stage needs one")
            ds = stage.downsample
            if not isinstance(ds, nn.Identity) and (
                not isinstance(ds, timm["merging"]) or _overrides(ds, timm["merging"], ("forward",))
            ):
                raise TypeError(
                    f"{who}: {where} merges patches with {type(ds).__name__}; prompts go through "
                    "timm's PatchMerging only (a prompt p is merged as cat([p, p, p, p]))"
                )
            for j, blk in enumerate(stage.blocks):
                attn = getattr(blk, "attn", None)
                if (
                    not isinstance(blk, timm["block"])
                    or _overrides(blk, timm["block"], ("forward", "_attn"))
                    or not isinstance(attn, timm["attention"])
                    or _overrides(attn, timm["attention"], ("forward",))
                ):
                    raise TypeError(
                        f"{who}: block {j} of {where} is {type(blk).__name__}; prompts are "
                        "prepended to the windows of timm's SwinTransformerBlock/WindowAttention "
                        "only"
                    )

    def fused_unsupported_reasons(self) -> list[str]:
        """None: :meth:`check` admits only timm's own blocks, which both paths reproduce."""
        return []

    def structure(self) -> tuple[tuple[int, ...], tuple[Any, ...]]:
        m = self.model
        kinds = tuple(
            (type(st), type(st.downsample), *((type(b), type(b.attn)) for b in st.blocks))
            for st in m.layers
        )
        return tuple(len(st.blocks) for st in m.layers), kinds

    def own_forwards(self, block: int | None, fused: bool, memory: str) -> list[tuple[str, Any]]:
        # Both paths run a block their own way (prompts join every window); the model, its
        # stages and their block lists are never called as modules.
        if block is None:
            own = [("the wrapped model", self.model), ("layers", self.model.layers)]
            for s, stage in enumerate(self.model.layers):
                own += [(f"layers.{s}", stage), (f"layers.{s}.blocks", stage.blocks)]
            return own
        s, j = self._where[block]
        blk, name = self.model.layers[s].blocks[j], f"layers.{s}.blocks.{j}"
        return [(name, blk), (f"{name}.attn", blk.attn)]

    # -- facts ------------------------------------------------------------------------------------

    def grad_checkpointing(self) -> bool:
        """timm's switch on a Swin (``set_grad_checkpointing``) sets each stage's flag, not the
        model's: any stage's flag asks for per-block checkpointing."""
        return any(getattr(stage, "grad_checkpointing", False) for stage in self.model.layers)

    @property
    def depth(self) -> int:
        return len(self._where)

    def stages(self) -> tuple[int, ...]:
        return tuple(len(stage.blocks) for stage in self.model.layers)

    def _block(self, block: int) -> nn.Module:
        s, j = self._where[block]
        return self.model.layers[s].blocks[j]

    def block_shape(self, block: int) -> BlockShape:
        blk = self._block(block)
        heads = int(blk.attn.num_heads)
        return BlockShape(int(blk.dim), heads, int(blk.attn.qkv.out_features) // 3 // heads)

    def signature(self) -> dict[str, Any]:
        m = self.model
        return {
            "class": type(m).__name__,
            "embed_dim": int(m.embed_dim),
            "depths": list(self.stages()),
            "widths": [self.block_shape(self._first(s)).width for s in range(len(m.layers))],
            "num_heads": [self.block_shape(self._first(s)).heads for s in range(len(m.layers))],
            # Swin-B at window 7 and at window 12 share every width: prompts of one are not the
            # other's.
            "window_size": [
                [int(w) for w in self._block(self._first(s)).window_size]
                for s in range(len(m.layers))
            ],
            "patch_size": list(self.patch_size()),
            "num_classes": int(m.num_classes),
        }

    def _first(self, stage: int) -> int:
        return self._where.index((stage, 0))

    def default_readout(self) -> str:
        """The official VPT-Swin readout: the mean of every token, prompts included."""
        return "patches+prompts"

    def reads_prompts(self, readout: str) -> bool:
        return readout == "patches+prompts"

    def class_token(self) -> int | None:
        return None

    def classifier(self) -> nn.Module:
        return self.model.head.fc

    # -- the forward ------------------------------------------------------------------------------

    def embed(self, images: Tensor) -> SwinTokens:
        """The patch embedding (with its norm), (B, H, W, C); Swin has no positional one."""
        if not torch.compiler.is_compiling():  # a trace neither reads nor fills the cache
            self._window_sets.clear()  # a new forward
        return SwinTokens(self.model.patch_embed(images), None)

    def enter(self, block: int, tokens: SwinTokens, held: int) -> SwinTokens:
        """A stage's patch merging at its first block, a held prompt p merged as
        cat([p, p, p, p]) (the official ``PromptedPatchMerging``)."""
        s, j = self._where[block]
        merge = self.model.layers[s].downsample
        if j != 0 or isinstance(merge, nn.Identity):
            return tokens
        x, p = tokens
        if p is not None:
            p = merge.reduction(merge.norm(torch.cat([p, p, p, p], dim=-1)))
        return SwinTokens(merge(x), p)

    def insert(self, tokens: SwinTokens, block: int, prompts: Tensor, position: str) -> SwinTokens:
        return SwinTokens(tokens.patches, prompts.expand(tokens.patches.shape[0], -1, -1))

    def remove(self, tokens: SwinTokens, count: int, position: str) -> SwinTokens:
        return SwinTokens(tokens.patches, None)

    def _owner(self, batch: int, count: int, device: torch.device) -> Tensor:
        """The image whose prompts window j (image by image, B·nW of them) receives."""
        return self._window_index(None, batch, count, device)

    def _window_index(
        self, index: Tensor | None, batch: int, count: int, device: torch.device
    ) -> Tensor:
        """The set each window (B·nW of them) attends to: its owner image's entry of ``index``
        (None: the owner image itself). Ordinary tensors even under torch.inference_mode:
        prompt_attention keeps its check of a CUDA prompt_index per version counter."""
        # Traced (torch.compile, export): no cache, whose ids and versions a trace cannot keep.
        traced = tracing()
        key = (None if index is None else id(index), batch, count, device, self.window_mixing)
        hit = None if traced else self._window_sets.get(key)
        if hit is not None and _same(hit[0], index):
            return hit[1]
        with torch.inference_mode(False):
            images = torch.arange(batch, device=device)
            if self.window_mixing:
                owner = images.repeat(count)
            else:
                owner = images.repeat_interleave(count)
            found = owner if index is None else index[owner]
        if traced:
            return found
        if index is None or not index.is_inference():  # an inference tensor has no version
            if len(self._window_sets) >= 64:
                self._window_sets.clear()
            tag = None if index is None else (weakref.ref(index), index._version)
            self._window_sets[key] = (tag, found)
        return found

    def _window_mean(self, rows: Tensor, batch: int, count: int) -> Tensor:
        """Prompt outputs (B·nW, P, C) averaged over the windows that received each image's."""
        p, c = rows.shape[1:]
        if self.window_mixing:  # the official view(-1, B, P, C).mean(0)
            return rows.view(count, batch, p, c).mean(0)
        return rows.view(batch, count, p, c).mean(1)

    def block(self, block: int, tokens: SwinTokens, held: int) -> SwinTokens:
        """The official block: the prompts copied into every window, zero bias and mask for them,
        their outputs averaged over the windows."""
        blk = self._block(block)
        x, p = tokens
        if p is None:
            return SwinTokens(blk(x), None)
        attn, n_p = blk.attn, p.shape[1]
        part = partition(blk, blk.norm1(x))
        b, nw = x.shape[0], part.count
        hp = blk.norm1(p)[self._owner(b, nw, x.device)]
        seq = torch.cat([hp, part.windows], dim=1)
        q, k, v = split_qkv(attn, seq)
        bias = F.pad(window_bias(blk, part, q.dtype), (n_p, 0, n_p, 0))
        if bias.shape[0] > 1:  # one per window: every image's windows get it, as officially
            bias = bias.repeat(b, 1, 1, 1)
        o = window_attention(attn, q, k, v, bias)
        o = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(seq.shape[0], seq.shape[1], -1)))
        x = x + blk.drop_path1(reverse(blk, part, o[:, n_p:]))
        p = p + blk.drop_path1(self._window_mean(o[:, :n_p], b, nw))
        # One MLP over every token, as the official code runs it: the same numbers as two calls,
        # and a traced FLOP count keeps the prompt rows even where the next block drops them.
        h, w = x.shape[1:3]
        out = _mlp(blk, torch.cat([p, x.flatten(1, 2)], dim=1))
        return SwinTokens(out[:, n_p:].unflatten(1, (h, w)), out[:, :n_p])

    def prompt_kv(self, block: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
        blk = self._block(block)
        return kv_rows(blk.attn, blk.norm1(prompts))

    def prompt_kv_parts(self, block: int, dtype: Any) -> PromptKVParts:
        blk = copy.deepcopy(self._block(block)).to(dtype)
        return PromptKVParts(
            normalize=blk.norm1,
            project=lambda h: kv_rows(blk.attn, h),
            norm_bias=getattr(blk.norm1, "bias", None),
        )

    def fused_block(
        self,
        block: int,
        tokens: SwinTokens,
        held: int,
        kv: PromptKV | None,
        attend: AttentionFn,
        backend: str | None,
    ) -> SwinTokens:
        """The block with every prompt's key, value and query computed once per image.

        The windows' queries attend to the prompt keys/values (``kv``: a set entering the block
        whose outputs are not kept; and the held prompt tokens' own, computed here) before their
        window's keys, with the relative-position bias and shift mask as ``key_bias``. Held prompt
        tokens also get their rows: P queries per window attending to the same keys without a
        bias, averaged over the windows, then projection, residual and MLP once per image. A block
        with held prompts makes two ``attend`` calls (windows' queries, prompts' queries).
        """
        if tokens.prompts is None and kv is None:  # no prompt here (a mixed batch's empty block)
            return self.block(block, tokens, held)
        blk = self._block(block)
        attn = blk.attn
        x, p = tokens
        part = partition(blk, blk.norm1(x))
        b, nw = x.shape[0], part.count
        q, k, v = split_qkv(attn, part.windows)
        # The held prompts' queries, keys and values: one projection of their P rows per image,
        # or once for the batch when every image holds the same set (a deep set, which insert
        # expands): the backward then sums the images' gradients before the projection's.
        shared = p is not None and p.shape[0] > 1 and p.stride(0) == 0
        own = None if p is None else split_qkv(attn, blk.norm1(p[:1] if shared else p))
        pk, pv, index, lengths = self._prompt_table(own, kv, b, q.dtype, x.device)
        if index is _EACH_IMAGE:
            window_index = self._owner(b, nw, x.device)
        else:
            window_index = None if index is None else self._window_index(index, b, nw, x.device)
        s, j = self._where[block]
        bias = constant_window_bias(blk, part, q.dtype, f"layers.{s}.blocks.{j}")
        call = AttentionCall(
            block, q, k, v, pk, pv, window_index, attn.scale, backend, lengths, bias, nw
        )
        o = attend(call).transpose(1, 2).flatten(2)
        o = attn.proj_drop(attn.proj(o))
        x = _mlp(blk, x + blk.drop_path1(reverse(blk, part, o)))
        if p is None:
            return SwinTokens(x, None)
        qp = own[0].expand(b * nw, -1, -1, -1) if shared else own[0][self._owner(b, nw, x.device)]
        call = AttentionCall(
            block, qp, k, v, pk, pv, window_index, attn.scale, backend, lengths, None, nw
        )
        rows = attend(call).transpose(1, 2).flatten(2)  # (B·nW, P, C), P may be 0
        op = attn.proj_drop(attn.proj(self._window_mean(rows, b, nw)))
        return SwinTokens(x, _mlp(blk, p + blk.drop_path1(op)))

    def _prompt_table(
        self,
        own: tuple[Tensor, Tensor, Tensor] | None,
        kv: PromptKV | None,
        batch: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[Tensor, Tensor, Any, Tensor | None]:
        """The prompt keys/values every window of an image attends to: ``kv``'s sets (cast to the
        queries' dtype: cached ones are in the weights'), then the held prompts' own (``own``:
        their q, k, v, one set per image or a single set that every image holds). Returns (k, v,
        per-image set index, None for set 0 or ``_EACH_IMAGE`` for set b, per-set lengths or
        None)."""
        if own is None:
            return kv.k.to(dtype), kv.v.to(dtype), kv.index, kv.lengths
        _, own_k, own_v = own
        if kv is None:
            return own_k, own_v, None if own_k.shape[0] == 1 else _EACH_IMAGE, None
        own_k, own_v = own_k.expand(batch, -1, -1, -1), own_v.expand(batch, -1, -1, -1)
        if kv.lengths is not None:
            raise ValueError(
                "SwinBackbone.fused_block: keys/values of sets of different lengths cannot join "
                "prompt tokens"
            )
        idx = kv.index
        if idx is None:
            idx = torch.zeros(batch, dtype=torch.long, device=device)
        k = torch.cat([kv.k.to(dtype)[idx], own_k], dim=2)
        v = torch.cat([kv.v.to(dtype)[idx], own_v], dim=2)
        return k, v, _EACH_IMAGE, None

    def features(self, tokens: SwinTokens) -> Tensor:
        """The final norm over every token, (B, P + H·W, C): prompts first, then the patches in
        row-major order (the official layout)."""
        x, p = tokens
        x = self.model.norm(x).flatten(1, 2)
        return x if p is None else torch.cat([self.model.norm(p), x], dim=1)

    def pool(self, features: Tensor, readout: str, held: int, position: str) -> Tensor:
        if readout == "patches":
            return features[:, held:].mean(dim=1)
        return features.mean(dim=1)

    def head(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's ``ClassifierHead`` after its pooling: dropout, then the classifier."""
        x = self.model.head.drop(pooled)
        return x if pre_logits else self.model.head.fc(x)
