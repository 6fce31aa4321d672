"""State dicts of the official VPT code (KMnP/vpt) read as VPT or as one of its depth ablations.

The official code saves no config with its tensors, so what a checkpoint holds is read off its
keys and shapes. What each configuration saves:

- ``vit_prompt/vit.py`` (the one the released model builder imports; it asserts
  ``LOCATION="prepend"``, no ``NUM_DEEP_LAYERS``, no ``DEEP_SHARED``): ``prompt_embeddings``
  (1, P, Dp), with ``DEEP`` ``deep_prompt_embeddings`` (L − 1, P, Dp), ``prompt_proj.*`` when
  ``PROJECT > -1``, the head under ``head.last_layer.*``, the backbone under ``enc.transformer.``.
- ``vit_prompt/vit_ablations.py`` (runs only with the builder's import edited to it):
  ``NUM_DEEP_LAYERS = k`` saves ``deep_prompt_embeddings`` (k − 1, P, Dp); with ``REVERSE_DEEP``
  there is no ``prompt_embeddings`` and ``deep_prompt_embeddings`` is (k, P, Dp).
  ``DEEP_SHARED`` saves the same tensors as without it (its ``deep_prompt_embeddings`` is built,
  never read, and stays at its init), so its checkpoints are not told apart from VPT-deep's (or
  from ``NUM_DEEP_LAYERS``'s). ``LOCATION="add"`` adds prompts to the tokens: P is the model's
  token count (class token + patches); ``"add-1"`` adds one vector to every token: P = 1, the
  same tensors as VPT with one prompt, not told apart. fastprompt has neither location.
- ``vit_prompt/swin_transformer.py``: ``prompt_embeddings`` (1, P, C) and per stage
  ``deep_prompt_embeddings_0`` … ``_3`` of (d₀ − 1, P, C), (d₁, P, 2C), (d₂, P, 4C),
  (d₃, P, 8C). That code ignores ``NUM_DEEP_LAYERS``, ``REVERSE_DEEP`` and ``DEEP_SHARED`` (a
  checkpoint made with them is VPT-Swin's); ``"add"`` fails as the model is built, ``"add-1"``
  keeps the per-stage tensors unused (P = 1, not told apart).

A fastprompt wrapper's own ``state_dict()`` holds the same tensors under bare names
(``prompt_embeddings``, the head under timm's name). There, VPT-shallow's and
``vpt_ablation(deep_shared=True)``'s are the same tensors: such a state dict is read as VPT only
when the caller names the method. A reading that is right only if the caller says so raises
:class:`fastprompt.registry.AmbiguousCheckpoint`, which carries it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastprompt._warnings import warn_at_caller
from fastprompt.backbones import Backbone
from fastprompt.registry import AmbiguousCheckpoint

__all__ = ["official_prompts", "read_ablation", "read_vpt"]

# Our names for the tensors of an official VPT checkpoint ("HEAD": the classifier's own name).
_OFFICIAL_SUFFIXES = {
    "deep_prompt_embeddings": "deep_prompt_embeddings",
    "prompt_embeddings": "prompt_embeddings",
    "prompt_proj.weight": "prompt_proj.weight",
    "prompt_proj.bias": "prompt_proj.bias",
    "head.last_layer.weight": "HEAD.weight",
    "head.last_layer.bias": "HEAD.bias",
}
# VPT-Swin's per-stage deep prompts (src/models/vit_prompt/swin_transformer.py).
_STAGE_KEY = re.compile(r"(?:^|\.)(deep_prompt_embeddings_(\d+))$")
# E²VPT's key-value prompts (per attention module, or one set shared across layers) and pruning
# masks: its checkpoints hold VPT's prompt names too, and read as VPT they would lose these.
_E2VPT_KEY = re.compile(r"(?:^|\.)(deep_QKV_embeddings\w*|prompt_soft_tokens\w*)$")
# A ViT's blocks in the official backbone (enc.transformer.encoder.layer.i) and in timm's.
_BLOCK_KEY = re.compile(r"(?:^|\.)(?:encoder\.layer|blocks)\.(\d+)\.")
# The official ViT's position embeddings (class token + patches).
_POSITIONS = "embeddings.position_embeddings"


def _head_name(backbone: Backbone) -> str:
    head = backbone.classifier()
    return next(n for n, m in backbone.model.named_modules() if m is head)


def official_prompts(raw: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
    """The prompt, projection and head tensors of a VPT state dict, under our names."""
    foreign = [key for key in raw if _E2VPT_KEY.search(key)]
    if foreign:
        raise ValueError(
            f"load_prompts: the checkpoint holds {foreign[0]!r} ({len(foreign)} E2VPT key-value "
            "prompt or mask tensors in all): an E2VPT checkpoint, not VPT's (a fastprompt E2VPT "
            "model loads from the folder its save_prompts wrote)"
        )
    head = _head_name(backbone)
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        stage = _STAGE_KEY.search(key)
        if stage:
            state[stage.group(1)] = value
            continue
        for suffix, ours in _OFFICIAL_SUFFIXES.items():
            if key == suffix or key.endswith("." + suffix):
                state[ours.replace("HEAD", head)] = value
                break
        else:
            if key in (f"{head}.weight", f"{head}.bias"):
                state[key] = value
    return state


def _ours(raw: Mapping[str, Tensor]) -> bool:
    """Named as a fastprompt wrapper names its prompts (the official code's sit under ``enc.``)."""
    return "prompt_embeddings" in raw or "deep_prompt_embeddings" in raw


def _saved_depth(raw: Mapping[str, Tensor]) -> int | None:
    """The blocks of the ViT whose weights the state dict holds (None: it holds none)."""
    found = [int(m.group(1)) for m in map(_BLOCK_KEY.search, raw) if m]
    return max(found) + 1 if found else None


def _check_depth(raw: Mapping[str, Tensor], backbone: Backbone) -> None:
    saved = _saved_depth(raw)
    if saved is not None and saved != backbone.depth:
        raise ValueError(
            f"load_prompts: the checkpoint holds the weights of a ViT of {saved} blocks, but the "
            f"model has {backbone.depth}: a checkpoint of another model"
        )


def _sets(deep: Tensor) -> int:
    if deep.dim() != 3:
        raise ValueError(
            f"load_prompts: deep_prompt_embeddings must be (sets, P, D), got {tuple(deep.shape)}"
        )
    return int(deep.shape[0])


def _project(state: Mapping[str, Tensor]) -> int:
    proj = state.get("prompt_proj.weight")
    return -1 if proj is None else int(proj.shape[1])


def _check_stages(state: Mapping[str, Tensor], stages: tuple[int, ...]) -> None:
    """Per-stage deep prompts of the official VPT-Swin: one tensor per stage, each a set per
    block (stage 0's first block takes ``prompt_embeddings``)."""
    found = {int(_STAGE_KEY.search(k).group(2)): k for k in state if _STAGE_KEY.search(k)}
    if not found:
        return
    if max(found) >= len(stages):
        raise ValueError(
            f"load_prompts: the checkpoint holds per-stage prompts for {max(found) + 1} stages "
            f"(deep_prompt_embeddings_0..{max(found)}), but the model has {len(stages)} stages: "
            "a checkpoint of another Swin"
        )
    missing = [f"deep_prompt_embeddings_{s}" for s in range(len(stages)) if s not in found]
    if missing:
        raise ValueError(
            f"load_prompts: the checkpoint holds per-stage deep prompts but lacks {missing} (the "
            "official VPT-Swin saves one for every stage)"
        )
    for s, blocks in enumerate(stages):
        sets = state[found[s]].shape[0] if state[found[s]].dim() == 3 else None
        need = blocks - 1 if s == 0 else blocks
        if sets != need:
            raise ValueError(
                f"load_prompts: deep_prompt_embeddings_{s} has shape "
                f"{tuple(state[found[s]].shape)}, but the model's stage {s} has {blocks} blocks: "
                f"it needs ({need}, P, D){' (its first takes prompt_embeddings)' * (s == 0)}, "
                "a checkpoint of a Swin of other depths (the official VPT-Swin prompts every "
                "block; it ignores NUM_DEEP_LAYERS, REVERSE_DEEP and DEEP_SHARED)"
            )


def read_vpt(
    raw: Mapping[str, Tensor], backbone: Backbone
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and config of an official VPT state dict (keys ending in ``prompt_embeddings``,
    ``deep_prompt_embeddings`` (ViT) or ``deep_prompt_embeddings_<stage>`` (Swin),
    ``prompt_proj.*``, ``head.last_layer.*``) or of a fastprompt VPT wrapper; the config is read
    off the shapes. The ablations' layouts are refused with what they are."""
    state = official_prompts(raw, backbone)
    staged = backbone.stages() is not None
    deep = state.get("deep_prompt_embeddings")
    if "prompt_embeddings" not in state:
        if deep is not None and not staged:
            raise ValueError(
                f"load_prompts: the checkpoint holds deep_prompt_embeddings {tuple(deep.shape)} "
                "and no prompt_embeddings: the REVERSE_DEEP ablation's layout (prompts in the "
                f"last {_sets(deep)} blocks only), not VPT's"
            )
        raise ValueError("load_prompts: the checkpoint holds no 'prompt_embeddings' tensor")
    shallow = state["prompt_embeddings"]
    if shallow.dim() != 3 or shallow.shape[0] != 1:
        raise ValueError(
            f"load_prompts: prompt_embeddings must be (1, P, D), got {tuple(shallow.shape)}"
        )
    stages = sorted(k for k in state if _STAGE_KEY.search(k))
    if staged and deep is not None:
        raise ValueError(
            "load_prompts: the checkpoint holds one 'deep_prompt_embeddings' tensor (VPT-ViT), "
            f"but the model is a {backbone.description} (VPT-Swin keeps deep_prompt_embeddings_<s>)"
        )
    if not staged and stages:
        raise ValueError(
            f"load_prompts: the checkpoint holds per-stage {stages} (VPT-Swin), but the model is a "
            f"{backbone.description}"
        )
    if staged:
        _check_stages(state, backbone.stages())
    else:
        _check_depth(raw, backbone)
    depth, p = backbone.depth, int(shallow.shape[1])
    if deep is not None and _sets(deep) != depth - 1:
        k = _sets(deep) + 1
        if k > depth:
            raise ValueError(
                f"load_prompts: deep_prompt_embeddings {tuple(deep.shape)} holds prompts for "
                f"{k} blocks (with prompt_embeddings), but the model has {depth}: a checkpoint "
                "of a deeper model"
            )
        raise ValueError(
            f"load_prompts: deep_prompt_embeddings {tuple(deep.shape)} holds deep prompts for "
            f"{k} blocks (with prompt_embeddings), but the model has {depth} (VPT-deep: "
            f"({depth - 1}, P, D)): the official NUM_DEEP_LAYERS={k} ablation's layout, not VPT's"
        )
    if staged and "prompt_proj.weight" in state:
        # Built by the official VPT-Swin when PROJECT > -1, never applied to the prompts.
        warn_at_caller(
            "load_prompts: the official VPT-Swin checkpoint's prompt_proj is dropped: that code "
            "builds it but never applies it, so it changes no output",
            UserWarning,
        )
        state.pop("prompt_proj.weight")
        state.pop("prompt_proj.bias", None)
    config = {
        "num_prompts": p,
        "deep": deep is not None or bool(stages),
        "project": _project(state),
        "readout": backbone.default_readout(),
    }
    if staged:
        return state, config
    tokens = _tokens(raw, backbone)
    if not _ours(raw) and p == tokens:
        raise AmbiguousCheckpoint(
            f"load_prompts: the checkpoint's prompt sets hold {p} prompts, as many as the "
            "official model has tokens (class token + patches): the official LOCATION='add' "
            "(prompts added to the tokens, which fastprompt does not implement) saves that, "
            f"and so does VPT with {p} prompts; pass method='vpt' if it is VPT",
            state,
            config,
        )
    if deep is None and _ours(raw) and _saved_depth(raw) is not None:
        # A bare {"prompt_embeddings": ...} is how official VPT-shallow prompts are shared; only a
        # whole wrapper state dict can also be the deep_shared ablation's.
        raise AmbiguousCheckpoint(
            "load_prompts: the checkpoint holds prompt_embeddings and no deep prompts under a "
            "fastprompt wrapper's names: fastprompt.vpt(..., deep=False) and "
            "fastprompt.vpt_ablation(..., deep_shared=True) hold the same tensors, and a state "
            "dict records no method. Pass method='vpt' to load it as VPT-shallow; for the "
            f"ablation build fastprompt.vpt_ablation(model, {p}, deep_shared=True, "
            "num_deep_layers=...) and call its load_state_dict (save_prompts records the method)",
            state,
            config,
        )
    return state, config


def _tokens(raw: Mapping[str, Tensor], backbone: Backbone) -> int | None:
    """The official model's tokens: its position embeddings' length where the checkpoint holds
    them, else the class token and the model's patches."""
    for key, value in raw.items():
        named = key == _POSITIONS or key.endswith("." + _POSITIONS)
        if named and torch.is_tensor(value) and value.dim() == 3:
            return int(value.shape[1])
    patches = getattr(getattr(backbone.model, "patch_embed", None), "num_patches", None)
    return patches + 1 if isinstance(patches, int) else None


def read_ablation(
    raw: Mapping[str, Tensor], backbone: Backbone
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and config of a state dict of the official ablations (``vit_ablations.py``) or of
    a fastprompt :func:`~fastprompt.vpt_ablation` wrapper. No state dict says it is an ablation,
    so every reading is an :class:`AmbiguousCheckpoint`, taken when the caller names
    ``method="vpt_ablation"``."""
    if backbone.stages() is not None:
        raise ValueError(
            "load_prompts: a Swin has no depth ablations (the official VPT-Swin ignores "
            "NUM_DEEP_LAYERS, REVERSE_DEEP and DEEP_SHARED: its checkpoints load as VPT)"
        )
    state = official_prompts(raw, backbone)
    _check_depth(raw, backbone)
    shallow, deep = state.get("prompt_embeddings"), state.get("deep_prompt_embeddings")
    depth = backbone.depth
    if deep is None:
        if shallow is None:
            raise ValueError("load_prompts: the checkpoint holds no prompt tensors")
        p = int(shallow.shape[1]) if shallow.dim() == 3 else "P"
        raise ValueError(
            "load_prompts: the checkpoint holds prompt_embeddings and no deep prompts: VPT-shallow "
            "(method='vpt'), or a fastprompt.vpt_ablation(..., deep_shared=True) state dict, "
            "which records neither deep_shared nor num_deep_layers; for that build "
            f"fastprompt.vpt_ablation(model, {p}, deep_shared=True, num_deep_layers=...) and "
            "call its load_state_dict"
        )
    k = _sets(deep) + int(shallow is not None)
    if shallow is not None and k == depth:
        raise ValueError(
            "load_prompts: the checkpoint holds prompts for every block: VPT-deep's layout, "
            "which method='vpt' loads (fastprompt.vpt_ablation(model, P) computes the same)"
        )
    if k > depth:
        raise ValueError(
            f"load_prompts: the checkpoint holds deep prompts for {k} blocks, but the model has "
            f"{depth}: a checkpoint of a deeper model"
        )
    config = {
        "num_prompts": int(deep.shape[1]),
        "num_deep_layers": k,
        "reverse_deep": shallow is None,
        "project": _project(state),
        "readout": backbone.default_readout(),
    }
    if shallow is None and not _ours(raw):
        raise ValueError(
            f"load_prompts: the checkpoint holds deep_prompt_embeddings {tuple(deep.shape)} and "
            f"no prompt_embeddings: the official REVERSE_DEEP ablation (prompts in the last {k} "
            "blocks). Its code overwrites the first P patch tokens where the first set enters; "
            "fastprompt.vpt_ablation(..., reverse_deep=True) inserts the set in front of them "
            "(docs/design.md §2), so these prompts would run on another computation: not loaded"
        )
    what = (
        f"the REVERSE_DEEP ablation (fastprompt.vpt_ablation(model, P, num_deep_layers={k}, "
        "reverse_deep=True))"
        if shallow is None
        else f"the NUM_DEEP_LAYERS={k} ablation (fastprompt.vpt_ablation(model, P, "
        f"num_deep_layers={k}); the official DEEP_SHARED saves the same tensors, not told apart)"
    )
    raise AmbiguousCheckpoint(
        f"load_prompts: the checkpoint holds deep prompts for {k} of the model's {depth} blocks: "
        f"{what}; a state dict records no method: pass method='vpt_ablation' to load it so",
        state,
        config,
    )
