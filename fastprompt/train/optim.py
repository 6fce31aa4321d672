"""The optimiser of a recipe: SGD parameter groups with the recipe's weight-decay exemptions.

The names in a recipe's ``no_decay`` are checked against the model's trainable tensors
(:func:`check_no_decay`) before a run starts; ``head.<name>`` names the classifier's tensor
wherever the backbone keeps it (:func:`classifier_name`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fastprompt.train.recipes import Recipe

__all__ = ["check_no_decay", "classifier_name", "make_optimizer", "param_groups"]


def classifier_name(model: nn.Module) -> str:
    """The module name of the model's classifier (``head`` on a ViT, ``head.fc`` on a Swin)."""
    inner = getattr(model, "model", model) if hasattr(model, "source") else model
    head = inner.get_classifier() if hasattr(inner, "get_classifier") else None
    return next((n for n, m in model.named_modules() if m is head and n), "head")


def check_no_decay(model: nn.Module, named: Mapping[str, nn.Parameter], recipe: Recipe) -> None:
    """Refuse ``recipe.no_decay`` names that exempt nothing by mistake (a typo, a frozen tensor).

    A name is fine when it is a trainable tensor of ``model`` (``named``), or the ``bias`` of a
    layer built without one (the ``vpt`` recipe's ``head.bias`` on a bias-free head); ``head.<x>``
    names the classifier's tensor, as in :func:`param_groups`.

    Raises
    ------
    ValueError
        Listing the model's trainable names closest to the one given.
    """
    frozen = {n for n, _ in model.named_parameters()} - set(named)
    head = classifier_name(model)
    for given in recipe.no_decay:
        # ``head.<x>`` names the classifier's tensor whatever its module is called (param_groups).
        name = f"{head}.{given[len('head.') :]}" if given.startswith("head.") else given
        if name in named:
            continue
        owner, _, attr = name.rpartition(".")
        try:
            layer = model.get_submodule(owner) if owner else model
        except AttributeError:
            layer = None
        if layer is not None and attr == "bias" and getattr(layer, "bias", 0) is None:
            continue
        if name in frozen:
            raise ValueError(
                f"recipe {recipe.name!r}: no_decay names {given!r}, a frozen tensor of the model "
                "(it does not train, so weight decay never touches it); name trainable tensors: "
                f"{sorted(named)[:8]}"
            )
        close = difflib.get_close_matches(name, list(named), n=3, cutoff=0.5)
        raise ValueError(
            f"recipe {recipe.name!r}: no_decay names {given!r}, which is not a trainable tensor of "
            f"this model; "
            + (f"closest: {close}" if close else f"trainable tensors: {sorted(named)[:8]}")
        )


def param_groups(
    named: dict[str, nn.Parameter], recipe: Recipe, head: str = "head"
) -> list[dict[str, Any]]:
    """SGD parameter groups: weight decay on every tensor but ``recipe.no_decay``.

    One group when nothing is exempt (or the decay is 0), as the official PGN code; two otherwise
    (numerically the official VPT code's one group per tensor). ``head`` is the classifier's
    module name (``head.fc`` on a timm Swin): ``head.<name>`` in ``no_decay`` names its tensor.
    """
    names = set(recipe.no_decay)
    names |= {f"{head}.{n[len('head.') :]}" for n in recipe.no_decay if n.startswith("head.")}
    # A name the model lacks (a bias-free head) exempts nothing.
    decay = [p for n, p in named.items() if n not in names]
    exempt = [p for n, p in named.items() if n in names]
    if recipe.weight_decay == 0 or not exempt:
        return [{"params": decay + exempt, "weight_decay": recipe.weight_decay}]
    return [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]


def make_optimizer(
    named: dict[str, nn.Parameter], recipe: Recipe, head: str = "head"
) -> torch.optim.SGD:
    """The recipe's SGD over the trainable tensors ``named`` (lr set per epoch by the loop);
    ``head`` as in :func:`param_groups`."""
    if not named:
        raise ValueError("make_optimizer: the model has no trainable parameters")
    # foreach=False: the same arithmetic on every device and torch version (bitwise resume).
    return torch.optim.SGD(
        param_groups(named, recipe, head), lr=0.0, momentum=recipe.momentum, foreach=False
    )
