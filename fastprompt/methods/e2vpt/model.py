"""E²VPT's model: :class:`E2VPTConfig`, :func:`build`, :func:`e2vpt`, official checkpoints.

The semantics are the official code's (ChengHan111/E2VPT, ``src/models/vit_prompt/
vit_prompt_VK.py``, ``src/models/vit_backbones/vit_changeVK.py``), with the prompts of
:class:`fastprompt.sources.key_value.KeyValuePrompts`. The prompted core runs them on its fused
path: a deep visual set's outputs are overwritten before the next block, so only its keys and
values are computed (``docs/design.md`` §3), and the key-value prompts are joined in front of them
as keys and values directly, with no projection and no prompt rows at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastprompt.backbones import Backbone, adapter_for
from fastprompt.methods.common import (
    LEARNED_HEAD_INITS,
    as_int,
    check_learned_prompts,
    default_readout,
    init_head_vpt,
    tied,
)
from fastprompt.prompted import PromptedViT
from fastprompt.sources.key_value import KV_INITS, SEGMENT_MASK, TOKEN_MASK, KeyValuePrompts

__all__ = [
    "METHOD",
    "VTAB1K_PROMPTS",
    "E2VPTConfig",
    "build",
    "e2vpt",
    "read_official",
]

METHOD = "e2vpt"

# (visual, key-value) prompts per VTAB-1k task in the official command list (command.txt); every
# FGVC task uses (5, 5).
VTAB1K_PROMPTS: dict[str, tuple[int, int]] = {
    "cifar100": (5, 5),
    "caltech101": (32, 5),
    "dtd": (10, 5),
    "oxford_flowers102": (1, 1),
    "oxford_iiit_pet": (10, 5),
    "svhn": (10, 5),
    "sun397": (10, 5),
    "patch_camelyon": (10, 10),
    "eurosat": (10, 5),
    "resisc45": (10, 5),
    "diabetic_retinopathy": (10, 5),
    "clevr_count": (10, 5),
    "clevr_dist": (10, 5),
    "dmlab": (10, 5),
    "kitti": (10, 5),
    "dsprites_loc": (5, 5),
    "dsprites_ori": (5, 5),
    "smallnorb_azi": (10, 5),
    "smallnorb_ele": (10, 5),
}


@dataclass(frozen=True)
class E2VPTConfig:
    """An E²VPT model's configuration (the official ``MODEL.P_VK`` options it needs).

    Attributes
    ----------
    num_prompts : int
        Visual prompts per set (``NUM_TOKENS_P``).
    num_kv : int
        Key-value prompts per block (``NUM_TOKENS``).
    shared_kv : bool
        One tensor as both key and value prompt (``SHARE_PARAM_KV``, every official command).
    deep : bool
        A visual set per block (``DEEP_P``).
    kv_deep : bool
        Key-value prompts in every block (``DEEP``); False: block 0 only.
    kv_init : {"kaiming", "uniform", "trunc_normal"}
        ``ORIGIN_INIT`` 2 (every official command), 0 or 1.
    dropout : float
        Visual prompt dropout (``DROPOUT_P``; 0.1 in every official command).
    masks : bool
        Token and segment masks (``MASK_CLS_TOKEN``: on in the pruning runs, off in the plain
        ones).
    train_masks : bool
        The masks train (the first run) or are fixed (a rewound model).
    segments : int
        Segments per visual prompt (``CLS_TOKEN_P_PIECES_NUM``).
    project : int
        Prompt width before a Linear projection; -1 for none (``PROJECT``).
    readout : str
        What the head reads (official: the class token).
    kept_tokens : tuple of int, optional
        Set by :func:`fastprompt.methods.e2vpt.pruning.pack`: the visual tokens this packed
        model kept of ``tokens_before`` (the zero tokens removed, which changes the logits);
        None for a model with the official zero tokens.
    tokens_before : int, optional
        Visual prompts per set before packing.
    """

    num_prompts: int = 10
    num_kv: int = 5
    shared_kv: bool = True
    deep: bool = True
    kv_deep: bool = True
    kv_init: str = "kaiming"
    dropout: float = 0.1
    masks: bool = True
    train_masks: bool = True
    segments: int = 16
    project: int = -1
    readout: str = "cls"
    kept_tokens: tuple[int, ...] | None = None
    tokens_before: int | None = None

    def __post_init__(self) -> None:
        who = f"fastprompt.{METHOD}"
        check_learned_prompts(self, who)
        for name in ("num_kv", "segments"):
            value = as_int(getattr(self, name))
            if value is None or value < 0:
                raise ValueError(f"{who}: {name} must be an int >= 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if self.segments < 1:
            raise ValueError(f"{who}: segments must be >= 1, got {self.segments}")
        for name in ("shared_kv", "deep", "kv_deep", "masks", "train_masks"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{who}: {name} must be a bool, got {getattr(self, name)!r}")
        if self.kv_init not in KV_INITS:
            raise ValueError(f"{who}: kv_init must be one of {KV_INITS}, got {self.kv_init!r}")
        if not self.masks and not self.train_masks:
            raise ValueError(f"{who}: train_masks=False (fixed masks) needs masks=True")
        if not isinstance(self.readout, str):
            raise TypeError(f"{who}: readout must be a str, got {type(self.readout).__name__}")
        kept, before = self.kept_tokens, self.tokens_before
        if (kept is None) != (before is None):
            raise ValueError(f"{who}: kept_tokens and tokens_before go together")
        if kept is not None and (
            len(kept) != self.num_prompts
            or list(kept) != sorted(set(kept))
            or any(not 0 <= k < before for k in kept)
        ):
            raise ValueError(
                f"{who}: kept_tokens must be {self.num_prompts} increasing indices below "
                f"tokens_before={before}, got {kept}"
            )


def build(
    model: nn.Module,
    config: E2VPTConfig,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
    share_with: PromptedViT | None = None,
) -> PromptedViT:
    """An E²VPT model from a full :class:`E2VPTConfig` (what :func:`e2vpt`, checkpoints, rewinding
    and packing call)."""
    who = f"fastprompt.{METHOD}"
    if head_init not in LEARNED_HEAD_INITS:
        raise ValueError(f"{who}: head_init must be one of {LEARNED_HEAD_INITS}, got {head_init!r}")
    if isinstance(model, PromptedViT):
        raise TypeError(f"{who}: this model is already prompted; call .unwrap() first")
    backbone = adapter_for(model, who)
    width, patch = tied(backbone, who)
    shapes = [backbone.block_shape(i) for i in range(backbone.depth)]
    heads = {(s.heads, s.head_dim) for s in shapes}
    if len(heads) > 1:
        raise ValueError(f"{who}: key-value prompts of one shape need blocks of one shape: {heads}")
    n_heads, head_dim = heads.pop() if heads else (1, width)
    reasons = backbone.fused_unsupported_reasons()
    if config.num_kv and reasons:
        # The key-value prompts join the keys inside attention: only the fused block can.
        raise TypeError(f"{who}: {'; '.join(reasons)}")
    ref = next(model.parameters())
    source = KeyValuePrompts(
        backbone.depth,
        width,
        n_heads,
        head_dim,
        patch,
        config.num_prompts,
        config.num_kv,
        deep=config.deep,
        kv_deep=config.kv_deep,
        shared_kv=config.shared_kv,
        kv_init=config.kv_init,
        dropout=config.dropout,
        masks=config.masks,
        train_masks=config.train_masks,
        segments=config.segments,
        project=config.project,
        config=config,
        device=ref.device,
        dtype=ref.dtype,
    )
    prompted = PromptedViT(
        model,
        source,
        readout=config.readout,
        impl=impl,
        backend=backend,
        method=METHOD,
        share_with=share_with,
    )
    if head_init == "vpt":
        init_head_vpt(backbone.classifier())
    return prompted


def e2vpt(
    model: nn.Module,
    num_prompts: int = 10,
    num_kv: int = 5,
    shared_kv: bool = True,
    deep: bool = True,
    kv_deep: bool = True,
    dropout: float = 0.1,
    masks: bool = True,
    kv_init: str = "kaiming",
    project: int = -1,
    readout: str | None = None,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
) -> PromptedViT:
    """Wrap a timm VisionTransformer with E²VPT's prompts (official E²VPT semantics).

    Parameters
    ----------
    model : timm VisionTransformer
        As :func:`fastprompt.vpt` takes it (register tokens: visual prompts go after them; qk-norm:
        the key-value prompts join after it). Frozen and kept in eval mode.
    num_prompts : int
        Visual prompts per set (official default 10; per-task counts:
        :data:`VTAB1K_PROMPTS`).
    num_kv : int
        Key-value prompts per block (official default 5).
    shared_kv : bool
        One tensor as both key and value prompt (official); False: separate key and value
        prompts of the same count.
    deep, kv_deep : bool
        Visual prompts per block / key-value prompts per block (official: both); False: block 0.
    dropout : float
        Visual prompt dropout, per image, before the masks (official 0.1).
    masks : bool
        The token mask (P,) and segment mask (P, 16) that E²VPT's pruning trains (official
        pruning runs: on).
    kv_init : {"kaiming", "uniform", "trunc_normal"}
        Key-value prompt init (official: kaiming-uniform, bound √(6 / (N·d_h))).
    project, readout, impl, backend, head_init
        As :func:`fastprompt.vpt`.

    Returns
    -------
    PromptedViT
        ``prompted.method == "e2vpt"``; trainable: ``prompt_embeddings`` (1, P, D),
        ``deep_prompt_embeddings`` (L − 1, P, D), ``deep_QKV_embeddings`` (L, H, N, d) (or
        ``_K`` and ``_V``), the masks ``prompt_soft_tokens_mask_cls_token`` (P,) and
        ``prompt_soft_tokens_pieces_mask_cls_token`` (P, 16), ``prompt_proj`` and the head. For
        ViT-B/16 at 5/5 that is 46,080 + 46,080 + 85 = 92,245 besides the head.
    """
    if readout is None:
        readout = default_readout(model, f"fastprompt.{METHOD}")
    config = E2VPTConfig(
        num_prompts=num_prompts,
        num_kv=num_kv,
        shared_kv=shared_kv,
        deep=deep,
        kv_deep=kv_deep,
        kv_init=kv_init,
        dropout=dropout,
        masks=masks,
        project=project,
        readout=readout,
    )
    return build(model, config, impl=impl, backend=backend, head_init=head_init)


# -- the official code's checkpoints -------------------------------------------------------------

_LAYER_KV = re.compile(r"(?:^|\.)layer\.(\d+)\.attn\.(deep_QKV_embeddings(?:_K|_V)?)$")
_OURS = {
    "prompt_embeddings": "prompt_embeddings",
    "deep_prompt_embeddings": "deep_prompt_embeddings",
    TOKEN_MASK: TOKEN_MASK,
    SEGMENT_MASK: SEGMENT_MASK,
}


def read_official(
    raw: Mapping[str, Tensor], backbone: Backbone
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and config of an official E²VPT state dict (``last_model.pth``'s ``"model"``).

    The visual prompts, masks and projection live under ``enc.transformer.``, the key-value
    prompts in every attention module (``enc.transformer.encoder.layer.{i}.attn.
    deep_QKV_embeddings``, stacked here), the head under ``head.last_layer.``; the backbone's own
    weights are not read. The config comes from the shapes; masks with an exact zero are read as
    a rewound model's fixed masks (trained masks are never exactly 0), others as trainable.

    Raises
    ------
    ValueError
        When the state dict holds no key-value prompts (not an E²VPT checkpoint).
    """
    state: dict[str, Tensor] = {}
    layers: dict[str, dict[int, Tensor]] = {}
    for key, value in raw.items():
        match = _LAYER_KV.search(key)
        if match:
            layers.setdefault(match.group(2), {})[int(match.group(1))] = value
            continue
        leaf = key.rpartition(".")[2]
        if leaf in _OURS:
            state[_OURS[leaf]] = value
        elif key.endswith("prompt_proj.weight") or key.endswith("prompt_proj.bias"):
            state["prompt_proj." + leaf] = value
        elif key.endswith("head.last_layer.weight") or key.endswith("head.last_layer.bias"):
            state["head." + leaf] = value
    if not layers:
        other = [k for k in raw if k.rpartition(".")[2].startswith("deep_QKV_embeddings")]
        if other:
            # E2VPT-Swin's (layers.{s}.blocks.{j}.attn) or SHARED_ACCROSS's one set in the encoder.
            raise ValueError(
                f"load_prompts: its key-value prompts ({other[0]!r}) are not one per ViT block "
                "(encoder.layer.{i}.attn.deep_QKV_embeddings), the only E2VPT layout fastprompt "
                "reads"
            )
        raise ValueError("load_prompts: no 'deep_QKV_embeddings' key-value prompts: not E2VPT")
    for name, per_layer in layers.items():
        idx = sorted(per_layer)
        if idx != list(range(len(idx))):
            raise ValueError(f"load_prompts: {name} is present for layers {idx}, not 0, 1, ...")
        state[name] = torch.stack([per_layer[i] for i in idx])
    if "prompt_embeddings" not in state:
        raise ValueError("load_prompts: the checkpoint holds no 'prompt_embeddings' tensor")
    kv = state.get("deep_QKV_embeddings", state.get("deep_QKV_embeddings_K"))
    kv_layers = kv.shape[0]
    if kv_layers not in (1, backbone.depth):
        raise ValueError(
            f"load_prompts: key-value prompts for {kv_layers} layers, but the model has "
            f"{backbone.depth} blocks"
        )
    masks = TOKEN_MASK in state
    fixed = masks and bool((state[TOKEN_MASK] == 0).any() or (state[SEGMENT_MASK] == 0).any())
    proj = state.get("prompt_proj.weight")
    config = {
        "num_prompts": int(state["prompt_embeddings"].shape[1]),
        "num_kv": int(kv.shape[2]),
        "shared_kv": "deep_QKV_embeddings" in state,
        "deep": "deep_prompt_embeddings" in state,
        "kv_deep": kv_layers == backbone.depth,
        "masks": masks,
        "train_masks": not fixed,
        "segments": int(state[SEGMENT_MASK].shape[1]) if masks else 16,
        "project": -1 if proj is None else int(proj.shape[1]),
        "readout": "cls",
    }
    return state, config
