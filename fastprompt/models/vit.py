"""Everything fastprompt knows about timm's ``VisionTransformer`` internals, in one place.

The prompted core (:mod:`fastprompt.prompted`) and the methods never touch timm attributes
directly; they call this module: which models can be wrapped and why not, the model signature a
checkpoint must agree with, the embedding, the rule that ``norm_pre`` applies only to what enters
block 0, prompt keys/values from normalised prompts, and the fused block (timm's ``Block`` on image
tokens whose queries attend to ``[K_p; K]`` through a pluggable attention function).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionCall",
    "check_wrappable",
    "default_readout",
    "embed",
    "entering",
    "fused_block",
    "fused_unsupported_reasons",
    "head",
    "init_head_vpt",
    "kv_from_normed",
    "patch_size",
    "pool",
    "prompt_kv",
    "signature",
]

POOLS = ("token", "avg")


def _timm_classes():
    try:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise ImportError("fastprompt needs timm installed") from e
    return VisionTransformer, Block, Attention


def check_wrappable(model: nn.Module, who: str) -> None:
    """Raise a clear error when ``model`` is not a timm ViT whose forward fastprompt reproduces.

    Parameters
    ----------
    model : nn.Module
    who : str
        The entry point, for messages (``"fastprompt.vpt"``).
    """
    vit_cls, _, _ = _timm_classes()
    if not isinstance(model, vit_cls):
        raise TypeError(
            f"{who}: model must be a timm VisionTransformer (vit_*, deit_*), got "
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


def fused_unsupported_reasons(model: nn.Module) -> list[str]:
    """Why the fused path (image rows, prompt K/V per block) cannot run ``model``; [] if it can.

    The fused block reproduces timm's ``vision_transformer.Block`` and ``Attention`` forwards; a
    subclass that overrides either (even keeping the attribute names) computes something else.
    """
    _, block_cls, attn_cls = _timm_classes()
    reasons = []
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if type(blk).forward is not block_cls.forward or type(attn).forward is not attn_cls.forward:
            reasons.append(
                f"block {i} is {type(blk).__name__} with {type(attn).__name__}, and the fused path "
                "reproduces timm's vision_transformer.Block/Attention forwards only"
            )
    return reasons


def default_readout(model: nn.Module) -> str:
    """The readout matching the model's own pooling: the class token for ``global_pool="token"``,
    the official VPT avg-pool path (every non-prefix token, prompts included) for ``"avg"``."""
    return "cls" if getattr(model, "global_pool", "token") == "token" else "patches+prompts"


def patch_size(model: nn.Module) -> tuple[int, int]:
    ps = model.patch_embed.patch_size
    return (ps, ps) if isinstance(ps, int) else tuple(ps)


def signature(model: nn.Module) -> dict[str, Any]:
    """What a prompt checkpoint must agree with to load onto ``model``."""
    return {
        "class": type(model).__name__,
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads) if len(model.blocks) else 0,
        "patch_size": list(patch_size(model)),
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "num_classes": int(model.num_classes),
    }


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """Tokens ``[prefix, patches]`` (B, n_prefix + N_patches, D) after the positional embedding."""
    return model.patch_drop(model._pos_embed(model.patch_embed(x)))


def entering(norm_pre: nn.Module, block: int, prompts: Tensor) -> Tensor:
    """What prompt tokens inserted before ``block`` look like when the block reads them.

    ``norm_pre`` (the model's; CLIP's ``ln_pre``, Identity in most ViTs) runs once, on everything
    entering block 0, so prompts inserted there go through it; prompts inserted later replace
    outputs of the previous block, which never see it again.
    """
    return norm_pre(prompts) if block == 0 else prompts


def kv_from_normed(blk: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values from normalised prompt tokens ``h = LN1(p)`` (T, P, D): (T, H, P, d) each.

    Only the K and V rows of the qkv projection are applied; prompt queries are never needed.
    """
    attn = blk.attn
    t, p, _ = h.shape
    width = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[width:] if attn.qkv.bias is not None else None
    kv = F.linear(h, attn.qkv.weight[width:], bias)
    kv = kv.reshape(t, p, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    return attn.k_norm(k), v


def prompt_kv(model: nn.Module, block: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values, (T, H, P, d) each, of prompt tokens (T, P, D) inserted before ``block``."""
    blk = model.blocks[block]
    return kv_from_normed(blk, blk.norm1(entering(model.norm_pre, block, prompts)))


@dataclass(frozen=True)
class AttentionCall:
    """One block's prompt attention, as handed to a pluggable attention function.

    Attributes
    ----------
    block : int
        Block index.
    q, k, v : Tensor, shape (B, H, N, d)
        Image queries, keys and values (after qk-norm).
    prompt_k, prompt_v : Tensor, shape (T, H, P, d)
        The block's prompt keys/values: one shared set (T = 1) or one per image (T = B).
    prompt_index : Tensor of int, shape (B,), or None
        Set of each image; None means set 0 for all.
    scale : float
        The block's score scale.
    backend : str or None
        The backend the model was built with.
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


AttentionFn = Callable[[AttentionCall], Tensor]


def fused_block(
    blk: nn.Module,
    block: int,
    x: Tensor,
    pk: Tensor,
    pv: Tensor,
    attend: AttentionFn,
    backend: str | None,
    per_image: Tensor | None = None,
) -> Tensor:
    """timm ``Block.forward`` on image tokens (B, N, D), their queries attending to ``[K_p; K]``.

    ``attend`` receives an :class:`AttentionCall` and returns the attention output (B, H, N, d).
    ``per_image`` is ``arange(B)``, the set index used when the prompts are per image (T = B); a
    model passes the same tensor to every block.
    """
    attn = blk.attn
    b, n, _ = x.shape
    h = blk.norm1(x)
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if pk.shape[0] == 1:
        index = None
    else:
        index = per_image if per_image is not None else torch.arange(b, device=x.device)
    # Cached prompt K/V are kept in the weights' dtype; under autocast q is in the autocast one.
    pk, pv = pk.to(q.dtype), pv.to(q.dtype)
    o = attend(AttentionCall(block, q, k, v, pk, pv, index, attn.scale, backend))
    o = o.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)  # timm >= 1.0.10 (scale_norm); absent before
    if norm is not None:
        o = norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    x = x + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def pool(model: nn.Module, tokens: Tensor, readout: str, patches: slice) -> Tensor:
    """Pooled features (B, D) of final tokens, before ``fc_norm``.

    Parameters
    ----------
    tokens : Tensor, shape (B, N_tokens, D)
    readout : {"cls", "patches", "patches+prompts"}
        The class token; the mean of the patch tokens; the mean of every non-prefix token, prompt
        outputs included (the official VPT avg-pool path).
    patches : slice
        Where the patch tokens are in ``tokens``.
    """
    if readout == "cls":
        return tokens[:, 0]
    if readout == "patches":
        return tokens[:, patches].mean(dim=1)
    return tokens[:, model.num_prefix_tokens :].mean(dim=1)


def head(model: nn.Module, pooled: Tensor, pre_logits: bool = False) -> Tensor:
    """``fc_norm``, head dropout and head, as timm's ``forward_head`` after pooling."""
    x = model.head_drop(model.fc_norm(pooled))
    return x if pre_logits else model.head(x)


def init_head_vpt(model: nn.Module) -> None:
    """The official VPT head init: kaiming-normal fan-out weight, bias −log(99) ≈ −4.595."""
    head_module = model.get_classifier()
    if isinstance(head_module, nn.Linear):
        nn.init.kaiming_normal_(head_module.weight, a=0, mode="fan_out")
        if head_module.bias is not None:
            nn.init.constant_(head_module.bias, -math.log((1 - 0.01) / 0.01))
