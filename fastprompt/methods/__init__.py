"""Methods (tier 4) and their registry: how each method saves and rebuilds a prompted model.

A method module (``vpt``, ``condensation``, ...) registers a :class:`Method`; a checkpoint's
``config.json`` names the method and holds its config, and :func:`fastprompt.load_prompts`
rebuilds the model through the registry. The method modules are imported by ``fastprompt``'s
``__init__``, so the registry is complete once the package is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["Method", "get", "names", "register"]


@dataclass(frozen=True)
class Method:
    """How one method's models are saved and rebuilt.

    Attributes
    ----------
    name : str
        Recorded as ``prompted.method`` and in checkpoints.
    describe : callable
        ``describe(prompted) -> dict``: the JSON-ready config that rebuilds the model.
    rebuild : callable
        ``rebuild(model, config, overrides) -> PromptedViT``: a wrapper of a fresh timm model with
        that config (its trainable tensors are then loaded from the checkpoint). ``overrides``
        holds the keyword arguments the user passed to ``load_prompts``.
    """

    name: str
    describe: Callable[[nn.Module], dict[str, Any]]
    rebuild: Callable[[nn.Module, Mapping[str, Any], Mapping[str, Any]], nn.Module]


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (a second registration under one name is an error)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"fastprompt: a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"fastprompt: no method named {name!r} is registered (known: {names()})"
        ) from None


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
