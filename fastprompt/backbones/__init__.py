"""Backbone adapters and their registry, keyed on the model class.

:func:`adapter_for` walks the model's class hierarchy (its MRO) and builds the adapter registered
for the first class it finds; a model of no registered family is refused with the list of the
supported ones. Built-in adapters are named here as ``module:Class`` and imported on first use,
so neither ``import fastprompt`` nor the prompted core imports timm or any adapter module; keys
are classes' qualified names for the same reason. Another family is one adapter module and one
:func:`register_backbone` call (``docs/design.md`` §4, "Add a backbone").
"""

from __future__ import annotations

import importlib

from torch import nn

from fastprompt.backbones.base import (
    AttentionCall,
    AttentionFn,
    Backbone,
    BlockShape,
    PromptKV,
    PromptKVParts,
)

__all__ = [
    "AttentionCall",
    "AttentionFn",
    "Backbone",
    "BlockShape",
    "PromptKV",
    "PromptKVParts",
    "adapter_for",
    "families",
    "readouts",
    "register_backbone",
]

# model class (qualified name) -> adapter class, or "module:Class" until first used.
_REGISTRY: dict[str, type[Backbone] | str] = {
    "timm.models.vision_transformer.VisionTransformer": "fastprompt.backbones.vit:ViTBackbone",
    "timm.models.swin_transformer.SwinTransformer": "fastprompt.backbones.swin:SwinBackbone",
}

# Windowed families fastprompt knows and does not prompt, and why (model class -> reason).
_REFUSED: dict[str, str] = {
    "timm.models.swin_transformer_v2.SwinTransformerV2": (
        "Swin v2 (scaled cosine attention, a continuous relative-position bias, post-norm "
        "blocks) has no official VPT code to follow; fastprompt prompts Swin v1 "
        "(timm SwinTransformer, swin_*)"
    ),
    "timm.models.swin_transformer_v2_cr.SwinTransformerV2Cr": (
        "Swin v2 (the CR variant) has no official VPT code to follow; fastprompt prompts Swin v1 "
        "(timm SwinTransformer, swin_*)"
    ),
}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_backbone(model_class: type | str, adapter: type[Backbone]) -> None:
    """Register ``adapter`` for models of ``model_class`` and its subclasses.

    Parameters
    ----------
    model_class : type or str
        The model class, or its qualified name (``"timm.models.swin_transformer.
        SwinTransformer"``) to avoid importing it here.
    adapter : type
        A :class:`Backbone` subclass.
    """
    if not (isinstance(adapter, type) and issubclass(adapter, Backbone)):
        raise TypeError(f"register_backbone: adapter must be a Backbone subclass, got {adapter!r}")
    key = model_class if isinstance(model_class, str) else _qualified(model_class)
    _REGISTRY[key] = adapter


def families() -> list[str]:
    """What each registered adapter covers (for messages and ``fastprompt info``)."""
    return [_adapter_class(key).description or key for key in list(_REGISTRY)]


def _adapter_class(key: str) -> type[Backbone]:
    entry = _REGISTRY[key]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
        _REGISTRY[key] = entry
    return entry


def adapter_for(model: object, who: str) -> Backbone:
    """The adapter of ``model``'s family, built for it (which checks it can be wrapped).

    Parameters
    ----------
    model : nn.Module
    who : str
        The entry point, for messages (``"fastprompt.vpt"``).

    Raises
    ------
    TypeError
        ``model`` belongs to no registered family (the message lists them), or its adapter
        refuses it (the message says why).
    ValueError
        The adapter refuses a configuration of the family (the message says why).
    """
    # A wrapper says so by a class flag (ownership.OwningWrapper): adapters sit below it.
    if getattr(type(model), "wraps_a_model", False):
        raise TypeError(
            f"{who}: this model is already prompted (a {type(model).__name__}); call .unwrap() "
            "first"
        )
    if isinstance(model, nn.Module):
        for cls in type(model).__mro__:
            key = _qualified(cls)
            if key in _REGISTRY:
                return _adapter_class(key)(model, who)
            if key in _REFUSED:
                raise TypeError(f"{who}: {type(model).__name__} is not supported: {_REFUSED[key]}")
    kind = type(model)
    raise TypeError(
        f"{who}: model must be a {' or a '.join(families())}, got "
        f"{kind.__module__}.{kind.__qualname__}"
    )


def readouts() -> list[str]:
    """Every readout some registered family reads (for command-line choices)."""
    out: list[str] = []
    for key in list(_REGISTRY):
        out += [r for r in _adapter_class(key).readouts if r not in out]
    return out
