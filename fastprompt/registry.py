"""The method registry, as PEFT's ``register_peft_method`` has it: one entry per method.

A method is one module under :mod:`fastprompt.methods` that ends with one
:func:`register_peft_method` call naming everything the rest of the package needs
(``docs/design.md`` §4, "Methods"): its config class, the build function ``fastprompt train``
calls, its default recipe, its command-line options, how a checkpoint describes and rebuilds its
models, and what Prompt Condensation may do with them. The CLI, the training layer,
condensation and checkpoints read this table; nothing else in the package names a method.

This module imports no method and no model code, so every layer can read it; the built-in
methods are loaded on the first lookup (:func:`get`, :func:`names`), whoever asks first.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = [
    "AmbiguousCheckpoint",
    "CliOptions",
    "Condensation",
    "Method",
    "get",
    "names",
    "register_peft_method",
    "trainable",
]

# Keyword arguments every method's build and rebuild take: how a model runs, not what it trains.
RUN_OPTIONS = ("impl", "backend")


class AmbiguousCheckpoint(ValueError):
    """Raised by a method's ``read_official`` whose reading of a state dict is right only if the
    caller names the method (another method's state dict would hold the same tensors): it
    carries that reading, taken when ``load_prompts(..., method=<this method>)``.

    Parameters
    ----------
    message : str
        What the state dict holds, what else it may be, and which ``method`` loads it.
    state : dict of str to Tensor
        The tensors, under the method's names.
    config : dict
        The method's config read off them.
    """

    def __init__(self, message: str, state: dict[str, Tensor], config: dict[str, Any]) -> None:
        super().__init__(message)
        self.state = state
        self.config = config


@dataclass(frozen=True)
class CliOptions:
    """A method's options of ``fastprompt train``.

    Attributes
    ----------
    add : callable
        ``add(group)``: adds the method's options to an argparse argument group, every one
        defaulting to None (or False for a flag) so that the CLI can tell which were given. An
        option another method also declares (``--prompts``) is shared: same flag, same type.
    kwargs : callable
        ``kwargs(args) -> dict``: the parsed arguments as keyword arguments of the method's
        build function (recorded in ``run.json``); raises ``ValueError`` with a one-line message
        naming the option for a bad value.
    recipe : callable, optional
        ``recipe(args) -> dict``: recipe fields the method's options imply (VPT's VTAB-1k
        presets: the official resize and normalisation).
    """

    add: Callable[[argparse._ArgumentGroup], None]
    kwargs: Callable[[argparse.Namespace], dict[str, Any]]
    recipe: Callable[[argparse.Namespace], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Condensation:
    """What Prompt Condensation may do with a method's models.

    Attributes
    ----------
    check : callable
        ``check(build_kwargs) -> str | None``: why a model built with these keyword arguments
        (a run's) cannot be condensed, or None when it can (the run-level check, before any
        model is loaded; the model-level one reads the model).
    pack : callable
        ``pack(prompted, counts) -> PromptedViT``: a model of the same method and config whose
        block i holds ``counts[i]`` prompts, sharing ``prompted``'s backbone (``share_with``),
        prompt dropout off; condensation copies the kept prompts into it.
    """

    check: Callable[[Mapping[str, Any]], str | None]
    pack: Callable[[nn.Module, tuple[int, ...]], nn.Module]


@dataclass(frozen=True)
class Method:
    """One method's entry (see :func:`register_peft_method` for the fields)."""

    name: str
    config_cls: type | None
    build: Callable[..., nn.Module] | None
    recipe: str | None
    cli: CliOptions | None
    describe: Callable[[nn.Module], dict[str, Any]]
    rebuild: Callable[[nn.Module, Mapping[str, Any], Mapping[str, Any]], nn.Module]
    read_official: Callable[[Mapping[str, Tensor], Any], tuple[dict, dict]] | None = None
    legacy: Callable[[Mapping[str, Any]], Mapping[str, Any] | None] | None = None
    condensation: Condensation | None = None


_REGISTRY: dict[str, Method] = {}
_LOADED = False


def register_peft_method(
    *,
    name: str,
    config_cls: type | None,
    build: Callable[..., nn.Module] | None,
    describe: Callable[[nn.Module], dict[str, Any]],
    rebuild: Callable[[nn.Module, Mapping[str, Any], Mapping[str, Any]], nn.Module],
    recipe: str | None = None,
    cli: CliOptions | None = None,
    read_official: Callable[[Mapping[str, Tensor], Any], tuple[dict, dict]] | None = None,
    legacy: Callable[[Mapping[str, Any]], Mapping[str, Any] | None] | None = None,
    condensation: Condensation | None = None,
) -> Method:
    """Register a method (a second registration under one name is an error).

    Parameters
    ----------
    name : str
        Recorded as ``prompted.method``, in checkpoints and ``run.json``; ``--method NAME``.
    config_cls : type or None
        The method's config dataclass (``prompted.config``); None when its models carry another
        method's config (Prompt Condensation's carry their base method's).
    build : callable or None
        ``build(model, **kwargs) -> PromptedViT``: what ``fastprompt train`` calls with the
        keyword arguments of ``cli.kwargs`` (usually the public entry point, ``fastprompt.vpt``);
        None when the method's models are not built from a fresh backbone.
    describe : callable
        ``describe(prompted) -> dict``: the JSON-ready config that rebuilds the model.
    rebuild : callable
        ``rebuild(model, config, overrides) -> PromptedViT``: a wrapper of a fresh model with that
        config (its trainable tensors are then loaded from the checkpoint). ``overrides`` holds
        the run options (``impl``, ``backend``) and what the user passed to ``load_prompts``.
    recipe : str, optional
        The default recipe of ``fastprompt train --method NAME``.
    cli : CliOptions, optional
        Its options of ``fastprompt train``; None: not trainable from the command line.
    read_official : callable, optional
        ``read_official(state_dict, backbone) -> (state, config)``: reads a checkpoint of the
        method's official code (our tensor names, this method's config); raises ``ValueError``
        when the state dict is not one, and :class:`AmbiguousCheckpoint` when it is one only if
        the caller names this method.
    legacy : callable, optional
        ``legacy(description) -> config | None``: the config of a format-1 checkpoint
        description, when it holds one of this method's models.
    condensation : Condensation, optional
        Present when Prompt Condensation can pack this method's models.

    Returns
    -------
    Method
    """
    method = Method(
        name=name,
        config_cls=config_cls,
        build=build,
        recipe=recipe,
        cli=cli,
        describe=describe,
        rebuild=rebuild,
        read_official=read_official,
        legacy=legacy,
        condensation=condensation,
    )
    if name in _REGISTRY:
        raise ValueError(f"fastprompt: a method named {name!r} is already registered")
    _REGISTRY[name] = method
    return method


def _load_builtin() -> None:
    """Import the built-in methods once (each registers itself)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        importlib.import_module("fastprompt.methods")


def get(name: str) -> Method:
    """The registered method called ``name``."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"fastprompt: no method named {name!r} is registered (known: {names()})"
        ) from None


def names() -> tuple[str, ...]:
    """Every registered method, sorted."""
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def trainable() -> tuple[str, ...]:
    """The methods ``fastprompt train`` can build (those with command-line options)."""
    return tuple(n for n in names() if _REGISTRY[n].cli is not None)
