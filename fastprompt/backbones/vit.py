"""The adapter of timm's ``VisionTransformer``: everything fastprompt knows about its internals.

Which models can be wrapped and why not, the checkpoint signature, the embedding, the rule that
``norm_pre`` applies only to what enters block 0, prompt keys/values from normalised prompts, the
fused block (timm's ``Block`` whose queries also attend to prompt keys/values through a pluggable
attention function), the readouts and the head. The token state is one (B, N, D) tensor:
``[prefix, prompts, patches]`` for prefix prompts (VPT: after the class and register tokens),
``[prefix, patches, prompts]`` for suffix ones (PGN).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastprompt.backbones.base import (
    AttentionCall,
    AttentionFn,
    Backbone,
    BlockShape,
    PromptKV,
    PromptKVParts,
    key_value_columns,
)
from fastprompt.backbones.taps import ViTTaps

__all__ = [
    "POOLS",
    "READOUTS",
    "ViTBackbone",
    "block_with_kv",
    "kv_from_normed",
    "mlp_hidden",
]

POOLS = ("token", "avg")
# "cls": the class token; "patches": the mean of the patch tokens; "patches+prompts": the mean of
# every non-prefix token, prompt outputs included (the official VPT avg-pool path).
READOUTS = ("cls", "patches", "patches+prompts")


def _timm_classes():
    try:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise ImportError("fastprompt needs timm installed") from e
    return VisionTransformer, Block, Attention


def kv_from_normed(blk: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values from normalised prompt tokens ``h = LN1(p)`` (T, P, D): (T, H, P, d) each.

    Prompt queries are never needed: only the K and V rows of a plain qkv projection run.
    """
    attn = blk.attn
    t, p, _ = h.shape
    kv = (
        key_value_columns(attn.qkv, h)
        .reshape(t, p, 2, attn.num_heads, attn.head_dim)
        .permute(2, 0, 3, 1, 4)
    )
    k, v = kv.unbind(0)
    return attn.k_norm(k), v


def _entering(norm_pre: nn.Module, block: int, prompts: Tensor) -> Tensor:
    """Prompt tokens entering ``block`` as the block reads them.

    ``norm_pre`` (CLIP's ``ln_pre``; Identity in most ViTs) runs once, on everything entering
    block 0, so prompts inserted there go through it; prompts inserted later replace outputs of
    an earlier block (or join them), which never see it again.
    """
    return norm_pre(prompts) if block == 0 else prompts


def _timm_mlps() -> tuple[type, ...]:
    from timm.layers.mlp import GluMlp, Mlp, SwiGLU

    return Mlp, GluMlp, SwiGLU


def mlp_hidden(mlp: nn.Module, x: Tensor) -> Tensor:
    """timm's ``Mlp``, ``GluMlp`` or ``SwiGLU`` forward up to its output projection ``fc2``:
    the hidden (B, N, hidden) that ``fc2`` reads."""
    mlp_cls, glu_cls, swiglu_cls = _timm_mlps()
    forward = type(mlp).forward
    if forward is mlp_cls.forward:
        x = mlp.act(mlp.fc1(x))
    elif forward is glu_cls.forward:
        x1, x2 = mlp.fc1(x).chunk(2, dim=mlp.chunk_dim)
        x = x1 * mlp.act(x2) if mlp.gate_last else mlp.act(x1) * x2
    elif forward is swiglu_cls.forward:
        gate = mlp.fc1_g(x)
        x = mlp.act(gate) * mlp.fc1_x(x)
    else:  # pragma: no cover - refused by ViTBackbone.recompute_policies
        raise TypeError(f"mlp_hidden: {type(mlp).__name__} is not a timm Mlp, GluMlp or SwiGLU")
    return mlp.norm(mlp.drop1(x))


def _finish(blk: nn.Module, x: Tensor, hidden: Tensor) -> Tensor:
    """The block's frozen tail: ``x + MLP output`` from the MLP's hidden. A frozen ``fc2``
    saves no activation, so the tail stays outside every recomputed region."""
    return x + blk.drop_path2(blk.ls2(blk.mlp.drop2(blk.mlp.fc2(hidden))))


def _mlp_residual(blk: nn.Module, x: Tensor, memory: str) -> Tensor | tuple[Tensor, Tensor]:
    """``x + MLP(norm2(x))`` under a recompute policy (``docs/design.md`` §4, "Memory").

    ``"none"``: timm's modules as they are. ``"mlp"``: the MLP hidden (the GELU input, 4·D
    per token) is recomputed in backward from ``x``, which is kept; ``fc2`` is not recomputed.
    ``"block"``: ``(x, hidden)``, for the core to finish outside its recomputed region.
    """
    if memory == "none":
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def hidden_of(t: Tensor) -> Tensor:
        return mlp_hidden(blk.mlp, blk.norm2(t))

    if memory == "block":
        return x, hidden_of(x)
    if memory != "mlp":
        raise ValueError(f"fastprompt: unknown memory policy {memory!r}")
    if torch.is_grad_enabled() and x.requires_grad:
        hidden = checkpoint(hidden_of, x, use_reentrant=False, preserve_rng_state=True)
    else:
        hidden = hidden_of(x)
    return _finish(blk, x, hidden)


def block_with_kv(
    blk: nn.Module,
    block: int,
    tokens: Tensor,
    kv: PromptKV,
    attend: AttentionFn,
    backend: str | None,
    memory: str = "none",
) -> Tensor | tuple[Tensor, Tensor]:
    """timm ``vision_transformer.Block.forward`` on ``tokens`` (B, N, D), their queries
    attending to ``[kv; K]`` through ``attend`` (an :class:`AttentionCall` in, the attention
    output (B, H, N, d) out); ``memory`` as in :func:`_mlp_residual`."""
    attn = blk.attn
    b, n, _ = tokens.shape
    h = blk.norm1(tokens)
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # Cached prompt K/V are kept in the weights' dtype; under autocast q is in the autocast one.
    pk, pv = kv.k.to(q.dtype), kv.v.to(q.dtype)
    call = AttentionCall(block, q, k, v, pk, pv, kv.index, attn.scale, backend, kv.lengths)
    o = attend(call).transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)  # timm >= 1.0.10 (scale_norm); absent before
    if norm is not None:
        o = norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    x = tokens + blk.drop_path1(blk.ls1(o))
    return _mlp_residual(blk, x, memory)


class ViTBackbone(Backbone):
    """timm ``VisionTransformer`` (ViT, DeiT, CLIP/SigLIP-style, register tokens, hybrids)."""

    family = "vit"
    description = "timm VisionTransformer (vit_*, deit_*)"
    positions = ("prefix", "suffix")
    readouts = READOUTS
    taps_class = ViTTaps

    # -- what can be wrapped ----------------------------------------------------------------------

    @classmethod
    def check(cls, model: nn.Module, who: str) -> None:
        vit_cls, _, _ = _timm_classes()
        if not isinstance(model, vit_cls):
            raise TypeError(
                f"{who}: model must be a {cls.description}, got "
                f"{type(model).__module__}.{type(model).__name__}"
            )
        for method in ("forward_features", "forward_head", "_pos_embed"):
            if getattr(type(model), method) is not getattr(vit_cls, method):
                raise TypeError(
                    f"{who}: {type(model).__name__} overrides VisionTransformer.{method} "
                    "(e.g. DeiT's distillation token), so the prompted forward would not match it"
                )
        if getattr(model, "attn_pool", None) is not None or model.global_pool not in POOLS:
            raise ValueError(
                f"{who}: global_pool={model.global_pool!r} is not supported; prompted models read "
                "the class token ('token') or average tokens ('avg')"
            )
        if getattr(model, "pool_include_prefix", False):
            raise ValueError(f"{who}: pool_include_prefix=True is not supported")
        if list(model.named_buffers(recurse=False)):
            raise TypeError(f"{who}: models with top-level buffers are not supported")

    def fused_unsupported_reasons(self) -> list[str]:
        """The fused block reproduces timm's ``vision_transformer.Block`` and ``Attention``
        forwards; a subclass that overrides either (even keeping the attribute names) computes
        something else."""
        _, block_cls, attn_cls = _timm_classes()
        reasons = []
        for i, blk in enumerate(self.model.blocks):
            attn = getattr(blk, "attn", None)
            if (
                type(blk).forward is not block_cls.forward
                or type(attn).forward is not attn_cls.forward
            ):
                reasons.append(
                    f"block {i} is {type(blk).__name__} with {type(attn).__name__}, and the fused "
                    "path reproduces timm's vision_transformer.Block/Attention forwards only"
                )
        return reasons

    def structure(self) -> tuple[tuple[int, ...], tuple[Any, ...]]:
        blocks = self.model.blocks
        kinds = tuple(
            (type(b), type(getattr(b, "attn", None)), type(getattr(b, "mlp", None))) for b in blocks
        )
        return (len(blocks),), kinds

    def own_forwards(self, block: int | None, fused: bool, memory: str) -> list[tuple[str, Any]]:
        if block is None:  # the core runs the blocks one by one, never the model or its list
            return [("the wrapped model", self.model), ("blocks", self.model.blocks)]
        blk, name = self.model.blocks[block], f"blocks.{block}"
        own = [(name, blk)] if fused or memory != "none" else []
        if fused:
            own.append((f"{name}.attn", blk.attn))
        if memory != "none":  # the MLP hidden is recomputed from its layers
            own.append((f"{name}.mlp", blk.mlp))
        return own

    # -- facts ------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def block_shape(self, block: int) -> BlockShape:
        attn = getattr(self.model.blocks[block], "attn", None)
        width = int(self.model.embed_dim)
        if attn is None:  # a block class of another layout: only the width is known
            return BlockShape(width, 0, 0)
        return BlockShape(width, int(attn.num_heads), int(attn.head_dim))

    def signature(self) -> dict[str, Any]:
        m = self.model
        return {
            "class": type(m).__name__,
            "embed_dim": int(m.embed_dim),
            "depth": len(m.blocks),
            "num_heads": int(m.blocks[0].attn.num_heads) if len(m.blocks) else 0,
            "patch_size": list(self.patch_size()),
            "num_prefix_tokens": int(m.num_prefix_tokens),
            "num_classes": int(m.num_classes),
        }

    def default_readout(self) -> str:
        """The class token for ``global_pool="token"``; the official VPT avg-pool path (every
        non-prefix token, prompts included) for ``"avg"``."""
        return (
            "cls" if getattr(self.model, "global_pool", "token") == "token" else "patches+prompts"
        )

    def check_readout(self, readout: str, who: str) -> None:
        super().check_readout(readout, who)
        if readout == "cls" and self.model.cls_token is None:
            raise ValueError(f"{who}: readout='cls' needs a model with a class token")

    def reads_prompts(self, readout: str) -> bool:
        return readout == "patches+prompts"

    def class_token(self) -> int | None:
        return None if self.model.cls_token is None else 0

    def classifier(self) -> nn.Module:
        return self.model.get_classifier()

    # -- the forward ------------------------------------------------------------------------------

    def embed(self, images: Tensor) -> Tensor:
        """``[prefix, patches]`` (B, n_prefix + N_patches, D) after the positional embedding and
        ``norm_pre``."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def insert(self, tokens: Tensor, block: int, prompts: Tensor, position: str) -> Tensor:
        prompts = _entering(self.model.norm_pre, block, prompts).expand(tokens.shape[0], -1, -1)
        if position == "prefix":
            npre = self.model.num_prefix_tokens
            return torch.cat([tokens[:, :npre], prompts, tokens[:, npre:]], dim=1)
        return torch.cat([tokens, prompts], dim=1)

    def remove(self, tokens: Tensor, count: int, position: str) -> Tensor:
        if position == "prefix":
            npre = self.model.num_prefix_tokens
            return torch.cat([tokens[:, :npre], tokens[:, npre + count :]], dim=1)
        return tokens[:, : tokens.shape[1] - count]

    def block(
        self, block: int, tokens: Tensor, held: int, memory: str = "none"
    ) -> Tensor | tuple[Tensor, Tensor]:
        blk = self.model.blocks[block]
        if memory == "none":
            return blk(tokens)
        x = tokens + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(tokens))))
        return _mlp_residual(blk, x, memory)

    def prompt_kv(self, block: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
        blk = self.model.blocks[block]
        return kv_from_normed(blk, blk.norm1(_entering(self.model.norm_pre, block, prompts)))

    def prompt_kv_parts(self, block: int, dtype: Any) -> PromptKVParts:
        blk = copy.deepcopy(self.model.blocks[block]).to(dtype)
        norm_pre = copy.deepcopy(self.model.norm_pre).to(dtype)
        return PromptKVParts(
            normalize=lambda p: blk.norm1(_entering(norm_pre, block, p)),
            project=lambda h: kv_from_normed(blk, h),
            norm_bias=getattr(blk.norm1, "bias", None),
        )

    def fused_block(
        self,
        block: int,
        tokens: Tensor,
        held: int,
        kv: PromptKV,
        attend: AttentionFn,
        backend: str | None,
        memory: str = "none",
    ) -> Tensor | tuple[Tensor, Tensor]:
        blk = self.model.blocks[block]
        return block_with_kv(blk, block, tokens, kv, attend, backend, memory)

    # -- memory -----------------------------------------------------------------------------------

    def recompute_reasons(self) -> list[str]:
        """Why the blocks cannot be split at the MLP's output projection ([] when they can)."""
        _, block_cls, _ = _timm_classes()
        mlps = _timm_mlps()
        reasons = []
        for i, blk in enumerate(self.model.blocks):
            mlp = getattr(blk, "mlp", None)
            if type(blk).forward is not block_cls.forward or not any(
                type(mlp).forward is cls.forward for cls in mlps
            ):
                reasons.append(
                    f"block {i} is {type(blk).__name__} with {type(mlp).__name__}, and the split "
                    "reproduces timm's vision_transformer.Block with Mlp, GluMlp or SwiGLU only"
                )
        return reasons

    def recompute_policies(self) -> tuple[str, ...]:
        """``"mlp"`` and ``"block"`` when every block is timm's ``Block`` with a timm MLP."""
        return () if self.recompute_reasons() else ("mlp", "block")

    def finish_block(self, block: int, partial: Any) -> Tensor:
        if isinstance(partial, tuple):
            return _finish(self.model.blocks[block], *partial)
        return partial

    def features(self, tokens: Tensor) -> Tensor:
        return self.model.norm(tokens)

    def features_without_prompts(self, tokens: Tensor, count: int, position: str) -> Tensor:
        # The norm over every token first, as the official computation does, so that the naive
        # path costs what it costs.
        return self.remove(self.features(tokens), count, position)

    def pool(self, features: Tensor, readout: str, held: int, position: str) -> Tensor:
        npre, n = self.model.num_prefix_tokens, features.shape[1]
        if readout == "cls":
            return features[:, 0]
        if readout == "patches":
            patches = slice(npre + held, n) if position == "prefix" else slice(npre, n - held)
            return features[:, patches].mean(dim=1)
        return features[:, npre:].mean(dim=1)

    def head(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        """``fc_norm``, head dropout and head, as timm's ``forward_head`` after pooling."""
        m = self.model
        x = m.head_drop(m.fc_norm(pooled))
        return x if pre_logits else m.head(x)
